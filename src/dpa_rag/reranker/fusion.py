"""Retriever fusion: blend the reranker's score with the retriever's rank, with a weight chosen on held-out questions.

A reranker aligned on a few hundred preference records can rank worse than the retriever it starts from (the bundled
MiniLM is a bi-encoder with a fresh head). Fusion makes "never worse than where it started" hold on the held-out
questions it is chosen on: per question list,

    fused_i = alpha * z(reranker_i) + (1 - alpha) * z(-log retriever_rank_i)

where ``z`` standardises within the list (a constant list becomes zeros). ``alpha = 1`` is the reranker's order,
``alpha = 0`` the retriever's order exactly, so the alpha picked by :func:`select_alpha` on a grid that holds both
ends ranks the held-out questions at least as well as either. ``train-reranker`` picks it on retrieval lists of
training questions the reranker never trained on and saves it in the model's ``config.json``
(``dpa_rag.retriever_fusion``); :class:`dpa_rag.reranker.Reranker` applies it (``fusion="saved"``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.eval.ranking import canonical_metric
from dpa_rag.reranker.metrics import answer_ranking_metrics

__all__ = ["DEFAULT_GRID", "fuse", "normalize_fusion", "resolve_alpha", "select_alpha", "safe_ranks"]

DEFAULT_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


def _standardise(xs: Sequence[float]) -> list[float]:
    n = len(xs)
    if n == 0:
        return []
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / n)
    if std < 1e-12:
        return [0.0] * n
    return [(x - mean) / std for x in xs]


def fuse(scores: Sequence[float], ranks: Sequence[int], alpha: float) -> list[float]:
    """Fused scores of one question's passages (higher is better).

    Args:
        scores: reranker scores.
        ranks: the retriever's 1-based ranks of the same passages.
        alpha: weight of the reranker in ``[0, 1]``.

    Raises:
        ValueError: lengths differ, a rank below 1, alpha outside ``[0, 1]``.
    """
    if len(scores) != len(ranks):
        raise ValueError(f"{len(scores)} scores for {len(ranks)} ranks")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if any(r < 1 for r in ranks):
        raise ValueError(f"retriever ranks are 1-based, got {min(ranks)}")
    zr = _standardise([float(s) for s in scores])
    zp = _standardise([-math.log(r) for r in ranks])
    return [alpha * a + (1.0 - alpha) * b for a, b in zip(zr, zp, strict=True)]


def select_alpha(
    records: Sequence[RetrievalRecord],
    scores: Sequence[Sequence[float]],
    grid: Sequence[float] = DEFAULT_GRID,
    metric: str = "mrr",
) -> tuple[float | None, dict[str, dict[str, float]]]:
    """The grid alpha with the best ``metric`` (a key of :func:`~dpa_rag.reranker.metrics.answer_ranking_metrics`:
    ``mrr``, ``hit@1``, ``hit@3``) of answer-bearing passages on ``records`` (file order = retriever rank).

    Ties go to the larger alpha (the more of the reranker). Returns ``(alpha, {str(alpha): metrics})``; alpha is
    ``None`` when no record has an answer-bearing passage (nothing to choose on).
    """
    if len(records) != len(scores):
        raise ValueError(f"{len(scores)} score lists for {len(records)} records")
    metric = canonical_metric(metric)  # hit_at_1 → hit@1
    table: dict[str, dict[str, float]] = {}
    best: tuple[float, float] | None = None
    for alpha in sorted(grid):
        fused = [fuse(s, list(range(1, len(s) + 1)), alpha) for s in scores]
        m = answer_ranking_metrics(records, fused)
        table[str(alpha)] = m
        if not m.get("n_questions"):
            return None, table
        key = (m[metric], alpha)
        if best is None or key >= best:
            best = key
    return (best[1] if best else None), table


def resolve_alpha(fusion: str | float, saved: dict[str, Any] | None) -> float | None:
    """The reranker weight to apply (``None`` = the reranker alone) for ``fusion`` = ``saved`` (the weight in the
    model's saved ``retriever_fusion`` settings, if any), ``off``, or a number in ``[0, 1]``.

    Raises:
        ValueError: anything else.
    """
    if fusion == "saved":
        alpha = (saved or {}).get("alpha")
        return None if alpha is None or float(alpha) >= 1.0 else float(alpha)
    if fusion == "off":
        return None
    try:
        alpha = float(fusion)
    except (TypeError, ValueError):
        raise ValueError(f"fusion must be 'saved', 'off' or a number in [0, 1]; got {fusion!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1]; got {alpha}")
    return None if alpha == 1.0 else alpha


def normalize_fusion(value: object) -> str:
    """A fusion setting as typed on the command line or read from YAML (``off`` → False, ``0.3`` → float) → str.

    Raises:
        ValueError: not ``saved``, ``off`` or a number in ``[0, 1]``.
    """
    if value is False:
        value = "off"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = repr(float(value))
    text = str(value).strip().lower()
    resolve_alpha(text, None)
    return text


def safe_ranks(values: Sequence[object]) -> list[int]:
    """1-based retriever ranks from ``retriever_rank`` values; a missing, non-integer or < 1 value (or a list with
    repeated ranks) falls back to the list position, which is the rank of a plain retrieval file."""
    ranks: list[int] = []
    for v in values:
        try:
            r = int(v)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return list(range(1, len(values) + 1))
        if r < 1 or r != v:
            return list(range(1, len(values) + 1))
        ranks.append(r)
    if len(set(ranks)) != len(ranks):
        return list(range(1, len(values) + 1))
    return ranks

