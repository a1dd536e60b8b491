"""Reranker–LLM alignment (method.md §6): cross-encoder, three preference losses, loss weighting, trainer, inference.

Heavy modules (the trainer) are imported lazily, so ``from dpa_rag.reranker import Reranker`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ContrastiveLoss",
    "FusedCollator",
    "PairEvaluator",
    "PairwiseLoss",
    "PointwiseLoss",
    "Reranker",
    "RerankerTrainer",
    "TrainRerankerConfig",
    "build_weighting",
    "load_reranker_model",
    "min_norm_weights",
    "train_reranker",
]

_WHERE = {
    "ContrastiveLoss": "dpa_rag.reranker.losses",
    "PairwiseLoss": "dpa_rag.reranker.losses",
    "PointwiseLoss": "dpa_rag.reranker.losses",
    "FusedCollator": "dpa_rag.reranker.data",
    "PairEvaluator": "dpa_rag.reranker.evaluation",
    "Reranker": "dpa_rag.reranker.rerank",
    "RerankerTrainer": "dpa_rag.reranker.trainer",
    "TrainRerankerConfig": "dpa_rag.reranker.config",
    "build_weighting": "dpa_rag.reranker.weighting",
    "min_norm_weights": "dpa_rag.reranker.weighting",
    "load_reranker_model": "dpa_rag.reranker.model",
    "train_reranker": "dpa_rag.reranker.train",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'dpa_rag.reranker' has no attribute {name!r}")
