"""Pair-wise preference loss over a ranked list (method.md §6.2).

For a record's list ``d_1 ≻ d_2 ≻ … ≻ d_L`` (most preferred first) and scores ``s_i``::

    L_record = mean_{i<j} -log σ(s_i - s_j)          (every ordered pair, L(L-1)/2 of them)
    L = mean over records

With equal list lengths this is the authors' ``(1/(6B)) Σ_records Σ_{i<j}`` for lists of 4. Lists may have any
length ≥ 2; shorter lists are right-padded and masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpa_rag.reranker.losses.base import LossOptions, Remap, RerankerLoss, RowBuilder, index_matrix

__all__ = ["PairwiseLoss"]


class PairwiseLoss(RerankerLoss):
    """RankNet-style logistic loss over all ordered pairs of each record's rank list.

    Args:
        margin: optional margin inside the sigmoid, ``-log σ(s_i - s_j - margin)`` (0 = the authors' loss).

    Inputs:
        ``scores``: ``[B, L]`` ranking scores (the logit, or ``z_1`` of the two-class head), list order = preference
        order; ``mask``: optional ``[B, L]`` bool, True for real list items (each row needs ≥ 2, left-aligned).
    """

    name = "pair"

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, scores: Tensor, mask: Tensor | None = None) -> Tensor:
        if scores.ndim != 2:
            raise ValueError(f"PairwiseLoss expects scores of shape [B, L], got {tuple(scores.shape)}")
        b, length = scores.shape
        if b == 0:
            raise ValueError("PairwiseLoss got an empty batch")
        if mask is None:
            mask = torch.ones_like(scores, dtype=torch.bool)
        elif mask.shape != scores.shape:
            raise ValueError(f"PairwiseLoss mask shape {tuple(mask.shape)} != scores shape {tuple(scores.shape)}")
        mask = mask.bool()
        counts = mask.sum(dim=1)
        if bool((counts < 2).any()):
            raise ValueError("PairwiseLoss needs at least 2 ranked items per record")
        scores = scores.float()
        diff = scores.unsqueeze(2) - scores.unsqueeze(1) - self.margin  # [B, L, L]: s_i - s_j
        upper = torch.triu(torch.ones(length, length, dtype=torch.bool, device=scores.device), diagonal=1)
        valid = upper.unsqueeze(0) & mask.unsqueeze(2) & mask.unsqueeze(1)
        per_pair = -F.logsigmoid(diff) * valid
        n_pairs = valid.sum(dim=(1, 2)).to(scores.dtype)
        return (per_pair.sum(dim=(1, 2)) / n_pairs).mean()

    @classmethod
    def from_options(cls, options: LossOptions) -> PairwiseLoss:
        return cls(margin=options.pair_margin)

    @classmethod
    def check_record(cls, record: Any) -> str | None:
        if len(record.rank_list) < 2:
            return f"the pair-wise loss needs ≥ 2 rank_list passages, got {len(record.rank_list)}"
        return None

    @classmethod
    def add_rows(cls, records: Sequence[Any], rows: RowBuilder) -> dict[str, Any]:
        """One row per ``rank_list`` passage, most preferred first."""
        plan = {"rank": [[rows.add(r.query, d) for d in r.rank_list] for r in records]}
        rows.end_group()
        return plan

    @classmethod
    def index_tensors(cls, plan: dict[str, Any], remap: Remap) -> dict[str, Tensor]:
        idx, mask = index_matrix([remap(x) for x in plan["rank"]])
        return {"rank_idx": idx, "rank_mask": mask}

    def compute(self, out: Any, batch: dict[str, Any]) -> Tensor:
        logits = out.take("logits", batch["rank_idx"], batch["rank_mask"])  # [B, L, C]
        return self(logits[..., -1], batch["rank_mask"])  # s = the logit or z_1

    def get_config_dict(self) -> dict[str, Any]:
        return {"margin": self.margin, "pairs": "all i<j", "reduction": "mean over pairs, then records"}
