"""Reranker evaluation: aligned-class classification and per-question ranking (method.md §6.4, §11 #1–#3).

:class:`PairEvaluator` scores the authors' valid/test pairs (``question``, ``ctx``, ``category``) and returns
``dict[str, float]``:

* ``precision``/``recall``/``f1``/``accuracy`` of the aligned class (prediction: argmax for the two-class head,
  ``sigmoid(logit) ≥ 0.5`` for the 1-logit head; 0 instead of a division by zero);
* ``mrr``, ``ndcg_at_k``, ``hit_at_k`` over per-question lists (pairs grouped by question, sorted by score, ties in
  file order; relevant = aligned), on the questions with ≥ 2 pairs and ≥ 1 aligned one (``n_ranked_questions``;
  absent when there are none, as in the authors' example files with one pair per question).

:func:`retrieval_metrics` gives MRR / hit@1 / hit@3 of answer-bearing (``has_answer``) passages in a retrieval
file's order or in a reranker's order (the "never worse than BM25" report).

:func:`utility_metrics` ranks held-out questions' probed passages (``build-reranker-data``'s ``*_lists.jsonl``,
graded ``loglik`` preferences) against the reader's own gains: nDCG@k with gain⁺ = max(gain, 0) as the graded
relevance, MRR of aligned passages, the mean gain of the top-1 passage and how often it holds the answer — in the
retriever's order, a model's order, or the oracle's (by gain: the ceiling).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dpa_rag.data.authors import RerankerPairRecord
from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.eval.metrics import hit_at_k, mrr, ndcg_at_k
from dpa_rag.reranker.model import inference_scores
from dpa_rag.reranker.rerank import predict_logits

__all__ = [
    "PairEvaluator",
    "classification_metrics",
    "load_utility_lists",
    "ranking_metrics",
    "retrieval_metrics",
    "utility_metrics",
    "utility_table",
]

logger = logging.getLogger(__name__)


def classification_metrics(predicted: Sequence[bool], gold: Sequence[bool]) -> dict[str, float]:
    """Precision, recall, F1 of the positive (aligned) class and accuracy; 0 where a ratio is undefined."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold labels")
    tp = sum(p and g for p, g in zip(predicted, gold, strict=False))
    fp = sum(p and not g for p, g in zip(predicted, gold, strict=False))
    fn = sum(g and not p for p, g in zip(predicted, gold, strict=False))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(p == g for p, g in zip(predicted, gold, strict=False)) / len(gold) if gold else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "accuracy": accuracy}


def ranking_metrics(
    groups: Sequence[Sequence[tuple[float, bool]]], k_values: Sequence[int] = (1, 3, 5)
) -> dict[str, float]:
    """Mean MRR, nDCG@k and hit@k over lists of ``(score, relevant)`` (each list sorted here by score, stable)."""
    rows = []
    for items in groups:
        order = sorted(range(len(items)), key=lambda i: -items[i][0])
        rows.append([int(items[i][1]) for i in order])
    if not rows:
        return {}
    out = {"mrr": sum(mrr(r) for r in rows) / len(rows)}
    for k in k_values:
        out[f"ndcg_at_{k}"] = sum(ndcg_at_k(r, k) for r in rows) / len(rows)
        out[f"hit_at_{k}"] = sum(hit_at_k(r, k) for r in rows) / len(rows)
    return out


def load_utility_lists(path: str) -> list[dict[str, Any]]:
    """Read a ``*_lists.jsonl`` file of ``build-reranker-data`` (question + probed ctxs with ``gain``)."""
    from dpa_rag.io import DataError, read_records

    out = []
    for pos, rec in read_records(path):
        ctxs = rec.get("ctxs")
        if not isinstance(rec.get("question"), str) or not isinstance(ctxs, list) or len(ctxs) < 2:
            raise DataError(f"{path}:{pos}: a utility list needs 'question' and at least 2 'ctxs'")
        for c in ctxs:
            if not isinstance(c, dict) or "text" not in c or not isinstance(c.get("gain"), (int, float)):
                raise DataError(f"{path}:{pos}: every ctx needs 'text' and a numeric 'gain'")
        out.append(rec)
    return out


