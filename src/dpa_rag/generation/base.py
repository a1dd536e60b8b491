"""The generator protocol every reader/rewriter backend implements, and its shared options.

A backend turns prompts into texts: ``generate(prompts, params) -> list[str]``. A prompt is either a plain string or
a chat (a list of ``{"role", "content"}`` messages); backends apply the model's chat template to chats.
:class:`~dpa_rag.generation.cache.CachedGenerator` wraps any backend with the on-disk cache, batching and progress.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, Union, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from dpa_rag.config import ATTN_HELP, AttnImplementation, Runtime
from dpa_rag.models import DEFAULT_READER

__all__ = [
    "GenerationParams",
    "Generator",
    "GeneratorOptions",
    "LoglikScorer",
    "LoglikUnsupported",
    "Prompt",
    "prompt_to_text",
    "supports_loglik",
]

Prompt = Union[str, list[dict[str, str]]]  # noqa: UP007


class GenerationParams(BaseModel):
    """Decoding parameters. ``temperature == 0`` means greedy decoding (the default everywhere)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = ()
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@runtime_checkable
class Generator(Protocol):
    """A text generation backend.

    Attributes:
        model_id: identifies the model *and its weights* (a fingerprint for local folders); part of the cache key.
    """

    model_id: str

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        """Return one completion per prompt, in order."""
        ...


@runtime_checkable
class LoglikScorer(Protocol):
    """A backend that can score a continuation under a prompt (teacher forcing, no generation).

    ``loglik(prompts, continuations)`` returns, per pair, ``(sum of the continuation tokens' log-probabilities,
    number of continuation tokens)``: the prompt is rendered exactly as for :meth:`Generator.generate` (chat template
    with the generation prompt), the continuation follows it as the assistant's answer, and only its tokens count.
    """

    model_id: str

    def loglik(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[tuple[float, int]]:
        ...


class LoglikUnsupported(RuntimeError):
    """The backend (or the server behind it) cannot return log-probabilities of given tokens."""


def supports_loglik(backend: object) -> bool:
    """Whether ``backend`` implements :class:`LoglikScorer`."""
    return callable(getattr(backend, "loglik", None))


def prompt_to_text(prompt: Prompt) -> str:
    """A plain-text rendering of a prompt (for backends or logs without a chat template)."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class GeneratorOptions(Runtime):
    """Options shared by every stage that calls an LLM (mixed into those stages' configs, and the pipeline's
    ``reader``/``rewriter``/``aligned_reader`` sections); ``batch_size`` = prompts per backend call (hf batch, cache
    flush unit)."""

    # options that change how fast outputs come, not what they are (the stage manifests ignore them)
    result_neutral: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "tensor_parallel_size", "gpu_memory_utilization"}
    )

    backend: Literal["hf", "openai", "vllm", "fake"] = Field(
        "hf",
        description="Generation backend: hf (local transformers), openai (any OpenAI-compatible server), vllm, "
        "fake (deterministic test double).",
    )
    model: str = Field(
        DEFAULT_READER,
        description="Reader/generator model: a bundled alias (smollm2-135m), a hub id or a local folder; for the "
        "openai backend, the server's model name.",
    )
    base_url: str | None = Field(None, description="OpenAI-compatible server URL, e.g. http://localhost:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (openai).")
    tokenizer: str | None = Field(
        None,
        description="openai: the served model's tokenizer (hub id, local folder or bundled alias) whose chat "
        "template renders chats for answer scoring (label_rule loglik), as the server would; without it chats are "
        "scored as plain 'role: content' text (with a warning).",
    )
    attn_implementation: AttnImplementation = Field(
        "auto", description="hf: " + ATTN_HELP + " vllm picks its own attention backend and ignores this.",
        json_schema_extra={"cli": ["--flash_attn"]},  # the authors' inference command: --flash_attn no
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs to shard the model over.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of GPU memory vLLM may take.")
    max_model_len: int | None = Field(None, ge=1, description="vllm: context length cap (default: the model's).")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="vllm: any other vllm.LLM argument, e.g. {enforce_eager: true} (YAML only)."
    )
    max_new_tokens: int = Field(32, ge=1, description="Maximum new tokens per answer.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling p (ignored when greedy).")
    max_concurrency: int = Field(8, ge=1, description="Parallel HTTP requests (openai backend).")
    timeout: float = Field(60.0, gt=0, description="Seconds per HTTP request (openai backend).")
    max_retries: int = Field(5, ge=0, description="Retries with exponential backoff on server errors (openai).")
    cache_dir: Path | None = Field(
        None, description="Generation cache folder (default: $DPA_RAG_CACHE or ~/.cache/dpa-rag)."
    )
    use_cache: bool = Field(True, description="Read and write the on-disk generation cache.")

    def generation_params(self, **override: Any) -> GenerationParams:
        values = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p}
        values.update(override)
        return GenerationParams(**values)
