"""Options of ``dpa-rag serve``: what to serve (a run folder, explicit parts or the bundled defaults) and the limits.

Precedence for the served parts: explicit flags (``--index``, ``--reranker``, ``--reader``, …) > the pipeline run
folder (``--run``) > the bundled defaults (the bundled sample corpus indexed with BM25 once, MiniLM as the reranker,
SmolLM2-135M as both readers).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dpa_rag.config import Dtype, StageConfig

__all__ = ["ServeConfig"]


class ServeConfig(StageConfig):
    """Configuration of ``dpa-rag serve``."""

    # what to serve
    run: Path | None = Field(
        None, description="Pipeline run folder (dpa-rag run/demo): its index, aligned reranker and aligned reader."
    )
    index: Path | None = Field(None, description="Index folder (dpa-rag index); default: the run's, else the sample.")
    retriever: Literal["bm25", "dense", "hybrid"] | None = Field(
        None, description="Retrieval method; default: the run's retriever, else bm25."
    )
    reranker: str | None = Field(
        None, description="Reranker model folder/alias, or 'none'; default: the run's aligned reranker, else minilm."
    )
    reader: str | None = Field(
        None, description="Aligned reader (model dpa-rag); default: the run's self-aligned reader, else the base."
    )
    base_reader: str | None = Field(
        None, description="Base reader (model dpa-rag-base); default: the run's reader, else smollm2-135m."
    )
    questions: Path | None = Field(
        None, description="Questions with gold answers for the page (gold answer, right/wrong, sample questions); "
        "default: the run's evaluation questions, or the bundled sample's with the bundled defaults.",
    )
    backend: Literal["hf", "openai", "vllm", "fake"] | None = Field(
        None, description="Generation backend of both readers; default: the run's, else hf."
    )
    base_url: str | None = Field(None, description="OpenAI-compatible server URL of the readers (backend openai).")
    device: str | None = Field(None, description="Device of the models: auto, cpu, cuda, cuda:N, mps.")
    dtype: Dtype | None = Field(
        None, description="Weights/compute dtype of the reranker and readers; default: the run's, else auto."
    )
    top_k: int | None = Field(None, ge=1, le=100, description="Passages the reader sees; default: the run's, else 3.")
    candidates: int | None = Field(
        None, ge=1, le=1000, description="Retrieved candidates the reranker scores; default: the run's, else 20."
    )
    max_new_tokens: int | None = Field(None, ge=1, le=4096, description="Default answer length in tokens.")
    reranker_batch_size: int | None = Field(
        None, ge=1, description="Reranker pairs per forward (default: 16 on a CPU, 64 on GPUs)."
    )
    reranker_max_length: int | None = Field(
        None, ge=8, description="Reranker max tokens per pair; default: the run's, else 512."
    )
    use_cache: bool = Field(True, description="Serve repeated greedy questions from the generation cache.")
    cache_dir: Path | None = Field(
        None, description="Generation cache and sample-index folder (default: $DPA_RAG_CACHE or ~/.cache/dpa-rag)."
    )
    # network
    host: str = Field("127.0.0.1", description="Address to bind (loopback by default; 0.0.0.0 exposes it).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0 = any free port).")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the API key clients must send (Bearer or X-API-Key)."
    )
    # micro-batching
    micro_batching: bool = Field(True, description="Merge concurrent requests into shared forward passes.")
    batch_window_ms: float = Field(
        5.0, ge=0, le=1000, description="How long a batch waits for more requests once the model is free."
    )
    max_batch_pairs: int = Field(256, ge=1, description="Most (query, text) pairs per merged reranker call.")
    max_batch_prompts: int = Field(16, ge=1, description="Most prompts per merged reader call.")
    max_queue: int = Field(64, ge=1, description="Requests waiting per model before new ones get 503.")
    # limits
    max_texts: int = Field(256, ge=1, description="Most texts/documents per /rerank request.")
    max_chars: int = Field(10_000, ge=1, description="Most characters per text, query or message.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body in bytes (413 above).")
    max_top_k: int = Field(100, ge=1, description="Largest top_k/candidates a request may ask for.")
    request_timeout: float = Field(60.0, gt=0, description="Seconds before a request is answered 504.")
    drain_timeout: float = Field(
        30.0, ge=0, description="On SIGTERM/SIGINT: stop accepting, let requests in flight finish for up to this "
        "many seconds, then exit."
    )

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.api_key_env is not None and not self.api_key_env.strip():
            raise ValueError("api_key_env: give the name of an environment variable")
        return self
