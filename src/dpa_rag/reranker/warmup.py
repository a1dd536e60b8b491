"""Relevance warm-up: a short pass that teaches the head plain relevance before preference alignment.

A backbone without a reranking head starts from a random head; the authors' 20-record files cannot teach relevance,
so the aligned reranker can end up worse than BM25 order (FlagEmbedding #858, #291). The warm-up trains, for the
SAME training questions only, each question's answer-bearing passages (``has_answer``) against retrieved passages
without the answer: listwise softmax cross-entropy over ``[positive, negative_1..n]`` on the ranking score (the
logit, or ``z_1`` of the two-class head). It needs a DPR-style retrieval file of the training questions
(``--warmup-retrieval``); without one it is skipped with a log line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer

from dpa_rag.data.authors import RerankerTrainRecord
from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.eval.metrics import normalize_answer
from dpa_rag.reranker.model import encode_pairs, ranking_scores

__all__ = [
    "RelevanceExample",
    "RelevanceWarmupTrainer",
    "WarmupCollator",
    "build_warmup_examples",
    "make_warmup_dataset",
]

logger = logging.getLogger(__name__)


@dataclass
class RelevanceExample:
    """One question, one answer-bearing passage and its retrieved negatives (rendered passages)."""

    query: str
    positive: str
    negatives: list[str]


def build_warmup_examples(
    train: Sequence[RerankerTrainRecord], retrieval: Sequence[RetrievalRecord], negatives: int = 3
) -> list[RelevanceExample]:
    """Warm-up examples from the retrieval records whose question is a training question (normalised match).

    Each answer-bearing passage becomes one example with the first ``negatives`` retrieved passages without the
    answer (retriever order); questions lacking either side are skipped.
    """
    wanted = {normalize_answer(r.query) for r in train}
    out: list[RelevanceExample] = []
    matched = 0
    for rec in retrieval:
        if normalize_answer(rec.question) not in wanted:
            continue
        matched += 1
        pos = [c.render() for c in rec.ctxs if c.has_answer]
        neg = [c.render() for c in rec.ctxs if c.has_answer is False][:negatives]
        if not pos or not neg:
            continue
        out += [RelevanceExample(rec.question, p, neg) for p in pos]
    logger.info("relevance warm-up: %d examples from %d of %d training questions", len(out), matched, len(wanted))
    return out


class _Examples(Dataset):
    def __init__(self, examples: Sequence[RelevanceExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> RelevanceExample:
        return self.examples[i]


class WarmupCollator:
    """Tokenise ``[positive, negatives...]`` pairs of each example in one batch (group lengths in ``sizes``)."""

    def __init__(self, tokenizer: Any, max_length: int = 512) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[RelevanceExample]) -> dict[str, Any]:
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


class RelevanceWarmupTrainer(Trainer):
    """``Trainer`` whose loss is listwise CE with the positive first in every group."""

    loss_is_scaled_for_ga = False

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        out = encode_pairs(model, inputs)
        scores = ranking_scores(out.logits).float()
        losses, start = [], 0
        for n in inputs["sizes"]:
            losses.append(-F.log_softmax(scores[start : start + n], dim=0)[0])
            start += n
        loss = torch.stack(losses).mean()
        return (loss, out) if return_outputs else loss


def make_warmup_dataset(examples: Sequence[RelevanceExample]) -> Dataset:
    """Examples as a map-style dataset for :class:`RelevanceWarmupTrainer`."""
    return _Examples(examples)
