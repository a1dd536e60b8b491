"""The relevance warm-up's loss: listwise softmax cross-entropy with the answer-bearing passage first.

Each example of a :class:`~dpa_rag.reranker.warmup.WarmupCollator` batch is a list ``[positive, negative_1..n]`` of
consecutive rows (``sizes``); the loss is ``-log softmax(s)_0`` per list on the ranking score ``s`` (the logit, or
``z_1`` of the two-class head), averaged over the lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpa_rag.reranker.losses.base import LossOptions, RerankerLoss
from dpa_rag.reranker.model import ranking_scores

__all__ = ["RelevanceCELoss", "WarmupCollator"]


class WarmupCollator:
    """Tokenise ``[positive, negatives...]`` pairs of each example in one batch (group lengths in ``sizes``)."""

    def __init__(self, tokenizer: Any, max_length: int = 512) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        a, b, sizes = [], [], []
        for ex in examples:
            docs = [ex.positive, *ex.negatives]
            a += [ex.query] * len(docs)
            b += docs
            sizes.append(len(docs))
        enc = self.tokenizer(
            a, b, truncation="longest_first", max_length=self.max_length, padding=True, return_tensors="pt"
        )
        return {**dict(enc), "sizes": sizes}


class RelevanceCELoss(RerankerLoss):
    """Listwise CE over consecutive lists whose first item is the positive.

    Inputs:
        ``scores``: ``[N]`` ranking scores; ``sizes``: list lengths (summing to ``N``).
    """

    name = "relevance-ce"

    @classmethod
    def from_options(cls, options: LossOptions) -> RelevanceCELoss:
        return cls()

    @classmethod
    def collator(cls, tokenizer: Any, max_length: int) -> WarmupCollator:
        """Its rows: each example's ``[positive, negatives...]`` pairs (:class:`WarmupCollator`)."""
        return WarmupCollator(tokenizer, max_length)

    def forward(self, scores: Tensor, sizes: Sequence[int]) -> Tensor:
        if sum(sizes) != scores.shape[0]:
            raise ValueError(f"RelevanceCELoss: {scores.shape[0]} scores for lists of {sum(sizes)} items")
        losses, start = [], 0
        for n in sizes:
            losses.append(-F.log_softmax(scores[start : start + n], dim=0)[0])
            start += n
        return torch.stack(losses).mean()

    def compute(self, out: Any, batch: dict[str, Any]) -> Tensor:
        return self(ranking_scores(out.logits).float(), batch["sizes"])

    def get_config_dict(self) -> dict[str, Any]:
        return {"loss": "listwise_ce_positive_first"}
