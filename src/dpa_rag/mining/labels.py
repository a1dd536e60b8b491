"""Preference categories of a probed passage: pure rules over the reader's scores (method.md §2.1, §2.2).

Each probed passage *d* of a question gets one of four categories from the closed-book answer (``before``) and the
answer with *d* alone (``after``):

* ``aligned`` — the passage helps (authors' ``category`` 1, a positive);
* ``unaligned`` — the passage hurts (authors' ``category`` 2, a negative);
* ``both_correct`` / ``both_wrong`` — neither (the paper discards them; the rank list uses them as middle grades).

Two rules (:data:`LABEL_RULES`):

* ``hit`` (the paper's definition, default): correct ⇔ hit = 1 (gold is a substring of the answer).
  aligned = 0 → 1, unaligned = 1 → 0, both_correct = 1 → 1, both_wrong = 0 → 0.
* ``f1-delta`` (reproduces the authors' released labels): aligned ⇔ F1_after > F1_before, unaligned ⇔
  F1_after < F1_before; a tie (equal F1, never in the released sample) is both_correct if hit_after = 1, else
  both_wrong.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from dpa_rag.eval.metrics import f1, hit

__all__ = [
    "ALIGNED",
    "AUTHORS_CATEGORY",
    "BOTH_CORRECT",
    "BOTH_WRONG",
    "CATEGORIES",
    "LABEL_RULES",
    "UNALIGNED",
    "LabelRule",
    "categorize",
    "normalize_rule",
    "score",
]

ALIGNED = "aligned"
UNALIGNED = "unaligned"
BOTH_CORRECT = "both_correct"
BOTH_WRONG = "both_wrong"
CATEGORIES = (ALIGNED, UNALIGNED, BOTH_CORRECT, BOTH_WRONG)
AUTHORS_CATEGORY = {ALIGNED: 1, UNALIGNED: 2}
"""Our category → the authors' ``category`` field (only aligned and unaligned exist in their files)."""

LabelRule = Literal["hit", "f1-delta"]
LABEL_RULES: tuple[str, ...] = ("hit", "f1-delta")
_EPS = 1e-9


def normalize_rule(rule: str) -> str:
    """Accept ``f1_delta`` as a spelling of ``f1-delta``; raise ``ValueError`` on an unknown rule."""
    r = rule.strip().lower().replace("_", "-")
    if r not in LABEL_RULES:
        raise ValueError(f"unknown label rule '{rule}' (known: {', '.join(LABEL_RULES)})")
    return r


def score(answer: str, golds: Sequence[str]) -> dict[str, Any]:
    """``{"hit": 0|1, "f1": float}`` of one answer against the gold answers (method.md §2.1)."""
    return {"hit": int(hit(answer, golds)), "f1": float(f1(answer, golds))}


def _get(s: Mapping[str, Any], key: str, alt: str) -> float:
    if key in s:
        return float(s[key])
    if alt in s:
        return float(s[alt])
    raise KeyError(f"score has neither '{key}' nor '{alt}': {dict(s)}")


def categorize(before: Mapping[str, Any], after: Mapping[str, Any], rule: str = "hit") -> str:
    """The category of a probed passage from the closed-book (``before``) and with-passage (``after``) scores.

    Args:
        before: ``{"hit", "f1"}`` of the closed-book answer (the authors' ``{"em", "f1"}`` also works).
        after: the same for the answer with the passage.
        rule: ``"hit"`` or ``"f1-delta"`` (see the module docstring).

    Returns:
        One of :data:`CATEGORIES`.
    """
    rule = normalize_rule(rule)
    hit_before, hit_after = _get(before, "hit", "em") >= 0.5, _get(after, "hit", "em") >= 0.5
    if rule == "hit":
        if hit_before:
            return BOTH_CORRECT if hit_after else UNALIGNED
        return ALIGNED if hit_after else BOTH_WRONG
    delta = _get(after, "f1", "f1") - _get(before, "f1", "f1")
    if delta > _EPS:
        return ALIGNED
    if delta < -_EPS:
        return UNALIGNED
    return BOTH_CORRECT if hit_after else BOTH_WRONG
