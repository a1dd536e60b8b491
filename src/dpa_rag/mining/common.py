"""Shared by the data builders: reading preferences, inheriting them for augmented rewrites, splitting by question.

``preferences.jsonl`` holds one :class:`~dpa_rag.data.schema.Preference` per line (with its
:class:`~dpa_rag.data.schema.ClosedBook` result and :class:`~dpa_rag.data.schema.Probe` list); :func:`load_preferences`
validates every line through it and names the file and line of the first bad one.

Augmented rewrites (from the augmentation stage) are JSONL records ``{"id", "question", "origin_id", "strategy"}``.
A rewrite inherits its original's golds, probed passages, answers and categories (method.md §4: no re-retrieval, no
re-labelling); its ``query`` is the rewrite's text. Records sharing an ``origin_id`` always land in the same split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dpa_rag.data.schema import Preference, Question
from dpa_rag.io import DataError, read_records
from dpa_rag.mining.labels import categorize, normalize_rule

__all__ = [
    "inherit_augmented",
    "load_augmented",
    "load_preferences",
    "mine_config_retrieval",
    "preference_from",
    "relabel",
    "resolve_preferences",
    "split_by_group",
]

logger = logging.getLogger(__name__)


def resolve_preferences(path: str | Path) -> Path:
    """``path`` itself, or ``path/preferences.jsonl`` when ``path`` is a mine output folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "preferences.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such preferences file (run `dpa-rag mine` first)")
    return path


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors())


def preference_from(record: Any, where: str) -> Preference:
    """Validate one JSON object as a :class:`Preference`; ``where`` (``"file:line"``) starts the error message.

    Raises:
        DataError: ``"<where>: not a preference record: probes.0.category: Input should be 'aligned', …"``.
    """
    try:
        return Preference.model_validate(record)
    except ValidationError as exc:
        raise DataError(f"{where}: not a preference record: {_validation_message(exc)}") from None


def load_preferences(path: str | Path) -> list[Preference]:
    """Read ``preferences.jsonl`` (file or mine folder), validating every record as a :class:`Preference`.

    Raises:
        DataError: a malformed record or a repeated question id (file and line named), or no record at all.
    """
    path = resolve_preferences(path)
    out: list[Preference] = []
    seen: set[str] = set()
    for pos, rec in read_records(path):
        pref = preference_from(rec, f"{path}:{pos}")
        if pref.id in seen:
            raise DataError(f"{path}:{pos}: duplicate question id '{pref.id}'")
        seen.add(pref.id)
        out.append(pref)
    if not out:
        raise DataError(f"{path}: no preference records")
    return out


def relabel(prefs: Sequence[Preference], rule: str) -> list[Preference]:
    """Copies of ``prefs`` whose probe categories are recomputed with ``rule`` from the stored scores."""
    out = []
    if normalize_rule(rule) != "loglik" and any(p.closed_book.hit is None for p in prefs):
        raise DataError(f"these preferences were mined with label_rule loglik (no generated answers for most "
                        f"questions), so they cannot be relabelled with {rule}; use label_rule stored")
    for p in prefs:
        probes = [pr.model_copy(update={"category": categorize(p.closed_book, pr, rule)}) for pr in p.probes]
        out.append(p.model_copy(update={"probes": probes}))
    return out


def load_augmented(path: str | Path) -> list[Question]:
    """Read augmented rewrites: JSONL/JSON records with ``id``, ``question``, ``origin_id`` (``strategy`` optional).

    Returns:
        One :class:`Question` per rewrite (no answers: a rewrite inherits its original's), with ``origin_id`` and
        ``strategy`` (``None`` when not given).
    """
    out = []
    for pos, rec in read_records(path):
        for key in ("question", "origin_id"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise DataError(f"{path}:{pos}: augmented record needs a non-empty string '{key}'")
        rid = str(rec.get("id") or f"{rec['origin_id']}-aug{pos}")
        out.append(Question(id=rid, question=rec["question"].strip(), origin_id=str(rec["origin_id"]),
                            strategy=rec.get("strategy")))
    return out


def inherit_augmented(
    originals: Sequence[Preference], augmented: Sequence[Question]
) -> tuple[list[Preference], int]:
    """Preference records for the rewrites whose original is in ``originals`` (see
    :func:`dpa_rag.augment.inherit.inherit_preferences`: the original's answers, probes and labels, deep-copied).

    Returns:
        ``(records, n_orphans)``: the inherited records (in rewrite order) and how many rewrites had no original.

    Raises:
        DataError: a rewrite's id is already used by another question.
    """
    from dpa_rag.augment.inherit import inherit_preferences

    taken = {o.id for o in originals}
    for a in augmented:
        if a.id in taken:
            raise DataError(f"augmented id '{a.id}' is already used by another question")
        taken.add(a.id)
    out = inherit_preferences(list(originals), list(augmented))
    orphans = len(augmented) - len(out)
    if orphans:
        logger.warning("%d augmented question(s) have no original among the inputs and are skipped", orphans)
    return out, orphans


def split_by_group(
    records: Sequence[Preference], fractions: Sequence[float], seed: int
) -> list[list[Preference]]:
    """Split records into ``len(fractions)`` parts so an original and its rewrites share a part (seeded); a thin
    positional wrapper over :func:`dpa_rag.augment.inherit.group_split`."""
    from dpa_rag.augment.inherit import group_split

    parts = group_split(records, {str(i): f for i, f in enumerate(fractions)}, seed)
    return [parts[str(i)] for i in range(len(fractions))]


def mine_config(preferences: str | Path) -> dict[str, Any]:
    """The mine stage's ``config.yaml`` next to ``preferences.jsonl``: ``{}`` if there is none or it is unreadable."""
    import yaml

    cfg_path = resolve_preferences(preferences).parent / "config.yaml"
    if not cfg_path.exists():
        return {}
    try:
        data = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def mine_config_retrieval(preferences: str | Path) -> Path | None:
    """The retrieval file the mine stage read, from its ``config.yaml`` next to ``preferences.jsonl`` (if any)."""
    value = mine_config(preferences).get("retrieval")
    return Path(value) if value else None

