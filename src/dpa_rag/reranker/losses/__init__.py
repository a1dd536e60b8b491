"""The three DPA-RAG reranker losses, one per module (method.md §6.2)."""

from __future__ import annotations

from dpa_rag.reranker.loss_names import LOSS_NAMES
from dpa_rag.reranker.losses.contrastive import ContrastiveLoss
from dpa_rag.reranker.losses.pairwise import PairwiseLoss
from dpa_rag.reranker.losses.pointwise import PointwiseLoss

__all__ = ["LOSS_NAMES", "ContrastiveLoss", "PairwiseLoss", "PointwiseLoss"]
