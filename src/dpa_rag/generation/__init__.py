"""Text generation backends (hf, openai-compatible, vllm, fake) behind one protocol and an on-disk cache."""

from __future__ import annotations

from dpa_rag.generation.base import (
    GenerationParams,
    Generator,
    GeneratorOptions,
    LoglikScorer,
    LoglikUnsupported,
    Prompt,
    supports_loglik,
)
from dpa_rag.generation.cache import CachedGenerator, GenerationCache
from dpa_rag.generation.factory import build_backend, build_generator

__all__ = [
    "CachedGenerator",
    "GenerationCache",
    "GenerationParams",
    "Generator",
    "GeneratorOptions",
    "LoglikScorer",
    "LoglikUnsupported",
    "Prompt",
    "build_backend",
    "build_generator",
    "supports_loglik",
]
