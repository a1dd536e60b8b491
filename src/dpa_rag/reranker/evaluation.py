"""Reranker evaluation: aligned-class classification and per-question ranking (method.md §6.4, §11 #1–#3).

:class:`PairEvaluator` scores the authors' valid/test pairs (``question``, ``ctx``, ``category``) and returns
``dict[str, float]``:

* ``precision``/``recall``/``f1``/``accuracy`` of the aligned class (prediction: argmax for the two-class head,
  ``sigmoid(logit) ≥ 0.5`` for the 1-logit head; 0 instead of a division by zero);
* ``mrr``, ``ndcg@k``, ``hit@k`` over per-question lists (pairs grouped by question, sorted by score, ties in
  file order; relevant = aligned), on the questions with ≥ 2 pairs and ≥ 1 aligned one (``n_questions``;
  absent when there are none, as in the authors' example files with one pair per question):
  :func:`dpa_rag.eval.ranking.ranking_metrics`, the one ranking function and key scheme of every stage.

:func:`answer_ranking_metrics` gives ``mrr``/``hit@1``/``hit@3`` of answer-bearing (``has_answer``) passages in a
retrieval file's order or in a reranker's order (the "never worse than BM25" report).

The metric functions live in :mod:`dpa_rag.reranker.metrics` (pure, no torch; re-exported here), the scoring in
:mod:`dpa_rag.reranker.inference`.

:func:`utility_metrics` ranks held-out questions' probed passages (``build-reranker-data``'s ``*_lists.jsonl``,
graded ``loglik`` preferences) against the reader's own gains: nDCG@k with gain⁺ = max(gain, 0) as the graded
relevance, MRR of aligned passages, the mean gain of the top-1 passage and how often it holds the answer — in the
retriever's order, a model's order, or the oracle's (by gain: the ceiling).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dpa_rag.data.reranker_records import RerankerPairRecord
from dpa_rag.eval.ranking import ranking_metrics
from dpa_rag.reranker.inference import predict_logits, score_lists
from dpa_rag.reranker.metrics import (
    answer_ranking_metrics,
    classification_metrics,
    utility_metrics,
    utility_table,
)
from dpa_rag.reranker.model import inference_scores

__all__ = [
    "PairEvaluator",
    "answer_ranking_metrics",
    "classification_metrics",
    "load_utility_lists",
    "score_utility_lists",
    "utility_lists",
    "utility_metrics",
    "utility_table",
]

logger = logging.getLogger(__name__)


def load_utility_lists(path: str) -> list[dict[str, Any]]:
    """Read a ``*_lists.jsonl`` file of ``build-reranker-data`` (question + probed ctxs with ``gain``)."""
    from dpa_rag.io import DataError, read_records

    out = []
    for pos, rec in read_records(path):
        ctxs = rec.get("ctxs")
        if not isinstance(rec.get("question"), str) or not isinstance(ctxs, list) or len(ctxs) < 2:
            raise DataError(f"{path}:{pos}: a utility list needs 'question' and at least 2 'ctxs'")
        for c in ctxs:
            gain = c.get("gain") if isinstance(c, dict) else None
            if "text" not in (c or {}) or not isinstance(gain, (int, float)) or not math.isfinite(gain):
                raise DataError(f"{path}:{pos}: every ctx needs 'text' and a finite numeric 'gain'")
        out.append(rec)
    return out


def utility_lists(lists: Sequence[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Each utility list's question with its rendered passages (for :func:`dpa_rag.reranker.inference.score_lists`)."""
    from dpa_rag.data.schema import format_passage

    return [(r["question"], [format_passage(str(c.get("title") or ""), str(c["text"])) for c in r["ctxs"]])
            for r in lists]


def score_utility_lists(model: nn.Module, tokenizer: Any, lists: Sequence[dict[str, Any]],
                        batch_size: int | None = None, max_length: int = 512,
                        score: str = "prob") -> list[list[float]]:
    """The model's score of every passage of every utility list (the ``scores`` of :func:`utility_metrics`)."""
    return score_lists(model, tokenizer, utility_lists(lists), batch_size, max_length, score)


class PairEvaluator:
    """Evaluate a cross-encoder on the authors' valid/test pair records.

    Args:
        records: the pair records.
        batch_size: pairs per forward (default: 16 on a CPU, 64 elsewhere).
        max_length: truncation length.
        k_values: cut-offs of nDCG@k and hit@k.
        score: inference score of a two-class head for the ranking metrics (``prob`` or ``z1``).
    """

    def __init__(
        self,
        records: Sequence[RerankerPairRecord],
        batch_size: int | None = None,
        max_length: int = 512,
        k_values: Sequence[int] = (1, 3, 5),
        score: str = "prob",
        lists: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        if not records and not lists:
            raise ValueError("PairEvaluator needs at least one record or utility list")
        self.records = list(records)
        self.lists = list(lists or [])
        self.batch_size = batch_size
        self.max_length = max_length
        self.k_values = tuple(k_values)
        self.score = score

    def __call__(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.lists:
            per = score_utility_lists(model, tokenizer, self.lists, self.batch_size, self.max_length, self.score)
            metrics.update({f"utility_{k}": v for k, v in utility_metrics(self.lists, per, self.k_values).items()})
        if not self.records:
            return metrics
        pairs = [(r.question, r.ctx) for r in self.records]
        logits = predict_logits(model, tokenizer, pairs, batch_size=self.batch_size, max_length=self.max_length)
        if logits.shape[1] == 1:
            predicted = (logits[:, 0] >= 0).tolist()  # sigmoid(z) >= 0.5
        else:
            predicted = (torch.argmax(logits, dim=1) == 1).tolist()
        gold = [r.category == 1 for r in self.records]
        metrics.update(classification_metrics(predicted, gold))
        scores = inference_scores(logits, self.score).tolist()
        by_question: OrderedDict[str, list[tuple[float, bool]]] = OrderedDict()
        for s, r, g in zip(scores, self.records, gold, strict=False):
            by_question.setdefault(r.question, []).append((s, g))
        groups = [v for v in by_question.values() if len(v) >= 2 and any(g for _, g in v)]
        if groups:
            metrics.update(ranking_metrics([[g for _, g in v] for v in groups], [[s for s, _ in v] for v in groups],
                                           ks=self.k_values, ndcg=True))
        metrics["n_pairs"] = float(len(self.records))
        return metrics