def utility_pairs(lists: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """All ``(question, rendered passage)`` pairs of the lists, list by list."""
    from dpa_rag.data.schema import format_passage

    return [(r["question"], format_passage(str(c.get("title") or ""), str(c["text"])))
            for r in lists for c in r["ctxs"]]


def utility_metrics(
    lists: Sequence[dict[str, Any]], scores: Sequence[Sequence[float]] | str = "retriever",
    k_values: Sequence[int] = (1, 3, 5),
) -> dict[str, float]:
    """Utility-ranking metrics of held-out lists ordered by ``scores`` (per list), ``"retriever"`` (by rank) or
    ``"oracle"`` (by gain). Ties keep the retriever's order."""
    rows: list[list[dict[str, Any]]] = []
    for i, rec in enumerate(lists):
        ctxs = sorted(rec["ctxs"], key=lambda c: c.get("rank", 0))
        if scores == "oracle":
            key = [float(c["gain"]) for c in ctxs]
        elif scores == "retriever":
            key = [-float(j) for j in range(len(ctxs))]
        else:
            by_id = dict(zip([id(c) for c in rec["ctxs"]], scores[i], strict=True))
            key = [by_id[id(c)] for c in ctxs]
        order = sorted(range(len(ctxs)), key=lambda j: -key[j])
        rows.append([ctxs[j] for j in order])
    if not rows:
        return {"n_questions": 0.0}
    n = len(rows)
    out: dict[str, float] = {}
    for k in k_values:
        out[f"ndcg_at_{k}"] = sum(ndcg_at_k([max(float(c["gain"]), 0.0) for c in r], k) for r in rows) / n
    with_aligned = [r for r in rows if any(c.get("category") == "aligned" for c in r)]
    out["mrr_aligned"] = (sum(mrr([c.get("category") == "aligned" for c in r]) for r in with_aligned)
                          / len(with_aligned)) if with_aligned else 0.0
    out["top1_gain"] = sum(float(r[0]["gain"]) for r in rows) / n
    known = [r for r in rows if r[0].get("has_answer") is not None]
    if known:
        out["top1_has_answer"] = sum(bool(r[0]["has_answer"]) for r in known) / len(known)
    out["n_questions"] = float(n)
    out["n_with_aligned"] = float(len(with_aligned))
    return out


def utility_table(report: dict[str, dict[str, float]]) -> str:
    """A markdown table of :func:`utility_metrics` rows (``{row name: metrics}``)."""
    cols = [c for c in ("ndcg_at_1", "ndcg_at_3", "ndcg_at_5", "mrr_aligned", "top1_gain", "top1_has_answer")
            if any(c in m for m in report.values())]
    lines = ["| order | " + " | ".join(cols) + " | questions |", "|---|" + "---:|" * (len(cols) + 1)]
    for name, m in report.items():
        cells = [f"{m[c]:.3f}" if c in m else "–" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {int(m.get('n_questions', 0))} |")
    return "\n".join(lines) + "\n"


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
            pairs = utility_pairs(self.lists)
            flat = inference_scores(predict_logits(model, tokenizer, pairs, batch_size=self.batch_size,
                                                   max_length=self.max_length), self.score).tolist()
            per, pos = [], 0
            for r in self.lists:
                per.append(flat[pos : pos + len(r["ctxs"])])
                pos += len(r["ctxs"])
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
            metrics.update(ranking_metrics(groups, self.k_values))
            metrics["n_ranked_questions"] = float(len(groups))
        metrics["n_pairs"] = float(len(self.records))
        return metrics


def retrieval_metrics(
    records: Sequence[RetrievalRecord], scores: Sequence[Sequence[float]] | None = None
) -> dict[str, float]:
    """MRR, hit@1, hit@3 of answer-bearing passages, in file order (``scores=None``) or sorted by ``scores``.

    Questions without any ``has_answer`` passage are skipped (``n_questions`` counts the rest); ties keep file order.
    """
    rows = []
    for i, rec in enumerate(records):
        rel = [bool(c.has_answer) for c in rec.ctxs]
        if not any(rel):
            continue
        if scores is not None:
            order = sorted(range(len(rel)), key=lambda j: -scores[i][j])
            rel = [rel[j] for j in order]
        rows.append(rel)
    if not rows:
        return {"n_questions": 0.0}
    return {
        "mrr": sum(mrr(r) for r in rows) / len(rows),
        "hit_at_1": sum(hit_at_k(r, 1) for r in rows) / len(rows),
        "hit_at_3": sum(hit_at_k(r, 3) for r in rows) / len(rows),
        "n_questions": float(len(rows)),
    }
