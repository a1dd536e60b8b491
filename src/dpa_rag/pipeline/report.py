"""The pipeline's final report: systems table, how alignment shifts the reader's outcomes, training curves.

Written to ``<run>/report/``: ``report.md``, ``metrics.json`` (per system) + ``summary.json`` (everything else),
``systems.png`` (Hits@1/EM/F1 bars), ``outcomes.png`` (aligned / unaligned / both-correct / both-wrong shares before
and after alignment) and ``training_curves.png``.

Outcome categories follow the paper's analysis (method.md §2.2, Fig. 4): per evaluation question, compare the
reader's closed-book answer with its answer given the top-k passages (hit rule): *aligned* = wrong → right,
*unaligned* = right → wrong, *both-correct*, *both-wrong*. "Before" = base reader with the retriever's passages;
"after" = self-aligned reader with the aligned reranker's passages (the best aligned system that was run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from dpa_rag.augment import filter as consistency_filter
from dpa_rag.config import StageConfig
from dpa_rag.eval.evaluate import evaluate_predictions, load_predictions
from dpa_rag.eval.metrics import hit
from dpa_rag.eval.report import bar_plot, write_report
from dpa_rag.io import write_json
from dpa_rag.llm import train as llm_train
from dpa_rag.mining import mine
from dpa_rag.rag.answer import AnswerOutputs
from dpa_rag.reranker import train as reranker_train
from dpa_rag.reranker.metrics import utility_table
from dpa_rag.retrieval import retrieve
from dpa_rag.stage import StageOutputs, read_manifest, stage_recorder

__all__ = ["OUTCOMES", "Config", "Outputs", "ReportConfig", "ReportOutputs", "outcome_shares", "run"]

logger = logging.getLogger(__name__)

REPORT_MD = "report.md"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"
SYSTEMS_PLOT = "systems.png"
OUTCOMES_PLOT = "outcomes.png"
CURVES_PLOT = "training_curves.png"

OUTCOMES = ("aligned", "unaligned", "both_correct", "both_wrong")
DESCRIPTIONS = {
    "closed_book": "reader alone, no passages",
    "retriever": "retriever top-k + base reader (vanilla RAG)",
    "reranker": "aligned reranker top-k + base reader",
    "aligned_reader": "retriever top-k + self-aligned reader",
    "full": "DPA-RAG: aligned reranker top-k + self-aligned reader",
    "closed_book_aligned": "self-aligned reader alone, no passages",
    "bm25": "BM25 top-k + base reader",
    "dense": "dense top-k + base reader",
    "hybrid": "hybrid (RRF) top-k + base reader",
}


def describe(name: str) -> str:
    """A system's description; ``name@N`` is the same system with the top N passages."""
    base, _, k = name.partition("@")
    text = DESCRIPTIONS.get(base, base)
    return text.replace("top-k", f"top-{k}") if k else text


class ReportConfig(StageConfig):
    """Inputs of the report step (wired by the pipeline)."""

    out_dir: Path = Field(description="Report folder.")
    run_dir: Path = Field(description="The pipeline's run folder (for stage manifests and training logs).")
    systems: dict[str, str] = Field(description="System name → answer step folder holding predictions.jsonl.")
    top_k: int = Field(3, description="Passages per question (for the table's caption).")
    retriever: str = Field("bm25", description="Retriever of the system (for the caption).")
    steps: list[str] = Field(default_factory=list, description="Enabled steps: only their folders are read.")
    promotion: Path | None = Field(None, description="The promotion gate's promotion.json (the full system's parts).")


@dataclasses.dataclass(frozen=True)
class ReportOutputs(StageOutputs):
    """What the report step writes: report.md (with its plots), every system's metrics, the summary."""

    FILES: ClassVar[dict[str, str]] = {"report": REPORT_MD, "metrics": METRICS_FILE, "summary": SUMMARY_FILE}
    report: Path
    metrics: Path
    summary: Path


Config = ReportConfig
Outputs = ReportOutputs


