"""Point-wise preference loss: is this passage aligned with what the reader needs? (method.md §6.2).

* 1-logit head: ``BCEWithLogits(z, y)`` with ``y = 1`` aligned, ``0`` unaligned.
* two-class head: ``CE(z, y) = -log softmax(z)_y`` (the authors' loss; the paper's BCE, equivalent).

Mean over the records of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpa_rag.reranker.losses.base import LossOptions, Remap, RerankerLoss, RowBuilder

__all__ = ["PointwiseLoss"]


class PointwiseLoss(RerankerLoss):
    """Classification loss on one (query, passage) pair per record.

    Args:
        num_labels: 1 (single relevance logit, BCE-with-logits) or 2 (aligned/unaligned head, cross-entropy).

    Inputs:
        ``logits``: ``[B, num_labels]``; ``labels``: ``[B]`` with 1 = aligned, 0 = unaligned.

    Example:
        >>> loss = PointwiseLoss(num_labels=1)
        >>> loss(torch.tensor([[2.0], [-1.0]]), torch.tensor([1, 0]))
    """

    name = "point"

    def __init__(self, num_labels: int = 1) -> None:
        super().__init__()
        if num_labels not in (1, 2):
            raise ValueError(f"PointwiseLoss needs a model with 1 or 2 labels, got num_labels={num_labels}")
        self.num_labels = num_labels

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.num_labels:
            raise ValueError(
                f"PointwiseLoss expects logits of shape [B, {self.num_labels}], got {tuple(logits.shape)}"
            )
        if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"PointwiseLoss expects labels of shape [{logits.shape[0]}], got {tuple(labels.shape)}"
            )
        if logits.shape[0] == 0:
            raise ValueError("PointwiseLoss got an empty batch")
        if bool(((labels != 0) & (labels != 1)).any()):
            raise ValueError("PointwiseLoss labels must be 1 (aligned) or 0 (unaligned)")
        logits = logits.float()
        if self.num_labels == 1:
            return F.binary_cross_entropy_with_logits(logits[:, 0], labels.to(logits.dtype))
        return F.cross_entropy(logits, labels.long())

    @classmethod
    def from_options(cls, options: LossOptions) -> PointwiseLoss:
        return cls(num_labels=options.num_labels)

    @classmethod
    def add_rows(cls, records: Sequence[Any], rows: RowBuilder) -> dict[str, Any]:
        """One row per record: the classification pair (label 1 aligned, else 0)."""
        plan = {"rows": [rows.add(r.query, r.classification.text) for r in records],
                "labels": [1 if r.classification.label == 1 else 0 for r in records]}
        rows.end_group()
        return plan

    @classmethod
    def index_tensors(cls, plan: dict[str, Any], remap: Remap) -> dict[str, Tensor]:
        return {"point_idx": torch.tensor(remap(plan["rows"]), dtype=torch.long),
                "point_labels": torch.tensor(plan["labels"], dtype=torch.long)}

    def compute(self, out: Any, batch: dict[str, Any]) -> Tensor:
        return self(out.take("logits", batch["point_idx"]), batch["point_labels"])

    def get_config_dict(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels, "loss": "bce_with_logits" if self.num_labels == 1 else "cross_entropy"}
