"""Paired comparison of systems answering the same questions: per-question scores, bootstrap CIs, a markdown table.

* :func:`paired_table` — ``{system: prediction records}`` and the baselines → one row per (system, baseline, metric)
  with the difference in points (×100) and its paired bootstrap interval
  (:func:`~dpa_rag.eval.bootstrap.paired_bootstrap`).
* :func:`paired_markdown` — those rows as a table, one line per (system, baseline) pair.

Records are aligned by their ``id``; both systems must answer the same questions (an error names the file or the
system otherwise). Questions without gold answers are not scored (as in
:func:`~dpa_rag.eval.evaluate.evaluate_predictions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dpa_rag.eval.bootstrap import paired_bootstrap
from dpa_rag.eval.metrics import exact_match, f1, hit
from dpa_rag.io import DataError

__all__ = ["PAIRED_METRICS", "paired_markdown", "paired_table", "question_scores"]

# metric key (as in evaluate's metrics.json) -> (scoring function, column header)
PAIRED_METRICS = {"hits@1": (hit, "Hits@1"), "em": (exact_match, "EM"), "f1": (f1, "F1")}
_GOLD_KEYS = ("answers", "golden_answers", "reference", "answer")
_PRED_KEYS = ("prediction", "pred")


def _golds(rec: Mapping[str, Any]) -> list[str]:
    for key in _GOLD_KEYS:
        if key in rec:
            val = rec[key]
            return [val] if isinstance(val, str) else [str(g) for g in val]
    return []


def question_scores(
    records: Sequence[Mapping[str, Any]], metrics: Sequence[str] = tuple(PAIRED_METRICS), source: str = "predictions"
) -> dict[str, dict[str, float]]:
    """``{question id: {metric: score in [0, 1]}}`` of the records with gold answers (in input order).

    Raises:
        DataError: a record has no ``id``, or an id occurs twice; the message starts with ``source``.
    """
    out: dict[str, dict[str, float]] = {}
    for pos, rec in enumerate(records, start=1):
        qid = rec.get("id")
        if qid is None or qid == "":
            raise DataError(f"{source}: record {pos} has no 'id' (needed to pair questions across systems)")
        qid = str(qid)
        if qid in out:
            raise DataError(f"{source}: question id '{qid}' occurs twice")
        golds = _golds(rec)
        pred = next((rec[k] for k in _PRED_KEYS if k in rec), "")
        out[qid] = {m: float(PAIRED_METRICS[m][0](pred, golds)) for m in metrics} if golds else {}
    return out


def _aligned_ids(
    scores: Mapping[str, Mapping[str, float]],
    base: Mapping[str, Mapping[str, float]],
    source: str,
    base_source: str,
) -> list[str]:
    extra = [q for q in scores if q not in base]
    missing = [q for q in base if q not in scores]
    if extra or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} question id(s) of {base_source} are missing (e.g. '{missing[0]}')")
        if extra:
            parts.append(f"{len(extra)} question id(s) are not in {base_source} (e.g. '{extra[0]}')")
        raise DataError(f"{source}: cannot pair with {base_source}: " + "; ".join(parts))
    return [q for q in base if scores[q] and base[q]]


def paired_table(
    preds_by_system: Mapping[str, Sequence[Mapping[str, Any]]],
    baselines: Sequence[str],
    metrics: Sequence[str] = tuple(PAIRED_METRICS),
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    sources: Mapping[str, str | Path] | None = None,
) -> list[dict[str, Any]]:
    """Paired differences of every system against each baseline, in points (×100), with bootstrap intervals.

    Args:
        preds_by_system: ``{system: prediction records}`` (``id``, ``prediction``, gold ``answers``).
        baselines: systems to compare the others to; each must be a key of ``preds_by_system``. A baseline is also
            compared to the other baselines.
        metrics: keys of :data:`PAIRED_METRICS` (``hits@1``, ``em``, ``f1``).
        n_resamples, seed, confidence: passed to :func:`~dpa_rag.eval.bootstrap.paired_bootstrap` (the same seed for
            every pair, so each pair's numbers do not depend on which other systems are compared).
        sources: ``{system: file}`` used in error messages (default: the system names).

    Returns:
        Rows ``{"system", "baseline", "metric", "diff", "lo", "hi", "p_value", "n"}``: ``diff`` = system − baseline
        on the questions both answered with gold answers (``n``), ``lo``/``hi`` its interval, in order of baselines,
        then systems, then metrics.

    Raises:
        ValueError: an unknown baseline or metric.
        DataError: a record without ``id``, a duplicate id, or two systems that do not answer the same questions
            (the message names the file or system and an example id).
    """
    unknown = [b for b in baselines if b not in preds_by_system]
    if unknown:
        raise ValueError(f"unknown baseline system(s) {unknown}; systems: {list(preds_by_system)}")
    bad = [m for m in metrics if m not in PAIRED_METRICS]
    if bad:
        raise ValueError(f"unknown paired metric(s) {bad}; choose from {list(PAIRED_METRICS)}")
    label = {s: str(sources[s]) if sources and s in sources else f"system '{s}'" for s in preds_by_system}
    scores = {s: question_scores(recs, metrics, label[s]) for s, recs in preds_by_system.items()}
    rows: list[dict[str, Any]] = []
    for base in dict.fromkeys(baselines):
        for system in preds_by_system:
            if system == base:
                continue
            ids = _aligned_ids(scores[system], scores[base], label[system], label[base])
            if not ids:
                raise DataError(f"{label[system]}: no question with gold answers to pair with {label[base]}")
            for m in metrics:
                a = [100.0 * scores[base][q][m] for q in ids]
                b = [100.0 * scores[system][q][m] for q in ids]
                r = paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed, confidence=confidence)
                rows.append({"system": system, "baseline": base, "metric": m, "diff": r["diff"], "lo": r["lo"],
                             "hi": r["hi"], "p_value": r["p_value"], "n": len(ids)})
    return rows


def _signed(x: float) -> str:
    s = f"{x:+.2f}"
    return "+0.00" if s == "-0.00" else s


def paired_markdown(rows: Sequence[Mapping[str, Any]], confidence: float = 0.95) -> str:
    """A markdown table of :func:`paired_table` rows: one line per (system, baseline), a column per metric.

    Cells read ``+2.40 [-0.60, +5.20]`` (difference in points and its interval); ``*`` marks an interval that
    excludes 0. Empty string when there are no rows.
    """
    if not rows:
        return ""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    pairs: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["system"], r["baseline"]), {})[r["metric"]] = r
    pct = f"{100 * confidence:g}%"
    headers = [f"Δ {PAIRED_METRICS[m][1] if m in PAIRED_METRICS else m} [{pct} CI]" for m in metrics]
    lines = ["| System | vs baseline | n | " + " | ".join(headers) + " |",
             "|---|---|---:|" + "|".join("---:" for _ in metrics) + "|"]
    for (system, base), by_metric in pairs.items():
        n = next(iter(by_metric.values()))["n"]
        cells = []
        for m in metrics:
            r = by_metric.get(m)
            if r is None:
                cells.append("–")
                continue
            mark = "*" if r["lo"] > 0 or r["hi"] < 0 else ""
            cells.append(f"{_signed(r['diff'])} [{_signed(r['lo'])}, {_signed(r['hi'])}]{mark}")
        lines.append(f"| {system} | {base} | {int(n)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