def outcome_shares(closed: list[dict[str, Any]], opened: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and shares of the four outcomes, matching records by ``id`` (pure; hit rule)."""
    by_id = {r["id"]: r for r in closed}
    counts: Counter[str] = Counter()
    for r in opened:
        c = by_id.get(r["id"])
        if c is None or not r.get("answers"):
            continue
        before = hit(c["prediction"], r["answers"])
        after = hit(r["prediction"], r["answers"])
        key = (
            "aligned"
            if after and not before
            else "unaligned"
            if before and not after
            else "both_correct"
            if before
            else "both_wrong"
        )
        counts[key] += 1
    total = sum(counts.values())
    return {
        "n": total,
        "counts": {k: counts.get(k, 0) for k in OUTCOMES},
        "shares": {k: (100.0 * counts.get(k, 0) / total if total else 0.0) for k in OUTCOMES},
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _outcome_plot(shift: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"aligned": "#2a9d8f", "unaligned": "#e76f51", "both_correct": "#8ab17d", "both_wrong": "#bbbbbb"}
    fig, ax = plt.subplots(figsize=(6, 2.2 + 0.4 * len(shift)))
    try:
        names = list(shift)
        for i, name in enumerate(names):
            left = 0.0
            for k in OUTCOMES:
                v = shift[name]["shares"][k]
                ax.barh(i, v, left=left, color=colors[k], label=k.replace("_", "-") if i == 0 else None)
                if v >= 6:
                    ax.text(left + v / 2, i, f"{v:.0f}%", ha="center", va="center", fontsize=8)
                left += v
        ax.set_yticks(range(len(names)), names)
        ax.set_xlim(0, 100)
        ax.set_xlabel("share of evaluation questions (%)")
        ax.legend(ncol=4, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35))
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _curves(run_dir: Path, steps: set[str]) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    rr = _read_json(reranker_train.Outputs.at(run_dir / "train-reranker").train_log) if "train-reranker" in steps \
        else None
    history = rr.get("log_history", rr.get("history", [])) if isinstance(rr, dict) else rr or []
    for entry in history if isinstance(history, list) else []:
        if isinstance(entry, dict) and "loss" in entry and "step" in entry:
            curves.setdefault("reranker loss", []).append((entry["step"], entry["loss"]))
            for k, v in entry.items():
                if k.startswith("weight") and isinstance(v, (int, float)):
                    curves.setdefault(f"reranker {k}", []).append((entry["step"], v))
    for stage in ("prealign", "sft"):
        if f"train-llm-{stage}" not in steps:
            continue
        log = _read_json(llm_train.Outputs.at(run_dir / f"train-llm-{stage}").train_log)
        history = log.get("log_history", []) if isinstance(log, dict) else log or []
        for entry in history if isinstance(history, list) else []:
            if isinstance(entry, dict) and "loss" in entry and "step" in entry:
                curves.setdefault(f"reader {stage} loss", []).append((entry["step"], entry["loss"]))
    return curves


def _curves_plot(curves: dict[str, list[tuple[float, float]]], path: Path) -> Path | None:
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {
        "reranker loss": [k for k in curves if k == "reranker loss"],
        "MGDA/loss weights": [k for k in curves if k.startswith("reranker weight")],
        "reader loss": [k for k in curves if k.startswith("reader")],
    }
    groups = {g: ks for g, ks in groups.items() if ks}
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3), squeeze=False)
    try:
        for ax, (title, keys) in zip(axes[0], groups.items(), strict=True):
            for k in keys:
                xs, ys = zip(*curves[k], strict=True)
                ax.plot(xs, ys, label=k.replace("reranker ", "").replace("reader ", ""), linewidth=1.2)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def _timings(run_dir: Path, steps: set[str]) -> str:
    rows = []
    for d in sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name in steps):
        m = read_manifest(d)
        if m and "timings_s" in m:
            rows.append((d.name, m["timings_s"].get("total", 0.0)))
    if not rows:
        return ""
    body = "\n".join(f"| {n} | {t:.1f} |" for n, t in rows)
    return f"## Step timings (last run of each step)\n\n| step | seconds |\n|---|---:|\n{body}"


def _context_sections(run_dir: Path, steps: set[str]) -> tuple[list[str], dict[str, Any]]:
    sections: list[str] = []
    summary: dict[str, Any] = {}

    def folder(step: str) -> Path:
        # a folder left by an earlier run with other switches must not leak into this report
        return run_dir / step if step in steps else run_dir / f".not-enabled-{step}"

    rm = _read_json(retrieve.Outputs.at(folder("retrieve-eval")).metrics)
    if isinstance(rm, dict):
        summary["retrieval_eval"] = rm
        flat = {k: v for k, v in rm.items() if isinstance(v, (int, float))}
        if flat:
            cells = ", ".join(f"{k} {v:.3g}" for k, v in flat.items())
            sections.append(f"## Retrieval (evaluation questions)\n\n{cells}")
    mined = mine.Outputs.at(folder("mine"))
    if mined.summary.exists():
        text = mined.summary.read_text(encoding="utf-8").replace("# Preference mining summary", "").strip()
        sections.append("## Preference knowledge mined from the reader (training questions)\n\n" + text)
        summary["mining"] = _read_json(mined.stats)
    fr = consistency_filter.Outputs.at(folder("filter")).report_md
    if fr.exists():
        body = fr.read_text(encoding="utf-8").split("\n", 1)[-1].strip()
        sections.append("## Query augmentation and consistency filter\n\n" + body)
    trained = reranker_train.Outputs.at(folder("train-reranker"))
    for name in ("valid_metrics", "test_metrics", "retrieval_metrics", "utility_metrics"):
        data = _read_json(getattr(trained, name))
        if data is not None:
            summary[f"reranker_{name}"] = data
    rt = summary.get("reranker_test_metrics")
    if isinstance(rt, dict):
        flat = {k: v for k, v in rt.items() if isinstance(v, (int, float))}
        sections.append(
            "## Reranker (held-out preference pairs, best checkpoint)\n\n"
            + ", ".join(f"{k} {v:.3f}" for k, v in flat.items())
        )
    rq = summary.get("reranker_retrieval_metrics")
    if isinstance(rq, dict) and rq:
        rows = ["| ranking | MRR | hit@1 | hit@3 | questions |", "|---|---|---|---|---|"]
        for name, m in rq.items():
            if isinstance(m, dict):
                h1, h3 = (m.get(f"hit@{k}", m.get(f"hit_at_{k}", float("nan"))) for k in (1, 3))  # or older files'
                rows.append(f"| {name} | {m.get('mrr', float('nan')):.3f} | {h1:.3f} "
                            f"| {h3:.3f} | {int(m.get('n_questions', 0))} |")
        sections.append(
            "## Reranker ranking quality (answer-bearing passages, held-out training questions)\n\n"
            "Training questions the reranker never trained on; the retriever-fusion weight is chosen here.\n\n"
            + "\n".join(rows)
        )
    ru = summary.get("reranker_utility_metrics")
    if isinstance(ru, dict) and ru:
        sections.append(
            "## Reranker utility ranking (the reader's graded preferences, held-out training questions)\n\n"
            "Probed passages of training-split questions the reranker never trained on, ordered by the retriever, "
            "by the largest likelihood gain (the oracle: the ceiling), by the untrained model and by the aligned "
            "reranker. nDCG uses max(gain, 0) as the graded relevance; MRR of aligned passages; mean gain (nats per "
            "answer token) of the top-1 passage.\n\n" + utility_table(ru)
        )
    for stage in ("prealign", "sft"):
        validation = _read_json(llm_train.Outputs.at(folder(f"train-llm-{stage}")).validation)
        if isinstance(validation, dict) and validation.get("steps"):
            from dpa_rag.llm.validation import validation_markdown

            summary[f"reader_validation_{stage}"] = validation
            sections.append(f"## Reader self-alignment, {stage} stage: held-out validation\n\n"
                            + validation_markdown(validation).strip())
    card = trained.model / reranker_train.MODEL_CARD
    if card.exists():
        sections.append(f"Model card (ranking quality vs the retriever order and the untrained backbone): `{card}`.")
    return sections, summary


_BASELINES = ("retriever", "bm25", "dense", "hybrid")


def paired_section(preds: dict[str, list[dict[str, Any]]]) -> tuple[str | None, list[dict[str, Any]]]:
    """Paired bootstrap 95% CIs of each system against the retriever baselines with the same number of passages
    (``name`` vs ``retriever``/``bm25``/``dense``; ``name@1`` vs ``retriever@1``/...)."""
    from dpa_rag.eval.paired import paired_markdown, paired_table

    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, records in preds.items():
        if name.startswith("closed_book"):
            continue
        groups.setdefault(name.partition("@")[2], {})[name] = records
    rows: list[dict[str, Any]] = []
    for members in groups.values():
        baselines = [n for n in members if n.partition("@")[0] in _BASELINES]
        if baselines and len(members) > 1:
            rows += paired_table(members, baselines)
    if not rows:
        return None, []
    text = ("## Paired comparison against the retrievers (bootstrap, 10,000 resamples)\n\n"
            "Differences in points on the same evaluation questions, each system against the retriever baselines "
            "that show the reader as many passages; `*`: the 95% interval excludes 0.\n\n" + paired_markdown(rows))
    return text, rows


def run(cfg: ReportConfig) -> ReportOutputs:
    """Evaluate every system's predictions and write the report."""
    systems = {name: AnswerOutputs.at(folder).predictions for name, folder in cfg.systems.items()}
    rec = stage_recorder("report", cfg, cfg.out_dir, list(systems.values()))
    preds = {name: load_predictions(path) for name, path in systems.items()}
    results = {name: evaluate_predictions(records) for name, records in preds.items()}

    shift: dict[str, dict[str, Any]] = {}
    if "closed_book" in preds and "retriever" in preds:
        shift["before: retriever + base reader"] = outcome_shares(preds["closed_book"], preds["retriever"])
    if "closed_book" in preds and "reranker" in preds:
        shift["aligned reranker + base reader"] = outcome_shares(preds["closed_book"], preds["reranker"])
    if "closed_book_aligned" in preds:
        for name, label in (("aligned_reader", "retriever + aligned reader"), ("full", "after: full DPA-RAG")):
            if name in preds:
                shift[label] = outcome_shares(preds["closed_book_aligned"], preds[name])

    table_names = {f"{name} ({describe(name)})": r for name, r in results.items()}
    extra = [
        f"Retriever: **{cfg.retriever}**; the reader sees the top **{cfg.top_k}** passages. "
        "Systems are listed in the order they were run.",
    ]
    if shift:
        rows = "\n".join(
            f"| {name} | {s['n']} | " + " | ".join(f"{s['shares'][k]:.1f}" for k in OUTCOMES) + " |"
            for name, s in shift.items()
        )
        extra.append(
            "## How alignment shifts the reader's outcomes\n\n"
            "Per evaluation question: the reader closed-book vs the reader with the passages (hit rule). "
            "Aligned = the passages turned a wrong answer right; unaligned = they turned a right answer wrong.\n\n"
            "| setting | n | aligned % | unaligned % | both-correct % | both-wrong % |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            + rows
            + f"\n\n![outcomes]({OUTCOMES_PLOT})"
        )
        _outcome_plot(shift, cfg.out_dir / OUTCOMES_PLOT)
    promotion = _read_json(cfg.promotion) if cfg.promotion is not None else None
    if isinstance(promotion, dict) and promotion:
        from dpa_rag.pipeline.promote import PROMOTION_MD

        md = Path(cfg.promotion).with_name(PROMOTION_MD)
        body = md.read_text(encoding="utf-8").strip() if md.exists() else json.dumps(promotion, indent=2)
        extra.append(
            "## Promotion gate (what the full DPA-RAG system uses)\n\n"
            "An aligned component enters the full system only if it did no worse than its baseline on held-out "
            "training-split questions (never the evaluation questions); the other rows still measure every trained "
            "component as it came out of training.\n\n" + body
        )
    paired_text, paired_rows = paired_section(preds)
    if paired_text:
        extra.append(paired_text)
    steps = set(cfg.steps)
    context, summary = _context_sections(cfg.run_dir, steps)
    extra.extend(context)
    bar_plot(results, cfg.out_dir / SYSTEMS_PLOT, title="Evaluation questions")
    extra.insert(1, f"![systems]({SYSTEMS_PLOT})")
    curves = _curves(cfg.run_dir, steps)
    if _curves_plot(curves, cfg.out_dir / CURVES_PLOT):
        extra.append(f"## Training curves\n\n![training curves]({CURVES_PLOT})")
    timings = _timings(cfg.run_dir, steps)
    if timings:
        extra.append(timings)
    path = write_report(table_names, cfg.out_dir, title="DPA-RAG run report", extra_sections=extra)
    out = ReportOutputs.at(cfg.out_dir)
    write_json(out.metrics, results)
    write_json(out.summary, {"outcomes": shift, "paired": paired_rows, "promotion": promotion, **summary})
    outputs = [*ReportOutputs.FILES.values(), SYSTEMS_PLOT]
    outputs += [p for p in (OUTCOMES_PLOT, CURVES_PLOT) if (cfg.out_dir / p).exists()]
    rec.finish(outputs=outputs, systems=len(results))
    logger.info("report: %s", path)
    return out
