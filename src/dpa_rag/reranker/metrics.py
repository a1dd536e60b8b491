"""Reranker metrics as pure functions (no torch): classification, per-question ranking, retrieval order, utility.

* :func:`classification_metrics`: precision/recall/F1 of the aligned class and accuracy (0 instead of a division by
  zero);
* :func:`ranking_metrics`: ``mrr``, ``ndcg_at_k``, ``hit_at_k`` over per-question lists of ``(score, relevant)``;
* :func:`retrieval_metrics`: MRR / hit@1 / hit@3 of answer-bearing (``has_answer``) passages in a retrieval file's
  order or in a reranker's order (the "never worse than BM25" report; :func:`dpa_rag.reranker.fusion.select_alpha`
  chooses its weight with it);
* :func:`utility_metrics` / :func:`utility_table`: held-out probed lists (``build-reranker-data``'s
  ``*_lists.jsonl``, graded ``loglik`` preferences) ranked against the reader's own gains.

:mod:`dpa_rag.reranker.evaluation` re-exports them next to :class:`~dpa_rag.reranker.evaluation.PairEvaluator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.eval.metrics import hit_at_k, mrr, ndcg_at_k

__all__ = ["classification_metrics", "ranking_metrics", "retrieval_metrics", "utility_metrics", "utility_table"]


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
