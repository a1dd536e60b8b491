"""Build the configured backend, wrapped in the cache."""

from __future__ import annotations

from dpa_rag.generation.base import Generator, GeneratorOptions
from dpa_rag.generation.cache import CachedGenerator, GenerationCache, default_cache_dir

__all__ = ["build_backend", "build_generator"]


def build_backend(opts: GeneratorOptions) -> Generator:
    """The raw backend named by ``opts.backend`` (heavy imports happen here, not at import time)."""
    if opts.backend == "fake":
        from dpa_rag.generation.fake import FakeGenerator

        return FakeGenerator()
    if opts.backend == "hf":
        from dpa_rag.generation.hf import HFGenerator

        return HFGenerator(opts.model, dtype=opts.dtype, device=opts.device, batch_size=opts.batch_size,
                           attn_implementation=opts.attn_implementation)
    if opts.backend == "openai":
        from dpa_rag.generation.openai_compat import OpenAICompatibleGenerator

        return OpenAICompatibleGenerator(
            opts.model,
            base_url=opts.base_url,
            api_key_env=opts.api_key_env,
            max_concurrency=opts.max_concurrency,
            timeout=opts.timeout,
            max_retries=opts.max_retries,
            tokenizer=opts.tokenizer,
        )
    if opts.backend == "vllm":  # vLLM picks its own attention backend: attn_implementation is not passed
        from dpa_rag.generation.vllm_backend import VLLMGenerator

        return VLLMGenerator(
            opts.model, dtype=opts.dtype, tensor_parallel_size=opts.tensor_parallel_size,
            gpu_memory_utilization=opts.gpu_memory_utilization, max_model_len=opts.max_model_len, **opts.engine_args,
        )
    raise ValueError(f"unknown generation backend '{opts.backend}'")


def build_generator(
    opts: GeneratorOptions, backend: Generator | None = None, progress: bool = True
) -> CachedGenerator:
    """The backend (or the one given) behind the on-disk cache, batched by ``opts.batch_size``."""
    backend = backend or build_backend(opts)
    cache = GenerationCache((opts.cache_dir or default_cache_dir()) / "generations.sqlite") if opts.use_cache else None
    return CachedGenerator(backend, cache, batch_size=opts.batch_size, progress=progress)
