"""Preference categories of a probed passage: pure rules over the reader's scores (method.md §2.1, §2.2).

Each probed passage *d* of a question gets one of four categories from the closed-book answer (``before``) and the
answer with *d* alone (``after``):

* ``aligned`` — the passage helps (authors' ``category`` 1, a positive);
* ``unaligned`` — the passage hurts (authors' ``category`` 2, a negative);
* ``both_correct`` / ``both_wrong`` — neither (the paper discards them; the rank list uses them as middle grades);
* ``neutral`` — neither, under the graded ``loglik`` rule (its gain is between the two thresholds).

Three rules (:data:`LABEL_RULES`):

* ``hit`` (the paper's definition, default): correct ⇔ hit = 1 (gold is a substring of the answer).
  aligned = 0 → 1, unaligned = 1 → 0, both_correct = 1 → 1, both_wrong = 0 → 0.
* ``f1-delta`` (reproduces the authors' released labels): aligned ⇔ F1_after > F1_before, unaligned ⇔
  F1_after < F1_before; a tie (equal F1, never in the released sample) is both_correct if hit_after = 1, else
  both_wrong.
* ``loglik`` (method.md §13, graded): the passage's *gain* u = (best over golds of the reader's length-normalised
  log-probability of the gold answer with the passage) − (the same closed-book); aligned ⇔ u > τ⁺, unaligned ⇔
  u < −τ⁻, neutral otherwise (:func:`categorize_gain`). No generation is needed, and u orders the rank lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel

from dpa_rag.data.schema import ClosedBook, Probe
from dpa_rag.eval.metrics import f1, hit

__all__ = [
    "ALIGNED",
    "AUTHORS_CATEGORY",
    "BOTH_CORRECT",
    "BOTH_WRONG",
    "CATEGORIES",
    "DEFAULT_GAIN_THRESHOLDS",
    "LABEL_RULES",
    "NEUTRAL",
    "UNALIGNED",
    "LabelRule",
    "categorize",
    "categorize_gain",
    "normalize_rule",
    "rule_categories",
    "score",
]

ALIGNED = "aligned"
UNALIGNED = "unaligned"
BOTH_CORRECT = "both_correct"
BOTH_WRONG = "both_wrong"
NEUTRAL = "neutral"
CATEGORIES = (ALIGNED, UNALIGNED, BOTH_CORRECT, BOTH_WRONG, NEUTRAL)
_ANSWER_CATEGORIES = (ALIGNED, UNALIGNED, BOTH_CORRECT, BOTH_WRONG)


def rule_categories(rule: str) -> tuple[str, ...]:
    """The categories a rule can give: four for ``hit``/``f1-delta``, aligned/unaligned/neutral for ``loglik``."""
    return (ALIGNED, UNALIGNED, NEUTRAL) if normalize_rule(rule) == "loglik" else _ANSWER_CATEGORIES
AUTHORS_CATEGORY = {ALIGNED: 1, UNALIGNED: 2}
"""Our category → the authors' ``category`` field (only aligned and unaligned exist in their files)."""

LabelRule = Literal["hit", "f1-delta", "loglik"]
LABEL_RULES: tuple[str, ...] = ("hit", "f1-delta", "loglik")
DEFAULT_GAIN_THRESHOLDS = (0.5, 0.5)
"""``(τ⁺, τ⁻)`` of the ``loglik`` rule, in nats per answer token. With SmolLM2-135M on NQ, answer-bearing passages
averaged u = +2.65 and the others −0.34 (method.md §13), so ±0.5 separates clear help and harm from noise."""
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


def categorize_gain(gain: float, positive: float = 0.5, negative: float = 0.5) -> str:
    """The ``loglik`` rule's category of a passage with gain ``gain``: aligned above ``positive``, unaligned below
    ``-negative``, neutral otherwise."""
    if positive < 0 or negative < 0:
        raise ValueError(f"gain thresholds must be >= 0, got {positive} and {negative}")
    if gain > positive:
        return ALIGNED
    if gain < -negative:
        return UNALIGNED
    return NEUTRAL


def _scores(s: Mapping[str, Any] | BaseModel) -> Mapping[str, Any]:
    """A record's scores as a mapping (a :class:`ClosedBook`/:class:`Probe` without its unset fields and passage)."""
    return s.model_dump(exclude_none=True, exclude={"ctx"}) if isinstance(s, BaseModel) else s


def categorize(
    before: Mapping[str, Any] | ClosedBook,
    after: Mapping[str, Any] | Probe,
    rule: str = "hit",
    thresholds: tuple[float, float] = DEFAULT_GAIN_THRESHOLDS,
) -> str:
    """The category of a probed passage from the closed-book (``before``) and with-passage (``after``) scores.

    Args:
        before: ``{"hit", "f1"}`` of the closed-book answer (the authors' ``{"em", "f1"}`` also works), or a
            :class:`~dpa_rag.data.schema.ClosedBook`.
        after: the same for the answer with the passage, or a :class:`~dpa_rag.data.schema.Probe`.
        rule: ``"hit"``, ``"f1-delta"`` or ``"loglik"`` (see the module docstring; ``loglik`` reads ``after["gain"]``
            or, failing that, ``after["loglik"] - before["loglik"]``).
        thresholds: ``(τ⁺, τ⁻)`` of the ``loglik`` rule.

    Returns:
        One of :data:`CATEGORIES`.
    """
    rule = normalize_rule(rule)
    before, after = _scores(before), _scores(after)
    if rule == "loglik":
        if "gain" in after:
            gain = float(after["gain"])
        elif "loglik" in after and "loglik" in before:
            gain = float(after["loglik"]) - float(before["loglik"])
        else:
            raise KeyError("the loglik rule needs a probe 'gain' (mine with label_rule loglik)")
        return categorize_gain(gain, *thresholds)
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
