"""Ranking metrics of per-question lists, with one key scheme for every stage: ``hit@k``, ``ndcg@k``, ``mrr``,
``n_questions`` (pure functions, no torch).

:func:`ranking_metrics` is the one place a mean over questions is taken: the retrieve stage's answer hit@k
(:func:`dpa_rag.retrieval.retrieve.retrieval_metrics`), the reranker's held-out answer ranking
(:func:`dpa_rag.reranker.metrics.answer_ranking_metrics`, also what the retriever-fusion weight is chosen by), its
validation/test pair ranking (:class:`dpa_rag.reranker.evaluation.PairEvaluator`) and its utility nDCG
(:func:`dpa_rag.reranker.metrics.utility_metrics`) all call it. :func:`canonical_metric` maps the older spellings
(``hit_at_1``, ``utility_ndcg_at_3``, ``n_ranked_questions``) to these keys, so config values that name a metric
(``metric_for_best_model``) and metric files written before keep working.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from dpa_rag.eval.metrics import hit_at_k, mrr, ndcg_at_k

__all__ = ["canonical_metric", "rank_order", "ranking_metrics"]

_OLD_AT_K = re.compile(r"(^|_)(hit|ndcg)_at_(\d+)$")
_OLD_NAMES = {"n_ranked_questions": "n_questions"}


def canonical_metric(name: str) -> str:
    """A metric name in this module's key scheme: ``hit_at_3`` → ``hit@3``, ``utility_ndcg_at_3`` →
    ``utility_ndcg@3``, ``eval_n_ranked_questions`` → ``eval_n_questions``; any other name unchanged."""
    for old, new in _OLD_NAMES.items():
        if name == old or name.endswith("_" + old):
            return name[: len(name) - len(old)] + new
    return _OLD_AT_K.sub(r"\1\2@\3", name)


def rank_order(scores: Sequence[float]) -> list[int]:
    """Positions sorted by score, best first; ties keep the given order (a stable sort)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def ranking_metrics(
    relevance: Sequence[Sequence[float | bool]],
    scores: Sequence[Sequence[float]] | None = None,
    *,
    ks: Sequence[int] = (1, 3),
    ndcg: bool = False,
) -> dict[str, float]:
    """Mean MRR, hit@k (and nDCG@k) over questions.

    Args:
        relevance: per question, the relevance of its items (0/1 or graded gains; an item is relevant when > 0),
            in ranked order, or in any order when ``scores`` is given.
        scores: per question, a score per item: each list is ranked by it (:func:`rank_order`: best first, ties in
            the given order); ``None``: the given order is the ranking.
        ks: the cut-offs of ``hit@k`` (and ``ndcg@k``).
        ndcg: also report ``ndcg@k`` (graded gains are used as they are).

    Returns:
        ``{"mrr", "ndcg@k" (if asked), "hit@k" (for each k), "n_questions"}``; every mean is 0.0 when there is no
        question.

    Raises:
        ValueError: ``scores`` does not match ``relevance`` (number of questions, or of items in a question).
    """
    rows: list[Sequence[float | bool]] = list(relevance)
    if scores is not None:
        if len(scores) != len(rows):
            raise ValueError(f"{len(scores)} score lists for {len(rows)} relevance lists")
        ranked = []
        for i, (rel, s) in enumerate(zip(rows, scores, strict=True)):
            if len(s) != len(rel):
                raise ValueError(f"question {i}: {len(s)} scores for {len(rel)} items")
            ranked.append([rel[j] for j in rank_order(s)])
        rows = ranked
    n = len(rows)

    def mean(values: list[float]) -> float:
        return sum(values) / n if n else 0.0

    out = {"mrr": mean([mrr(r) for r in rows])}
    for k in ks:
        if ndcg:
            out[f"ndcg@{k}"] = mean([ndcg_at_k([float(x) for x in r], k) for r in rows])
        out[f"hit@{k}"] = mean([hit_at_k(r, k) for r in rows])
    out["n_questions"] = float(n)
    return out
