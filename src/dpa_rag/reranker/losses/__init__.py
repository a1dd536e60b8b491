"""The reranker's losses, one per module (method.md §6.2), and the registry that names them.

Preference alignment: :class:`PointwiseLoss` (``point``), :class:`PairwiseLoss` (``pair``), :class:`ContrastiveLoss`
(``contrastive``) and :class:`ListwiseLoss` (``listwise``: ListNet on graded gains, not trained by default);
relevance warm-up: :class:`RelevanceCELoss` (``relevance-ce``), :class:`DistillKLLoss` (``distill-kl``). Every loss
subclasses :class:`RerankerLoss` (:mod:`.base`); names map to classes in :mod:`.registry` (torch-free). The loss
classes are imported lazily, so ``dpa_rag.reranker.losses.registry`` stays torch-free.
"""

from __future__ import annotations

from typing import Any

from dpa_rag.reranker.losses.registry import LOSS_NAMES, get_loss_class, register_loss

__all__ = [
    "LOSS_NAMES",
    "ContrastiveLoss",
    "DistillKLLoss",
    "ListwiseLoss",
    "LossOptions",
    "PairwiseLoss",
    "PointwiseLoss",
    "RelevanceCELoss",
    "RerankerLoss",
    "RowBuilder",
    "get_loss_class",
    "register_loss",
]

_WHERE = {
    "ContrastiveLoss": "dpa_rag.reranker.losses.contrastive",
    "DistillKLLoss": "dpa_rag.reranker.losses.distill",
    "ListwiseLoss": "dpa_rag.reranker.losses.listwise",
    "PairwiseLoss": "dpa_rag.reranker.losses.pairwise",
    "PointwiseLoss": "dpa_rag.reranker.losses.pointwise",
    "RelevanceCELoss": "dpa_rag.reranker.losses.relevance",
    "LossOptions": "dpa_rag.reranker.losses.base",
    "RerankerLoss": "dpa_rag.reranker.losses.base",
    "RowBuilder": "dpa_rag.reranker.losses.base",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'dpa_rag.reranker.losses' has no attribute {name!r}")
