"""Supervised contrastive loss over (query, passage) pair representations (method.md §6.2, §12 #17).

``anchor="pairs"`` (default, the authors' code): the L2-normalised CLS vectors ``h`` of the pairs (q, pos_i) and
(q, neg_j) of one record, labels 1 for positives and 0 for negatives, every item an anchor (SupCon, Khosla et al.
2020)::

    L_a = -(τ/τ_base) · (1/|P(a)|) Σ_{p∈P(a)} log[ exp(h_a·h_p/τ) / Σ_{k≠a} exp(h_a·h_k/τ) ]

``P(a)`` = the other items with the same label. Mean over the anchors that have at least one positive, then over the
records that have such an anchor (with one positive and one negative no anchor has a partner: such a record adds
nothing). τ = τ_base = 0.07 by default.

``anchor="query"`` (the paper's description): the anchor is the CLS vector of the query encoded alone, positives are
the aligned passages' pair vectors and the denominator runs over all passages of the record::

    L = -(τ/τ_base) · (1/|P|) Σ_{p∈P} log[ exp(q·h_p/τ) / Σ_k exp(q·h_k/τ) ]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from dpa_rag.reranker.losses.base import LossOptions, Remap, RerankerLoss, RowBuilder, index_matrix

__all__ = ["ContrastiveLoss"]

# Finite "minus infinity" for masked logits: an all-masked row then has finite gradients (0, not NaN).
_NEG = -1e9


class ContrastiveLoss(RerankerLoss):
    """SupCon over each record's positive and negative pair representations (no projection head).

    Args:
        temperature: τ.
        base_temperature: τ_base (the loss is scaled by τ/τ_base).
        anchor: ``pairs`` (every pair representation is an anchor) or ``query`` (the query-alone CLS is the anchor).

    Inputs:
        ``features``: ``[B, n, H]`` pair representations (normalised here); ``labels``: ``[B, n]``, 1 = aligned,
        0 = unaligned; ``mask``: optional ``[B, n]`` bool, True for real items; ``query_features``: ``[B, H]``,
        required with ``anchor="query"``.
    """

    name = "contrastive"
    uses_logits = False

    def __init__(
        self, temperature: float = 0.07, base_temperature: float = 0.07, anchor: Literal["pairs", "query"] = "pairs"
    ) -> None:
        super().__init__()
        if temperature <= 0 or base_temperature <= 0:
            raise ValueError("ContrastiveLoss temperatures must be positive")
        if anchor not in ("pairs", "query"):
            raise ValueError(f"ContrastiveLoss anchor must be 'pairs' or 'query', got {anchor!r}")
        self.temperature = float(temperature)
        self.base_temperature = float(base_temperature)
        self.anchor = anchor

    def _check(self, features: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
        if features.ndim != 3:
            raise ValueError(f"ContrastiveLoss expects features of shape [B, n, H], got {tuple(features.shape)}")
        if labels.shape != features.shape[:2]:
            raise ValueError(
                f"ContrastiveLoss labels shape {tuple(labels.shape)} != features [B, n] {tuple(features.shape[:2])}"
            )
        if features.shape[0] == 0:
            raise ValueError("ContrastiveLoss got an empty batch")
        if mask is None:
            return torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
        if mask.shape != labels.shape:
            raise ValueError(f"ContrastiveLoss mask shape {tuple(mask.shape)} != labels shape {tuple(labels.shape)}")
        return mask.bool()

    def forward(
        self, features: Tensor, labels: Tensor, mask: Tensor | None = None, query_features: Tensor | None = None
    ) -> Tensor:
        mask = self._check(features, labels, mask)
        z = F.normalize(features.float(), dim=-1)
        scale = self.temperature / self.base_temperature
        if self.anchor == "query":
            if query_features is None or query_features.shape != (features.shape[0], features.shape[2]):
                got = None if query_features is None else tuple(query_features.shape)
                raise ValueError(f"ContrastiveLoss(anchor='query') needs query_features [B, H], got {got}")
            q = F.normalize(query_features.float(), dim=-1)
            sim = torch.einsum("bh,bnh->bn", q, z) / self.temperature
            log_prob = sim - torch.logsumexp(sim.masked_fill(~mask, _NEG), dim=1, keepdim=True)
            pos = mask & (labels == 1)
            n_pos = pos.sum(dim=1)
            per_record = -scale * torch.where(pos, log_prob, 0.0).sum(dim=1) / n_pos.clamp(min=1)
            ok = n_pos > 0
        else:
            n = features.shape[1]
            sim = z @ z.transpose(1, 2) / self.temperature  # [B, n, n]
            eye = torch.eye(n, dtype=torch.bool, device=z.device).unsqueeze(0)
            others = mask.unsqueeze(1) & mask.unsqueeze(2) & ~eye
            log_denom = torch.logsumexp(sim.masked_fill(~others, _NEG), dim=2, keepdim=True)
            log_prob = sim - log_denom
            pos = others & (labels.unsqueeze(1) == labels.unsqueeze(2))
            n_pos = pos.sum(dim=2)
            per_anchor = -scale * torch.where(pos, log_prob, 0.0).sum(dim=2) / n_pos.clamp(min=1)
            anchors = mask & (n_pos > 0)
            per_record = torch.where(anchors, per_anchor, 0.0).sum(dim=1) / anchors.sum(dim=1).clamp(min=1)
            ok = anchors.any(dim=1)
        if not bool(ok.any()):
            return features.sum() * 0.0  # no anchor has a positive: zero loss, still part of the graph
        return per_record[ok].mean()

    @classmethod
    def from_options(cls, options: LossOptions) -> ContrastiveLoss:
        return cls(options.temperature, options.base_temperature, anchor=options.contrastive_anchor)  # type: ignore[arg-type]

    @classmethod
    def check_record(cls, record: Any) -> str | None:
        if not record.positive or not record.negative:
            return (f"the contrastive loss needs ≥ 1 positive and ≥ 1 negative, got {len(record.positive)} and "
                    f"{len(record.negative)}")
        return None

    @classmethod
    def add_rows(cls, records: Sequence[Any], rows: RowBuilder) -> dict[str, Any]:
        """The positives' rows (one group), the negatives' (another) and, with ``query_anchor``, each query alone."""
        pos = [[rows.add(r.query, d) for d in r.positive] for r in records]
        rows.end_group()
        neg = [[rows.add(r.query, d) for d in r.negative] for r in records]
        rows.end_group()
        plan: dict[str, Any] = {"con": [p + n for p, n in zip(pos, neg, strict=False)],
                                "labels": [[1] * len(p) + [0] * len(n) for p, n in zip(pos, neg, strict=False)]}
        if rows.options.query_anchor:
            plan["query"] = [rows.add(r.query, None) for r in records]
            rows.end_group()
        return plan

    @classmethod
    def index_tensors(cls, plan: dict[str, Any], remap: Remap) -> dict[str, Tensor]:
        out = dict(zip(("con_idx", "con_mask"), index_matrix([remap(x) for x in plan["con"]]), strict=True))
        out["con_labels"], _ = index_matrix(plan["labels"])
        if "query" in plan:
            out["query_idx"] = torch.tensor(remap(plan["query"]), dtype=torch.long)
        return out

    def compute(self, out: Any, batch: dict[str, Any]) -> Tensor:
        feats = out.take("reps", batch["con_idx"], batch["con_mask"])
        query = None
        if self.anchor == "query":
            if "query_idx" not in batch:
                raise ValueError("the query-anchored contrastive loss needs a batch collated with query_anchor=True")
            query = out.take("reps", batch["query_idx"])
        return self(feats, batch["con_labels"], batch["con_mask"], query_features=query)

    def get_config_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "base_temperature": self.base_temperature, "anchor": self.anchor}
