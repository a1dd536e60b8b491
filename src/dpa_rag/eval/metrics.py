"""Answer and ranking metrics as pure functions (method.md §2.1).

* :func:`normalize_answer` — SQuAD normalisation: lower-case, drop ASCII punctuation, drop a/an/the, collapse spaces.
* :func:`hit` — 1 iff some normalised gold is a *substring* of the normalised prediction (the paper's Hits@1; the
  authors' files call it ``em``). :func:`hit_word` is the whole-word variant ("no" does not match "north").
* :func:`exact_match` — normalised equality with some gold.
* :func:`f1` — max over golds of token F1 (multiset overlap); 0 when there is no overlap (never divides by zero).
* Ranking: :func:`recall_at_k`, :func:`hit_at_k`, :func:`mrr`, :func:`ndcg_at_k` over 0/1 relevance lists.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "exact_match",
    "f1",
    "has_answer",
    "hit",
    "hit_at_k",
    "hit_word",
    "mrr",
    "ndcg_at_k",
    "normalize_answer",
    "recall_at_k",
    "score_answer",
]

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower-case, remove ASCII punctuation, remove articles (a/an/the), collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, golds: Sequence[str]) -> int:
    """1 iff the normalised prediction equals some normalised gold."""
    p = normalize_answer(prediction)
    return int(any(p == normalize_answer(g) for g in golds))


def hit(prediction: str, golds: Sequence[str]) -> int:
    """1 iff some non-empty normalised gold is a substring of the normalised prediction (cover-EM, Hits@1)."""
    p = normalize_answer(prediction)
    for g in golds:
        ng = normalize_answer(g)
        if ng and ng in p:
            return 1
    return 0


def hit_word(prediction: str, golds: Sequence[str]) -> int:
    """Like :func:`hit` but the gold must match whole tokens of the prediction ("no" does not hit "north")."""
    p = f" {normalize_answer(prediction)} "
    for g in golds:
        ng = normalize_answer(g)
        if ng and f" {ng} " in p:
            return 1
    return 0


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: Sequence[str]) -> float:
    """Max over golds of SQuAD token F1 between normalised prediction and gold."""
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for g in golds:
        best = max(best, _token_f1(pred_tokens, normalize_answer(g).split()))
    return best


def score_answer(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """All answer metrics of one prediction: ``{"hit", "hit_word", "em", "f1"}``."""
    return {
        "hit": float(hit(prediction, golds)),
        "hit_word": float(hit_word(prediction, golds)),
        "em": float(exact_match(prediction, golds)),
        "f1": f1(prediction, golds),
    }


def has_answer(passage: str, golds: Sequence[str]) -> bool:
    """Whether a passage contains a gold answer as whole normalised tokens (DPR's ``has_answer``)."""
    return bool(hit_word(passage, golds))


def passage_has_answer(ctx: object, golds: Sequence[str]) -> bool:
    """A retrieved passage's ``has_answer`` flag when the retrieval file stored one, else :func:`has_answer` of its
    rendered text (any object with ``has_answer`` and ``render()``, e.g. :class:`~dpa_rag.data.schema.Ctx`)."""
    stored = getattr(ctx, "has_answer", None)
    return bool(stored) if stored is not None else has_answer(ctx.render(), golds)  # type: ignore[attr-defined]


def recall_at_k(relevant: Sequence[int | bool], k: int, n_relevant: int | None = None) -> float:
    """Share of the relevant items found in the first ``k`` (``n_relevant`` defaults to those in the list)."""
    total = sum(bool(r) for r in relevant) if n_relevant is None else n_relevant
    if total == 0:
        return 0.0
    return sum(bool(r) for r in relevant[:k]) / total


def hit_at_k(relevant: Sequence[int | bool], k: int) -> float:
    """1.0 iff a relevant item is among the first ``k``."""
    return float(any(relevant[:k]))


def mrr(relevant: Sequence[int | bool], k: int | None = None) -> float:
    """Reciprocal rank of the first relevant item (0 if none within ``k``)."""
    for i, r in enumerate(relevant[:k] if k else relevant, start=1):
        if r:
            return 1.0 / i
    return 0.0


def ndcg_at_k(gains: Sequence[float], k: int) -> float:
    """nDCG@k with graded (or 0/1) gains in ranked order; 0 when no item has a positive gain."""
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
    ideal = sorted(gains, reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0
