"""Rewrites inherit their original's gold answers, passages and preference labels (method.md §4, §12 #7).

No re-retrieval and no re-labelling: a rewrite asks the same thing, so it gets the original's retrieved passages
and the original's preference record. ``origin_id`` is kept on every inherited record, so splits can group a
question with its rewrites (:func:`group_split`) and no rewrite of a test question leaks into training.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from dpa_rag.data.schema import Preference, Question, RetrievalRecord

__all__ = ["group_split", "inherit_preferences", "inherit_retrieval", "origin_of"]

logger = logging.getLogger(__name__)

R = TypeVar("R")


def _origins(augmented: Sequence[Question]) -> list[Question]:
    for q in augmented:
        if not q.origin_id:
            raise ValueError(f"augmented question '{q.id}' has no origin_id")
    return list(augmented)


def inherit_preferences(
    preferences: Sequence[Preference], augmented_questions: Sequence[Question]
) -> list[Preference]:
    """Preference records for rewrites, copied from their originals' records.

    Everything of the original's record except ``id``, ``question`` and ``origin_id`` is deep-copied (answers,
    closed-book result, probes and labels, and any extra key); ``id`` and ``question`` are the rewrite's and
    ``origin_id`` is the original's id; ``strategy`` is set when the rewrite has one (as mining's own inheritance
    does). Rewrites whose original has no preference record are skipped (logged).

    Returns:
        The rewrites' records only, in the order of ``augmented_questions``; add them to the originals yourself.
    """
    by_id = {p.id: p for p in preferences}
    out: list[Preference] = []
    missing = 0
    for q in _origins(augmented_questions):
        orig = by_id.get(str(q.origin_id))
        if orig is None:
            missing += 1
            continue
        update: dict[str, Any] = {"id": q.id, "question": q.question, "origin_id": str(q.origin_id)}
        strategy = getattr(q, "strategy", None)
        if strategy is not None:
            update["strategy"] = strategy
        out.append(orig.model_copy(update=update, deep=True))
    if missing:
        logger.info("inherit_preferences: %d rewrite(s) skipped, their original has no preference record", missing)
    return out


def inherit_retrieval(records: list[RetrievalRecord], augmented: list[Question]) -> list[RetrievalRecord]:
    """Retrieval records for rewrites: the original's answers and ``ctxs`` (no re-retrieval).

    The rewrite keeps its own id, text and ``strategy`` (when set) and gets ``origin_id`` = the original's id.
    Rewrites whose original has no retrieval record are skipped (logged).
    """
    by_id = {r.id: r for r in records}
    out: list[RetrievalRecord] = []
    missing = 0
    for q in _origins(augmented):
        orig = by_id.get(str(q.origin_id))
        if orig is None:
            missing += 1
            continue
        update: dict[str, Any] = {"id": q.id, "question": q.question, "origin_id": str(q.origin_id)}
        strategy = getattr(q, "strategy", None)
        if strategy is not None:
            update["strategy"] = strategy
        data = orig.model_dump(mode="python")
        data.update(update)
        out.append(RetrievalRecord.model_validate(copy.deepcopy(data)))
    if missing:
        logger.info("inherit_retrieval: %d rewrite(s) skipped, their original has no retrieval record", missing)
    return out


def origin_of(record: Any) -> str:
    """The group key of a record (dict or model): its ``origin_id`` if set, else its own ``id``."""
    get = record.get if isinstance(record, Mapping) else lambda k: getattr(record, k, None)
    origin = get("origin_id")
    return str(origin if origin else get("id"))


def group_split(records: Sequence[R], fractions: Mapping[str, float], seed: int = 0) -> dict[str, list[R]]:
    """Split records so that an original and all its rewrites land in the same split.

    Groups (by :func:`origin_of`) are shuffled with ``seed`` and cut by the fractions (counted in groups; the last
    split takes the rounding remainder). Record order is kept inside each split.

    Args:
        records: dicts or models with ``id`` and optional ``origin_id``.
        fractions: e.g. ``{"train": 0.8, "valid": 0.1, "test": 0.1}``; non-negative, summing to 1.
        seed: shuffle seed.
    """
    if not fractions:
        raise ValueError("no split fractions given")
    if any(f < 0 for f in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {dict(fractions)}")
    groups = sorted({origin_of(r) for r in records})
    random.Random(seed).shuffle(groups)
    assign: dict[str, str] = {}
    start, acc = 0, 0.0
    names = list(fractions)
    for i, name in enumerate(names):
        acc += fractions[name]
        end = len(groups) if i == len(names) - 1 else round(acc * len(groups))
        for g in groups[start:end]:
            assign[g] = name
        start = end
    out: dict[str, list[R]] = {name: [] for name in names}
    for r in records:
        out[assign[origin_of(r)]].append(r)
    return out
