"""``dpa-rag filter``: keep a rewrite only if it is consistent with its original question (method.md §5, §12 #8).

Every rewrite is checked on its own (not the authors' first-3 / drop-the-whole-record behaviour):

* ``nli`` — premise = original, hypothesis = rewrite; drop on contradiction (argmax), or on p(contradiction) ≥
  ``contradiction_threshold``; with ``require_entailment`` also drop non-entailed rewrites. Scores: ``nli_scores``.
* ``similarity`` (default, offline) — cosine of sentence embeddings; drop below ``similarity_threshold`` (per-strategy
  overrides in ``strategy_thresholds``). Scores: ``similarity``.

Outputs: ``augmented.jsonl`` (kept rewrites only, scores aligned with ``back_instruction``, drops listed in
``dropped``), ``questions_augmented.jsonl`` (kept rewrites), ``filter_report.json`` and ``filter_report.md``.
Scores are computed ``chunk_size`` records at a time and each finished chunk is appended to
``filter_scores.partial.jsonl``, so a killed run resumes at its first unfinished chunk.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from dpa_rag.augment.augment import AUGMENTED, QUESTIONS_AUGMENTED, augmented_to_questions
from dpa_rag.augment.nli import NLIScorer, nli_decision
from dpa_rag.augment.similarity import DEFAULT_SIMILARITY_THRESHOLD, SimilarityScorer
from dpa_rag.config import DeviceOption, StageConfig
from dpa_rag.data.loaders import question_id
from dpa_rag.io import DataError, read_records, write_json, write_jsonl, write_text
from dpa_rag.models import DEFAULT_ENCODER
from dpa_rag.stage import ChunkLog, StageOutputs, resume_state, stage_recorder

__all__ = [
    "DEFAULT_NLI_MODEL", "REPORT_JSON", "REPORT_MD", "Config", "FilterConfig", "FilterOutputs", "Outputs",
    "filter_records", "load_augmentation_records", "render_report", "run", "score_chunked",
]

logger = logging.getLogger(__name__)

DEFAULT_NLI_MODEL = "MoritzLaurer/mDeBERTa-v3-base-xnli-multilingual-nli-2mil7"  # the authors' NLI_filter.py
REPORT_JSON = "filter_report.json"
REPORT_MD = "filter_report.md"


class FilterConfig(DeviceOption, StageConfig):
    """Configuration of ``dpa-rag filter``."""

    input: Path = Field(description="augment's augmented.jsonl (or its folder), or the authors' augmentation file.")
    out_dir: Path = Field(description="Output folder (augmented.jsonl, questions_augmented.jsonl, filter_report.*).")
    backend: Literal["similarity", "nli"] = Field(
        "similarity", description="Consistency check: similarity (embedding cosine, offline default) or nli."
    )
    nli_model: str = Field(DEFAULT_NLI_MODEL, description="MNLI-style sequence-classification checkpoint (nli).")
    require_entailment: bool = Field(False, description="nli: keep only rewrites whose argmax label is entailment.")
    contradiction_threshold: float | None = Field(
        None, ge=0.0, le=1.0, description="nli: drop if p(contradiction) >= this, instead of the argmax rule."
    )
    encoder: str = Field(
        DEFAULT_ENCODER, description="similarity: sentence encoder (bundled alias, hub id or folder)."
    )
    similarity_threshold: float = Field(
        DEFAULT_SIMILARITY_THRESHOLD, description="similarity: drop a rewrite whose cosine to the original is below."
    )
    strategy_thresholds: dict[str, float] = Field(
        default_factory=dict, description="similarity: per-strategy thresholds, e.g. {sparql: 0.1}."
    )
    batch_size: int = Field(32, ge=1, description="Pairs (nli) or texts (similarity) per forward pass.")
    max_length: int = Field(256, ge=8, description="nli: truncation length of premise + hypothesis.")
    chunk_size: int = Field(1024, ge=1, description="Records scored per resumable chunk.")
    progress: bool = Field(True, description="Show progress bars.")


@dataclasses.dataclass(frozen=True)
class FilterOutputs(StageOutputs):
    """What ``filter`` writes: the kept rewrites (augment's layout) and the drop report."""

    FILES: ClassVar[dict[str, str]] = {
        "augmented": AUGMENTED,
        "questions": QUESTIONS_AUGMENTED,
        "report_json": REPORT_JSON,
        "report_md": REPORT_MD,
    }
    augmented: Path
    questions: Path
    report_json: Path
    report_md: Path


Config = FilterConfig
Outputs = FilterOutputs


def load_augmentation_records(path: str | Path) -> list[dict[str, Any]]:
    """Read augmentation records, validating them; the authors' bare format gets ids and placeholder strategies.

    Entries of ``back_instruction`` that are not non-empty strings are kept with strategy ``invalid`` marks so the
    filter drops and reports them.
    """
    path = Path(path)
    if path.is_dir():
        path = path / AUGMENTED
    out: list[dict[str, Any]] = []
    for pos, rec in read_records(path):
        original = rec.get("instruction")
        rewrites = rec.get("back_instruction")
        if not isinstance(original, str) or not original.strip():
            raise DataError(f"{path}:{pos}: 'instruction' (the original question) must be a non-empty string")
        if not isinstance(rewrites, list):
            raise DataError(f"{path}:{pos}: 'back_instruction' must be a list of rewrites")
        strategies = rec.get("strategies") or [f"rewrite{i}" for i in range(len(rewrites))]
        if len(strategies) != len(rewrites):
            raise DataError(f"{path}:{pos}: {len(strategies)} strategies for {len(rewrites)} rewrites")
        rec = dict(rec)
        rec["id"] = str(rec.get("id") or question_id(original))
        rec["strategies"] = [str(s) for s in strategies]
        rec.setdefault("answers", [])
        rec.setdefault("failures", {})
        out.append(rec)
    return out


def _scorer(cfg: FilterConfig) -> NLIScorer | SimilarityScorer:
    if cfg.backend == "nli":
        return NLIScorer(cfg.nli_model, device=cfg.device, batch_size=cfg.batch_size, max_length=cfg.max_length)
    return SimilarityScorer(cfg.encoder, device=cfg.device, batch_size=cfg.batch_size)


def _pairs(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(original, rewrite) for every valid rewrite, in record order."""
    return [
        (rec["instruction"], text)
        for rec in records
        for text in rec["back_instruction"]
        if isinstance(text, str) and text.strip()
    ]


def _score(cfg: FilterConfig, originals: list[str], rewrites: list[str]) -> list[Any]:
    return _scorer(cfg).score(originals, rewrites, progress=cfg.progress)


def score_chunked(cfg: FilterConfig, records: list[dict[str, Any]], out_dir: Path) -> tuple[list[Any], ChunkLog]:
    """The scores of every valid rewrite (record order), ``cfg.chunk_size`` records at a time, and their log.

    Finished chunks are kept in ``out_dir/filter_scores.partial.jsonl`` so a killed run resumes; call the log's
    ``finish()`` once the outputs are written (a kill before that re-scores nothing and loads no model).
    """
    state = resume_state(cfg, [cfg.input])
    scorer = None
    with ChunkLog(out_dir, "filter_scores", state, [r["id"] for r in records], cfg.chunk_size) as log:
        for start in range(log.start, len(records), cfg.chunk_size):
            chunk = records[start : start + cfg.chunk_size]
            pairs = _pairs(chunk)
            if pairs and scorer is None:
                scorer = _scorer(cfg)  # loaded only when something is left to score
            scores = iter(scorer.score([a for a, _ in pairs], [b for _, b in pairs], progress=cfg.progress)
                          if pairs else [])
            log.append(
                {"id": r["id"], "scores": [next(scores) for _ in _pairs([r])]} for r in chunk
            )
    return [s for r in log.done for s in r["scores"]], log


def _decide(cfg: FilterConfig, strategy: str, score: Any) -> str | None:
    if cfg.backend == "nli":
        return nli_decision(score, cfg.require_entailment, cfg.contradiction_threshold)
    return "low_similarity" if score < cfg.strategy_thresholds.get(strategy, cfg.similarity_threshold) else None


def filter_records(
    cfg: FilterConfig, records: list[dict[str, Any]], scores: list[Any] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every valid rewrite, keep the consistent ones; returns (filtered records, report).

    Args:
        cfg: the filter configuration (backend and rules).
        records: augmentation records from :func:`load_augmentation_records`.
        scores: precomputed scores, one per valid rewrite in record order (tests); computed when ``None``.
    """
    pairs = _pairs(records)
    if scores is None:
        scores = _score(cfg, [a for a, _ in pairs], [b for _, b in pairs]) if pairs else []
    if len(scores) != len(pairs):
        raise ValueError(f"{len(scores)} scores for {len(pairs)} rewrites")
    score_key = "nli_scores" if cfg.backend == "nli" else "similarity"
    stats: dict[str, dict[str, Any]] = defaultdict(lambda: {"rewrites": 0, "kept": 0, "dropped": 0, "scores": []})
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    parse_failures: Counter[str] = Counter()
    it = iter(scores)
    out: list[dict[str, Any]] = []
    for rec in records:
        kept_text, kept_strat, kept_scores, dropped = [], [], [], []
        for strategy, text in zip(rec["strategies"], rec["back_instruction"], strict=True):
            st = stats[strategy]
            st["rewrites"] += 1
            if not isinstance(text, str) or not text.strip():
                why, score = "invalid", None
            else:
                score = next(it)
                st["scores"].append(score["entailment"] if cfg.backend == "nli" else score)
                why = _decide(cfg, strategy, score)
            if why is None:
                kept_text.append(text.strip())
                kept_strat.append(strategy)
                kept_scores.append(score)
                st["kept"] += 1
            else:
                dropped.append({"strategy": strategy, "rewrite": text, "reason": why, score_key: score})
                st["dropped"] += 1
                reasons[strategy][why] += 1
        for strategy in rec.get("failures", {}):
            parse_failures[strategy] += 1
        new = {k: v for k, v in rec.items() if k not in ("nli_scores", "similarity", "dropped")}
        new.update(back_instruction=kept_text, strategies=kept_strat, dropped=dropped)
        new[score_key] = kept_scores
        out.append(new)
    per_strategy = {}
    for strategy, st in stats.items():
        sc = st.pop("scores")
        per_strategy[strategy] = {
            **st,
            "drop_rate": round(st["dropped"] / st["rewrites"], 4) if st["rewrites"] else 0.0,
            ("mean_p_entailment" if cfg.backend == "nli" else "mean_similarity"): round(sum(sc) / len(sc), 4)
            if sc
            else None,
            "reasons": dict(reasons[strategy]),
            "parse_failures": parse_failures.get(strategy, 0),
        }
    for strategy, n in parse_failures.items():
        per_strategy.setdefault(
            strategy, {"rewrites": 0, "kept": 0, "dropped": 0, "drop_rate": 0.0, "reasons": {}, "parse_failures": n}
        )
    total = sum(s["rewrites"] for s in per_strategy.values())
    kept = sum(s["kept"] for s in per_strategy.values())
    report = {
        "backend": cfg.backend,
        "rule": _rule_text(cfg),
        "records": len(records),
        "rewrites": total,
        "kept": kept,
        "dropped": total - kept,
        "records_without_rewrites": sum(1 for r in out if not r["back_instruction"]),
        "per_strategy": per_strategy,
    }
    return out, report


def _rule_text(cfg: FilterConfig) -> str:
    if cfg.backend == "nli":
        rule = (
            f"drop if p(contradiction) >= {cfg.contradiction_threshold}"
            if cfg.contradiction_threshold is not None
            else "drop if contradiction is the argmax"
        )
        if cfg.require_entailment:
            rule += "; drop unless entailment is the argmax"
        return f"{rule} (model {cfg.nli_model})"
    extra = f"; per strategy {cfg.strategy_thresholds}" if cfg.strategy_thresholds else ""
    return f"drop if cosine < {cfg.similarity_threshold}{extra} (encoder {cfg.encoder})"


def render_report(report: dict[str, Any]) -> str:
    """The report as a markdown table (one row per strategy, then the total)."""
    score_col = next(
        (k for s in report["per_strategy"].values() for k in s if k.startswith("mean_")), "mean_score"
    )
    lines = [
        "# Consistency filter report",
        "",
        f"Backend: `{report['backend']}`. Rule: {report['rule']}.",
        "",
        f"| strategy | rewrites | kept | dropped | drop rate | {score_col.replace('_', ' ')} | reasons "
        "| parse failures |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, s in sorted(report["per_strategy"].items()):
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["reasons"].items())) or "-"
        mean = s.get(score_col)
        lines.append(
            f"| {name} | {s['rewrites']} | {s['kept']} | {s['dropped']} | {s['drop_rate']:.1%} | "
            f"{'-' if mean is None else f'{mean:.3f}'} | {reasons} | {s['parse_failures']} |"
        )
    rate = report["dropped"] / report["rewrites"] if report["rewrites"] else 0.0
    lines.append(f"| **total** | {report['rewrites']} | {report['kept']} | {report['dropped']} | {rate:.1%} | | | |")
    lines += ["", f"{report['records']} questions; {report['records_without_rewrites']} have no rewrite left.", ""]
    return "\n".join(lines)


def run(cfg: FilterConfig) -> FilterOutputs:
    """Run the filter stage."""
    out_dir = Path(cfg.out_dir)
    records = load_augmentation_records(cfg.input)
    rec = stage_recorder("filter", cfg, out_dir, inputs=[cfg.input])
    with rec.timer("score"):
        scores, log = score_chunked(cfg, records, out_dir)
        filtered, report = filter_records(cfg, records, scores=scores)
    out = FilterOutputs.at(out_dir)
    write_jsonl(out.augmented, filtered)
    write_jsonl(out.questions, augmented_to_questions(filtered))
    write_json(out.report_json, report)
    write_text(out.report_md, render_report(report))
    log.finish()
    rec.finish(
        outputs=list(FilterOutputs.FILES.values()),
        records=report["records"],
        rewrites=report["rewrites"],
        kept=report["kept"],
        dropped=report["dropped"],
    )
    logger.info("filter (%s): kept %d of %d rewrites", cfg.backend, report["kept"], report["rewrites"])
    return out
