"""List-wise loss on graded gains (ListNet, Cao et al. 2007): per question, the cross-entropy between the target
distribution ``softmax(gain / T)`` over a probed list and the reranker's score distribution ``softmax(s)``.

Its rows: every passage of the record's ``rank_list`` with its gain from the record's ``rank_gains`` (one finite
number per ``rank_list`` passage, the reader's gain; graded preference files). ``s`` is the ranking score (the logit,
or ``z_1`` of the two-class head; a bi-encoder's scaled cosine). Mean over the records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpa_rag.reranker.losses.base import LossOptions, Remap, RerankerLoss, RowBuilder, index_matrix

__all__ = ["GAINS_KEY", "ListwiseLoss"]

GAINS_KEY = "rank_gains"  # the training record's gains, aligned with its rank_list


def _gains(record: Any) -> Any:
    return (getattr(record, "model_extra", None) or {}).get(GAINS_KEY)


class ListwiseLoss(RerankerLoss):
    """ListNet cross-entropy against ``softmax(gain / temperature)``.

    Args:
        temperature: ``T`` of the target distribution (smaller: closer to putting all mass on the best gain).

    Inputs:
        ``scores``: ``[B, L]`` ranking scores; ``gains``: ``[B, L]``; ``mask``: optional ``[B, L]`` bool, True for
        real list items (each row needs ≥ 2).
    """

    name = "listwise"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"ListwiseLoss temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    @classmethod
    def from_options(cls, options: LossOptions) -> ListwiseLoss:
        return cls(options.listwise_temperature)

    @classmethod
    def check_record(cls, record: Any) -> str | None:
        gains = _gains(record)
        if not isinstance(gains, list) or len(gains) != len(record.rank_list) or len(gains) < 2:
            return (f"the listwise loss needs '{GAINS_KEY}': one gain per rank_list passage (≥ 2), got "
                    f"{gains!r} for {len(record.rank_list)} passages")
        if not all(isinstance(g, (int, float)) and math.isfinite(g) for g in gains):
            return f"the listwise loss needs finite numeric '{GAINS_KEY}', got {gains!r}"
        return None

    @classmethod
    def add_rows(cls, records: Sequence[Any], rows: RowBuilder) -> dict[str, Any]:
        """One row per ``rank_list`` passage; the gains ride along."""
        plan = {"lists": [[rows.add(r.query, d) for d in r.rank_list] for r in records],
                "gains": [[float(g) for g in _gains(r)] for r in records]}
        rows.end_group()
        return plan

    @classmethod
    def index_tensors(cls, plan: dict[str, Any], remap: Remap) -> dict[str, Tensor]:
        idx, mask = index_matrix([remap(x) for x in plan["lists"]])
        gains = torch.zeros(idx.shape, dtype=torch.float32)
        for i, g in enumerate(plan["gains"]):
            gains[i, : len(g)] = torch.tensor(g, dtype=torch.float32)
        return {"list_idx": idx, "list_mask": mask, "list_gains": gains}

    def forward(self, scores: Tensor, gains: Tensor, mask: Tensor | None = None) -> Tensor:
        if scores.ndim != 2 or gains.shape != scores.shape:
            raise ValueError(f"ListwiseLoss expects scores and gains of one shape [B, L], got {tuple(scores.shape)} "
                             f"and {tuple(gains.shape)}")
        if mask is None:
            mask = torch.ones_like(scores, dtype=torch.bool)
        if bool((mask.sum(dim=1) < 2).any()):
            raise ValueError("ListwiseLoss needs at least 2 items in every list")
        scores, gains = scores.float(), gains.float()
        log_p = F.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
        target = F.softmax((gains / self.temperature).masked_fill(~mask, float("-inf")), dim=1)
        per_list = -torch.where(mask, target * log_p, torch.zeros_like(log_p)).sum(dim=1)
        return per_list.mean()

    def compute(self, out: Any, batch: dict[str, Any]) -> Tensor:
        logits = out.take("logits", batch["list_idx"], batch["list_mask"])  # [B, L, C]
        return self(logits[..., -1], batch["list_gains"], batch["list_mask"])

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "target": f"softmax({GAINS_KEY} / T)"}
