"""The distilled warm-up's loss: list-wise KL divergence to a teacher's order (method.md §13).

``KL(softmax(t / T) || softmax(s))`` per list of consecutive rows (``sizes``), ``t`` = the teacher's scores, ``T`` =
the teacher temperature, ``s`` = the student's ranking scores at temperature 1; mean over the lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dpa_rag.reranker.losses.base import LossOptions, RerankerLoss
from dpa_rag.reranker.model import ranking_scores

__all__ = ["DistillCollator", "DistillKLLoss", "distill_kl_loss"]


def distill_kl_loss(student: Tensor, teacher: Tensor, sizes: Sequence[int], temperature: float) -> Tensor:
    """Mean over lists of ``KL(softmax(teacher / T) || softmax(student))``; rows of consecutive lists of ``sizes``."""
    losses, start = [], 0
    for n in sizes:
        s = F.log_softmax(student[start : start + n].float(), dim=0)
        t = F.log_softmax(teacher[start : start + n].float() / temperature, dim=0)
        losses.append(F.kl_div(s, t, log_target=True, reduction="sum"))
        start += n
    return torch.stack(losses).mean()


class DistillCollator:
    """Tokenise each example's ``(query, passage)`` pairs; ``teacher`` = the scores in row order, ``sizes`` = list
    lengths."""

    def __init__(self, tokenizer: Any, max_length: int = 512) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        a, b, t, sizes = [], [], [], []
        for ex in examples:
            a += [ex.query] * len(ex.passages)
            b += ex.passages
            t += ex.teacher
            sizes.append(len(ex.passages))
        enc = self.tokenizer(
            a, b, truncation="longest_first", max_length=self.max_length, padding=True, return_tensors="pt"
        )
        return {**dict(enc), "teacher": torch.tensor(t, dtype=torch.float32), "sizes": sizes}


class DistillKLLoss(RerankerLoss):
    """:func:`distill_kl_loss` on the ranking score of a :class:`~dpa_rag.reranker.warmup.DistillCollator` batch.

    Args:
        temperature: the teacher's temperature ``T``.
    """

    name = "distill-kl"

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"DistillKLLoss temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    @classmethod
    def from_options(cls, options: LossOptions) -> DistillKLLoss:
        return cls(options.warmup_temperature)

    @classmethod
    def collator(cls, tokenizer: Any, max_length: int) -> DistillCollator:
        """Its rows: each example's list of passages with the teacher's scores (:class:`DistillCollator`)."""
        return DistillCollator(tokenizer, max_length)

    def forward(self, student: Tensor, teacher: Tensor, sizes: Sequence[int]) -> Tensor:
        return distill_kl_loss(student, teacher, sizes, self.temperature)

    def compute(self, out: Any, batch: dict[str, Any]) -> Tensor:
        return self(ranking_scores(out.logits), batch["teacher"], batch["sizes"])

    def get_config_dict(self) -> dict[str, Any]:
        return {"loss": "listwise_kl", "temperature": self.temperature}
