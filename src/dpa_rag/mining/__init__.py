"""Preference knowledge extraction (``mine``) and the reranker/LLM data builders (method.md §2, §3, §7)."""

from __future__ import annotations

from dpa_rag.mining.labels import ALIGNED, BOTH_CORRECT, BOTH_WRONG, CATEGORIES, UNALIGNED, categorize, score
from dpa_rag.mining.llm_data import LLMDataConfig
from dpa_rag.mining.mine import MineConfig, probe_ranks
from dpa_rag.mining.prompts import qa_prompt
from dpa_rag.mining.reranker_data import RerankerDataConfig

__all__ = [
    "ALIGNED",
    "BOTH_CORRECT",
    "BOTH_WRONG",
    "CATEGORIES",
    "UNALIGNED",
    "LLMDataConfig",
    "MineConfig",
    "RerankerDataConfig",
    "categorize",
    "probe_ranks",
    "qa_prompt",
    "score",
]
