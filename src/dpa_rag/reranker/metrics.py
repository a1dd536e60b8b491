"""Reranker metrics as pure functions (no torch): classification, per-question ranking, retrieval order, utility.

* :func:`classification_metrics`: precision/recall/F1 of the aligned class and accuracy (0 instead of a division by
  zero);
* :func:`answer_ranking_metrics`: ``mrr``, ``hit@1``, ``hit@3``, ``n_questions`` of answer-bearing (``has_answer``)
  passages in a retrieval file's order or in a reranker's order (the "never worse than BM25" report;
  :func:`dpa_rag.reranker.fusion.select_alpha` chooses its weight with it);
* :func:`utility_metrics` / :func:`utility_table`: held-out probed lists (``build-reranker-data``'s
  ``*_lists.jsonl``, graded ``loglik`` preferences) ranked against the reader's own gains (``ndcg@k``, ...).

The means over questions (and the key scheme ``hit@k``, ``ndcg@k``, ``mrr``, ``n_questions``) are
:func:`dpa_rag.eval.ranking.ranking_metrics`'s. :mod:`dpa_rag.reranker.evaluation` re-exports these functions next to
:class:`~dpa_rag.reranker.evaluation.PairEvaluator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.eval.ranking import canonical_metric, rank_order, ranking_metrics

__all__ = ["answer_ranking_metrics", "classification_metrics", "utility_metrics", "utility_table"]


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
        rows.append([ctxs[j] for j in rank_order(key)])
    if not rows:
        return {"n_questions": 0.0}
    n = len(rows)
    graded = ranking_metrics([[max(float(c["gain"]), 0.0) for c in r] for r in rows], ks=k_values, ndcg=True)
    out: dict[str, float] = {f"ndcg@{k}": graded[f"ndcg@{k}"] for k in k_values}
    with_aligned = [r for r in rows if any(c.get("category") == "aligned" for c in r)]
    out["mrr_aligned"] = ranking_metrics([[c.get("category") == "aligned" for c in r] for r in with_aligned])["mrr"]
    out["top1_gain"] = sum(float(r[0]["gain"]) for r in rows) / n
    known = [r for r in rows if r[0].get("has_answer") is not None]
    if known:
        out["top1_has_answer"] = sum(bool(r[0]["has_answer"]) for r in known) / len(known)
    out["n_questions"] = float(n)
    out["n_with_aligned"] = float(len(with_aligned))
    return out


def utility_table(report: dict[str, dict[str, float]]) -> str:
    """A markdown table of :func:`utility_metrics` rows (``{row name: metrics}``; older files' ``ndcg_at_k`` keys are
    read as ``ndcg@k``)."""
    report = {name: {canonical_metric(k): v for k, v in m.items()} for name, m in report.items()}
    cols = [c for c in ("ndcg@1", "ndcg@3", "ndcg@5", "mrr_aligned", "top1_gain", "top1_has_answer")
            if any(c in m for m in report.values())]
    lines = ["| order | " + " | ".join(cols) + " | questions |", "|---|" + "---:|" * (len(cols) + 1)]
    for name, m in report.items():
        cells = [f"{m[c]:.3f}" if c in m else "–" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {int(m.get('n_questions', 0))} |")
    return "\n".join(lines) + "\n"


def answer_ranking_metrics(
    records: Sequence[RetrievalRecord], scores: Sequence[Sequence[float]] | None = None
) -> dict[str, float]:
    """``mrr``, ``hit@1``, ``hit@3`` of answer-bearing passages, in file order (``scores=None``) or sorted by
    ``scores`` (per record, one per ctx; ties keep file order).

    Questions without any ``has_answer`` passage are skipped (``n_questions`` counts the rest); with none left the
    result is ``{"n_questions": 0.0}`` (nothing to rank).
    """
    keep = [i for i, rec in enumerate(records) if any(bool(c.has_answer) for c in rec.ctxs)]
    if not keep:
        return {"n_questions": 0.0}
    relevance = [[bool(c.has_answer) for c in records[i].ctxs] for i in keep]
    return ranking_metrics(relevance, None if scores is None else [scores[i] for i in keep], ks=(1, 3))
