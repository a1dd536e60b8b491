"""The promotion gate: an aligned component is used by the full system only if it did not do worse than its baseline
on held-out training-split questions (never the evaluation questions).

* **reader** — the self-aligned reader against the base reader, from ``train-llm``'s held-out validation
  (``validation.json``: the kept weights and the base reader answered the same held-out questions with the same
  passages, prompt and decoding). Worse = Hits@1 with the passages below the base reader's by more than
  ``hit_tolerance`` points, or a lower F1 (with ``no_forgetting``, also a lower closed-book Hits@1).
* **reranker** — the aligned reranker (as the answer step uses it: with its saved retriever fusion) against the
  retriever's order on the held-out lists ``train-reranker`` scores: utility nDCG@3 on the graded lists
  (``utility_metrics.json``) and answer-ranking MRR on the held-out training-split questions' retrieval lists
  (``retrieval_metrics.json``, with the saved retriever fusion). Worse = below the retriever on either (a comparison
  on fewer than 20 held-out lists decides only when no larger one was measured).

Policies per component: ``auto`` (the rule above), ``always``, ``never``. Without the evidence (no held-out
validation), ``auto`` promotes and says so. ``promotion.json`` holds the decisions with their numbers and reasons;
the pipeline wires the full system (``answer-full``) from it, the report prints it and ``dpa-rag serve --run``
serves only promoted parts.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from dpa_rag.config import StageConfig
from dpa_rag.io import read_json, write_json, write_text
from dpa_rag.stage import StageOutputs, stage_recorder

__all__ = [
    "PROMOTION_FILE", "PROMOTION_MD", "Config", "Outputs", "PromoteConfig", "PromoteOutputs", "decide_reader",
    "decide_reranker", "read_promotion", "run",
]

logger = logging.getLogger(__name__)

PROMOTION_FILE = "promotion.json"
PROMOTION_MD = "promotion.md"
Policy = Literal["auto", "always", "never"]
COMPONENTS = ("reader", "reranker")


class PromoteConfig(StageConfig):
    """Options of the promotion gate (the pipeline's ``promote`` setting and the ``promote`` section)."""

    reader_validation: Path | None = Field(None, description="train-llm's validation.json (the SFT stage).")
    reranker_dir: Path | None = Field(None, description="train-reranker's output folder (its held-out metrics).")
    reader: Policy = Field("auto", description="Promote the self-aligned reader: auto, always or never.")
    reranker: Policy = Field("auto", description="Promote the aligned reranker: auto, always or never.")
    hit_tolerance: float = Field(
        0.0, ge=0.0, description="Hits@1 points the aligned reader may lose against the base reader (auto)."
    )
    no_forgetting: bool = Field(
        False, description="Also refuse a reader that loses closed-book Hits@1 on the held-out questions (the full "
        "system always answers with passages, so by default forgetting is reported, not decisive)."
    )
    out_dir: Path = Field(description="Folder for promotion.json and promotion.md.")


@dataclasses.dataclass(frozen=True)
class PromoteOutputs(StageOutputs):
    """What the gate writes: the decisions (JSON) and their reading (markdown)."""

    FILES: ClassVar[dict[str, str]] = {"promotion": PROMOTION_FILE, "markdown": PROMOTION_MD}
    promotion: Path
    markdown: Path


Config = PromoteConfig
Outputs = PromoteOutputs


def decide_reader(
    validation: dict[str, Any] | None, policy: Policy, hit_tolerance: float = 0.0, no_forgetting: bool = False
) -> dict[str, Any]:
    """The reader's decision from a ``validation.json`` (``None``: no held-out validation ran).

    Example:
        >>> v = {"base": {"hits@1": 50.0, "em": 5.0, "f1": 20.0}, "selected": {"hits@1": 45.0, "em": 30.0,
        ...      "f1": 35.0}, "selected_step": 8, "n_questions": 20, "versus_base": {}}
        >>> decide_reader(v, "auto")["promoted"]
        False
    """
    out: dict[str, Any] = {"policy": policy}
    if validation is not None:
        out.update(
            baseline="base reader", n_questions=validation.get("n_questions"), base=validation.get("base"),
            aligned=validation.get("selected"), selected_step=validation.get("selected_step"),
            versus_base=validation.get("versus_base", {}),
        )
    if policy != "auto":
        return {**out, "promoted": policy == "always", "reason": f"policy {policy}"}
    if validation is None or not validation.get("base") or not validation.get("selected"):
        return {**out, "promoted": True, "reason": "no held-out validation ran (train-llm without --valid): "
                "promoted unchecked"}
    from dpa_rag.llm.validation import hit_loss

    base, aligned = validation["base"], validation["selected"]
    d_hits = aligned["hits@1"] - base["hits@1"]
    d_f1 = aligned["f1"] - base["f1"]
    loss = hit_loss(aligned, base, hit_tolerance, closed_book=no_forgetting)
    if loss is not None:
        return {**out, "promoted": False, "reason": loss}
    if d_f1 < -1e-9:
        return {**out, "promoted": False,
                "reason": f"F1 {aligned['f1']:.1f} vs the base reader's {base['f1']:.1f} ({d_f1:+.1f} points)"}
    if validation.get("selected_step") == 0 and d_hits == 0 and d_f1 == 0:
        return {**out, "promoted": False, "reason": "validation kept the starting weights: training changed nothing "
                "it could keep"}
    return {**out, "promoted": True, "reason": f"not worse than the base reader (Hits@1 {d_hits:+.1f}, "
            f"F1 {d_f1:+.1f} points)"}


def _reranker_evidence(reranker_dir: Path) -> list[dict[str, Any]]:
    """The held-out comparisons of the aligned reranker with the retriever's order, from its metrics files: utility
    nDCG@3 on the graded lists, and answer-ranking MRR on the held-out retrieval lists (with the retriever fusion
    when one was chosen, as the answer step uses it); each that was measured."""
    from dpa_rag.reranker import train as reranker_train

    out = reranker_train.Outputs.at(reranker_dir)
    evidence: list[dict[str, Any]] = []
    if out.utility_metrics.exists():
        rows = read_json(out.utility_metrics)
        retriever, aligned = rows.get("retriever order", {}), rows.get("aligned reranker", {})
        if "ndcg@3" in retriever and "ndcg@3" in aligned:
            evidence.append({"lists": "graded utility lists", "metric": "utility nDCG@3",
                             "retriever": retriever["ndcg@3"], "aligned": aligned["ndcg@3"],
                             "n_lists": int(aligned.get("n_questions", retriever.get("n_questions", 0)))})
    if out.retrieval_metrics.exists():
        rows = read_json(out.retrieval_metrics)
        retriever = rows.get("retriever order", {})
        fused = next((v for k, v in rows.items() if k.startswith("reranker + retriever fusion")), None)
        aligned = fused or rows.get("reranker", {})
        if "mrr" in retriever and "mrr" in aligned:
            metric = "answer MRR" + (" (with the retriever fusion)" if fused else "")
            evidence.append({"lists": "answer-ranking lists", "metric": metric, "retriever": retriever["mrr"],
                             "aligned": aligned["mrr"],
                             "n_lists": int(aligned.get("n_questions", retriever.get("n_questions", 0)))})
    return evidence


MIN_LISTS = 20  # a held-out comparison on fewer lists is reported, but decides only when no other one is larger


def decide_reranker(
    evidence: list[dict[str, Any]] | dict[str, Any] | None, policy: Policy, min_lists: int = MIN_LISTS
) -> dict[str, Any]:
    """The reranker's decision from its held-out evidence (one comparison or several; ``None``/empty: none was
    measured): not promoted when it ranks below the retriever on any comparison that has at least ``min_lists``
    held-out lists (all of them when none has)."""
    items = [evidence] if isinstance(evidence, dict) else list(evidence or [])
    out: dict[str, Any] = {"policy": policy, "baseline": "retriever order", "evidence": items}
    deciding = [e for e in items if e.get("n_lists", 0) >= min_lists] or items
    if policy != "auto":
        return {**out, "promoted": policy == "always", "reason": f"policy {policy}"}
    if not items:
        return {**out, "promoted": True, "reason": "no held-out ranking measured: promoted unchecked"}

    def said(e: dict[str, Any]) -> str:
        return (f"{e['metric']} {e['aligned']:.3f} vs the retriever's {e['retriever']:.3f} on {e['n_lists']} held-out "
                f"{e['lists']}")

    worse = [e for e in deciding if e["aligned"] - e["retriever"] < -1e-9]
    if worse:
        return {**out, "promoted": False, "reason": "; ".join(said(e) for e in worse)}
    small = [e for e in items if e not in deciding]
    note = f" (too few lists to decide: {'; '.join(said(e) for e in small)})" if small else ""
    return {**out, "promoted": True, "reason": "; ".join(said(e) for e in deciding) + note}


def _markdown(decisions: dict[str, dict[str, Any]]) -> str:
    lines = ["| Component | Promoted | Policy | Why |", "|---|---|---|---|"]
    names = {"reader": "self-aligned reader", "reranker": "aligned reranker"}
    for comp, d in decisions.items():
        lines.append(f"| {names[comp]} | {'yes' if d['promoted'] else '**no**'} | {d['policy']} | {d['reason']} |")
    reader = decisions.get("reader", {})
    vs = reader.get("versus_base") or {}
    if vs:
        lines += ["", f"Self-aligned reader minus base reader on {reader.get('n_questions')} held-out training-split "
                  "questions (paired bootstrap, 95% interval, points): "
                  + "; ".join(f"{m} {d['diff']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]" for m, d in vs.items())]
    return "\n".join(lines) + "\n"


def read_promotion(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The decisions of a finished gate folder, or ``None`` when it has none."""
    path = Outputs.at(folder).promotion
    return read_json(path) if path.exists() else None


def run(cfg: PromoteConfig) -> PromoteOutputs:
    """Decide each component and write ``promotion.json`` and ``promotion.md``."""
    out = Outputs.at(cfg.out_dir)
    inputs: list[Path | None] = [cfg.reader_validation]
    if cfg.reranker_dir is not None:
        from dpa_rag.reranker import train as reranker_train

        files = reranker_train.Outputs.at(cfg.reranker_dir)
        inputs += [p for p in (files.utility_metrics, files.retrieval_metrics) if p.exists()]
    rec = stage_recorder("promote", cfg, cfg.out_dir, inputs)
    decisions: dict[str, dict[str, Any]] = {}
    if cfg.reader_validation is not None:
        validation = read_json(cfg.reader_validation) if Path(cfg.reader_validation).exists() else None
        decisions["reader"] = decide_reader(validation, cfg.reader, cfg.hit_tolerance, cfg.no_forgetting)
    if cfg.reranker_dir is not None:
        decisions["reranker"] = decide_reranker(_reranker_evidence(Path(cfg.reranker_dir)), cfg.reranker)
    write_json(out.promotion, decisions)
    write_text(out.markdown, _markdown(decisions))
    for comp, d in decisions.items():
        logger.info("promotion: %s %s (%s)", comp, "promoted" if d["promoted"] else "NOT promoted", d["reason"])
    rec.finish(outputs=list(Outputs.FILES.values()), **{c: d["promoted"] for c, d in decisions.items()})
    return out
