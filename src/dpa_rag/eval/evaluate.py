"""QA evaluation of prediction files: Hits@1, EM, F1 (method.md §2.1, §9), per category, answer recall.

* :func:`evaluate_predictions` — pure: prediction records in, ``dict[str, float]`` out (×100, optional key prefix).
* :func:`load_predictions` — read and validate a predictions file (errors name file and line).
* :func:`run` — the ``dpa-rag evaluate`` stage: several files → ``metrics.json``, ``report.md``, a plot;
  with ``baseline``, paired differences of every other system against it with bootstrap intervals
  (:func:`~dpa_rag.eval.paired.paired_table`).

Metrics are recomputed from each record's ``prediction`` and gold ``answers``; a ``scores`` field in the file is
ignored, so files written by other tools are scored the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from dpa_rag.config import ConfigError, StageConfig
from dpa_rag.eval.metrics import exact_match, f1, hit, hit_word
from dpa_rag.eval.paired import paired_markdown, paired_table
from dpa_rag.eval.report import bar_plot, write_report
from dpa_rag.io import DataError, read_records
from dpa_rag.stage import StageOutputs, stage_recorder

__all__ = [
    "ANSWER_METRICS",
    "Config",
    "EvaluateConfig",
    "EvaluateOutputs",
    "Outputs",
    "evaluate_predictions",
    "load_predictions",
    "parse_prediction_specs",
    "run",
]

logger = logging.getLogger(__name__)

# metric key -> scoring function(prediction, golds); each is averaged over labelled records and ×100
ANSWER_METRICS = {"hits@1": hit, "hit_word": hit_word, "em": exact_match, "f1": f1}
_PRED_KEYS = ("prediction", "pred")
_GOLD_KEYS = ("answers", "golden_answers", "reference", "answer")


def _golds(rec: dict[str, Any]) -> list[str]:
    for key in _GOLD_KEYS:
        if key in rec:
            val = rec[key]
            return [val] if isinstance(val, str) else [str(a) for a in val]
    return []


def _prediction(rec: dict[str, Any]) -> str:
    for key in _PRED_KEYS:
        if key in rec:
            return rec[key]
    return ""


def _mean100(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def _answer_scores(records: Sequence[dict[str, Any]], prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, fn in ANSWER_METRICS.items():
        out[f"{prefix}{name}"] = _mean100([float(fn(_prediction(r), _golds(r))) for r in records])
    out[f"{prefix}n"] = len(records)
    return out


def evaluate_predictions(records: Iterable[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """Answer metrics of prediction records, ×100, keys prefixed with ``prefix``.

    Args:
        records: dicts with ``prediction`` (or ``pred``) and gold ``answers`` (or ``golden_answers``/``reference``/
            ``answer``); optional ``category`` and ``ctx_has_answer`` (one bool per passage shown to the reader).
        prefix: prepended to every key (e.g. ``"nq_"``).

    Returns:
        ``hits@1`` (substring hit, the paper's Hits@1), ``hit_word``, ``em``, ``f1`` and ``n`` (labelled records);
        ``n_unlabelled`` when some records have no gold answer (they are not scored); with ``ctx_has_answer``:
        ``answer_recall`` (share of questions whose passages contain a gold answer) and ``n_ctx`` (mean passages per
        question); with ``category``: the same answer metrics as ``category/<value>/<metric>``.
    """
    records = list(records)
    labelled = [r for r in records if _golds(r)]
    out = _answer_scores(labelled, prefix)
    if len(labelled) < len(records):
        out[f"{prefix}n_unlabelled"] = len(records) - len(labelled)
    with_ctx = [r for r in labelled if isinstance(r.get("ctx_has_answer"), list)]
    if with_ctx:
        out[f"{prefix}answer_recall"] = _mean100([float(any(r["ctx_has_answer"])) for r in with_ctx])
        out[f"{prefix}n_ctx"] = sum(len(r["ctx_has_answer"]) for r in with_ctx) / len(with_ctx)
    categories: dict[str, list[dict[str, Any]]] = {}
    for r in labelled:
        if r.get("category") is not None:
            categories.setdefault(str(r["category"]), []).append(r)
    for cat in sorted(categories):
        out.update(_answer_scores(categories[cat], f"{prefix}category/{cat}/"))
    return out


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    """Read a predictions file (``.jsonl``/``.json``, optionally gzipped) and check each record.

    Raises:
        DataError: a line is not JSON, or lacks a string ``prediction`` or a gold answers field; names file and line.
    """
    out = []
    for pos, rec in read_records(path):
        pred = next((rec[k] for k in _PRED_KEYS if k in rec), None)
        if not isinstance(pred, str):
            raise DataError(f"{path}:{pos}: expected a string 'prediction' field")
        gold_key = next((k for k in _GOLD_KEYS if k in rec), None)
        if gold_key is None:
            raise DataError(f"{path}:{pos}: no gold answers (expected 'answers', 'golden_answers' or 'reference')")
        golds = rec[gold_key]
        if not (isinstance(golds, str) or (isinstance(golds, list) and all(isinstance(g, str) for g in golds))):
            raise DataError(f"{path}:{pos}: '{gold_key}' must be a string or a list of strings")
        out.append(rec)
    return out


def parse_prediction_specs(specs: Sequence[str], names: Sequence[str] = ()) -> dict[str, Path]:
    """Map system names to prediction files.

    Each spec is ``path`` or ``name=path``. Plain paths take the next of ``names``, else the name of the folder that
    holds the file (``runs/rag/predictions.jsonl`` → ``rag``), made unique.

    Raises:
        ConfigError: more names than plain paths, or a name used twice.
    """
    out: dict[str, Path] = {}
    pending = list(names)
    plain = 0
    for spec in specs:
        name: str | None = None
        path = Path(spec)
        if "=" in spec and not path.exists():
            name, _, rest = spec.partition("=")
            name, path = name.strip(), Path(rest.strip())
        elif pending:
            name = pending.pop(0)
            plain += 1
        else:
            plain += 1
        if not name:
            base = path.parent.name if path.stem == "predictions" and path.parent.name else path.stem
            name, k = base, 1
            while name in out:
                k += 1
                name = f"{base}-{k}"
        if name in out:
            raise ConfigError(f"system name '{name}' is used twice")
        out[name] = path
    if pending:
        raise ConfigError(f"{len(names)} --name value(s) for {plain} prediction file(s) given without a name")
    return out


class EvaluateConfig(StageConfig):
    """Options of ``dpa-rag evaluate``."""

    predictions: list[str] = Field(description="Predictions file (jsonl), or name=path to label it.")
    name: list[str] = Field(
        default_factory=list, description="Labels for the prediction files given without 'name=' (in order)."
    )
    out_dir: Path = Field(description="Folder for metrics.json, report.md and metrics.png.")
    title: str = Field("QA evaluation", description="Report title.")
    plot: bool = Field(True, description="Also draw metrics.png (Hits@1/EM/F1 bars per system).")
    baseline: list[str] = Field(
        default_factory=list,
        description="System name(s) to compare every other system to: paired differences of Hits@1, EM and F1 "
        "with bootstrap confidence intervals, questions aligned by id.",
    )
    bootstrap_resamples: int = Field(10000, ge=1, description="Paired bootstrap: resamples of the questions.")
    bootstrap_seed: int = Field(0, description="Paired bootstrap: random seed.")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Paired bootstrap: confidence level of the intervals.")

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if not self.predictions:
            raise ValueError("give at least one predictions file")
        return self


def _paired_section(rows: Sequence[dict[str, Any]], cfg: EvaluateConfig) -> str:
    pct = f"{100 * cfg.confidence:g}%"
    return (
        "## Paired differences (system vs baseline)\n\n"
        f"Δ = system − baseline in points (×100) on the questions both answered (aligned by id; n); [lo, hi] = "
        f"{pct} paired bootstrap percentile interval ({cfg.bootstrap_resamples} resamples of the questions, seed "
        f"{cfg.bootstrap_seed}); * = the interval excludes 0.\n\n" + paired_markdown(rows, cfg.confidence)
    )


REPORT_MD = "report.md"
METRICS_FILE = "metrics.json"


@dataclasses.dataclass(frozen=True)
class EvaluateOutputs(StageOutputs):
    """What ``evaluate`` writes: the report (markdown) and every system's metrics (JSON)."""

    FILES: ClassVar[dict[str, str]] = {"report": REPORT_MD, "metrics": METRICS_FILE}
    report: Path
    metrics: Path


Config = EvaluateConfig
Outputs = EvaluateOutputs


def run(cfg: EvaluateConfig) -> EvaluateOutputs:
    """Score every predictions file; write ``metrics.json``, ``report.md`` (and ``metrics.png``).

    With ``cfg.baseline``, ``metrics.json`` also gets a ``paired`` block (``confidence``, ``n_resamples``, ``seed``,
    ``rows`` of :func:`~dpa_rag.eval.paired.paired_table`) and the report a table of the differences.

    Raises:
        ConfigError: a baseline that is not one of the systems, or a system named ``paired`` next to a baseline.
        DataError: a malformed file, or files that do not answer the same question ids (the file is named).
    """
    systems = parse_prediction_specs(cfg.predictions, cfg.name)
    unknown = [b for b in cfg.baseline if b not in systems]
    if unknown:
        raise ConfigError(f"--baseline {unknown[0]!r} is not one of the systems: {', '.join(systems)}")
    if cfg.baseline and "paired" in systems:
        raise ConfigError("a system named 'paired' clashes with the paired block of metrics.json; rename it")
    if cfg.baseline and len(systems) < 2:
        raise ConfigError("--baseline needs at least two systems to compare")
    rec = stage_recorder("evaluate", cfg, cfg.out_dir, systems.values())
    results: dict[str, dict[str, float]] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for name, path in systems.items():
        records[name] = load_predictions(path)
        results[name] = evaluate_predictions(records[name])
        logger.info(
            "%s: Hits@1 %.2f  EM %.2f  F1 %.2f  (n=%d)",
            name,
            results[name]["hits@1"],
            results[name]["em"],
            results[name]["f1"],
            results[name]["n"],
        )
    sections: list[str] = []
    extra_json: dict[str, Any] = {}
    if cfg.baseline:
        rows = paired_table(records, cfg.baseline, n_resamples=cfg.bootstrap_resamples, seed=cfg.bootstrap_seed,
                            confidence=cfg.confidence, sources=systems)
        for r in rows:
            logger.info("%s vs %s: Δ %s %+.2f [%+.2f, %+.2f] (n=%d)", r["system"], r["baseline"], r["metric"],
                        r["diff"], r["lo"], r["hi"], r["n"])
        extra_json["paired"] = {"confidence": cfg.confidence, "n_resamples": cfg.bootstrap_resamples,
                                "seed": cfg.bootstrap_seed, "rows": rows}
        sections.append(_paired_section(rows, cfg))
    sources = "\n".join(f"- **{n}**: `{p}`" for n, p in systems.items())
    sections.append(f"## Inputs\n\n{sources}")
    write_report(results, cfg.out_dir, title=cfg.title, extra_sections=sections, extra_json=extra_json)
    outputs = [METRICS_FILE, REPORT_MD]
    if cfg.plot:
        bar_plot(results, Path(cfg.out_dir) / "metrics.png", title=cfg.title)
        outputs.append("metrics.png")
    rec.finish(outputs=outputs, systems=len(results), records=int(sum(r["n"] for r in results.values())))
    return EvaluateOutputs.at(cfg.out_dir)
