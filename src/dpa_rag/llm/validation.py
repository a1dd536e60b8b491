"""Held-out validation of the reader while it is trained, and the choice of the checkpoint to keep.

``train-llm --valid FILE`` answers held-out training-split questions (a DPR-style retrieval file; ``build-llm-data``
writes ``valid.jsonl``, never from the evaluation questions) with the reader being trained, at step 0, every
``--eval-steps`` optimizer steps and at the end, and once with the base reader (for LoRA the same model with the
adapter switched off). The prompt, the passages and the decoding are the answer step's: :func:`answer_records` over
an :class:`~dpa_rag.generation.hf.HFGenerator` built on the model in memory, so a validation answer is the answer
``dpa-rag answer`` would give with those weights.

The checkpoint kept is chosen by :func:`select_step`, rule ``f1-no-hit-loss`` (default): among the evaluated steps
(step 0, the starting weights, included) whose Hits@1 is at least the base reader's minus ``--hit-tolerance``
points, the one with the highest F1 (ties: the earlier step); none eligible → step 0. ``final`` keeps the last
weights (validation only reports). The comparison with the base reader (paired bootstrap over the questions, Hits@1,
EM and F1) is written to ``validation.json`` and ``validation.md``, with the curve in ``validation.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dpa_rag.eval.bootstrap import paired_bootstrap
from dpa_rag.eval.evaluate import evaluate_predictions

__all__ = [
    "CLOSED", "METRICS", "SELECT_RULES", "VALIDATION", "VALIDATION_FILES", "ValidationResult", "Validator",
    "compare_to_base", "hit_loss", "row_metrics", "select_step", "validation_markdown", "write_model_card_section",
    "write_validation",
]

logger = logging.getLogger(__name__)

METRICS = ("hits@1", "em", "f1")  # percent, as evaluate_predictions reports them
SELECT_RULES = ("f1-no-hit-loss", "hits", "final")
SelectRule = Literal["f1-no-hit-loss", "hits", "final"]
_PER_QUESTION = {"hits@1": "hit", "em": "em", "f1": "f1"}


def _metrics(predictions: Sequence[dict[str, Any]]) -> dict[str, float]:
    m = evaluate_predictions(predictions)
    return {k: round(float(m[k]), 4) for k in METRICS}


CLOSED = "closed_book_"  # prefix of the closed-book metrics in a validation row
VALIDATION = "validation.json"
VALIDATION_FILES = (VALIDATION, "validation.md", "validation.png", "valid_predictions.jsonl")  # what --valid writes


def hit_loss(
    row: dict[str, Any], base: dict[str, float], hit_tolerance: float = 0.0, closed_book: bool = False
) -> str | None:
    """Why ``row`` loses answers the base reader had (``None``: it does not): its Hits@1 with the passages (and, with
    ``closed_book``, closed-book when measured: forgetting) below the base reader's by more than ``hit_tolerance``
    points."""
    keys = [("hits@1", "Hits@1"), *([(f"{CLOSED}hits@1", "closed-book Hits@1")] if closed_book else [])]
    for key, label in keys:
        if key in row and key in base and row[key] < base[key] - hit_tolerance - 1e-9:
            return f"{label} {row[key]:.1f} vs the base reader's {base[key]:.1f} ({row[key] - base[key]:+.1f} points)"
    return None


def select_step(
    steps: Sequence[dict[str, Any]], base: dict[str, float], rule: SelectRule = "f1-no-hit-loss",
    hit_tolerance: float = 0.0, closed_book: bool = False,
) -> int:
    """The optimizer step whose weights to keep, from the validation rows ``steps`` (``{"step", "hits@1", "f1",
    …}``, step 0 first) and the base reader's metrics ``base``.

    * ``f1-no-hit-loss``: among steps with ``hits@1 >= base hits@1 - hit_tolerance`` (with ``closed_book``, the
      same for the closed-book Hits@1), the highest F1 (ties: the earlier step); step 0 when none is eligible.
    * ``hits``: the highest Hits@1, ties broken by F1, then the earlier step.
    * ``final``: the last evaluated step.

    Example:
        >>> rows = [{"step": 0, "hits@1": 50, "f1": 20}, {"step": 5, "hits@1": 40, "f1": 45},
        ...         {"step": 10, "hits@1": 50, "f1": 35}]
        >>> select_step(rows, {"hits@1": 50, "f1": 20})
        10
    """
    if not steps:
        raise ValueError("no validation rows to choose from")
    if rule == "final":
        return int(steps[-1]["step"])
    if rule == "hits":
        best = max(steps, key=lambda r: (r["hits@1"], r["f1"], -r["step"]))
        return int(best["step"])
    if rule != "f1-no-hit-loss":
        raise ValueError(f"unknown selection rule {rule!r} (one of {', '.join(SELECT_RULES)})")
    eligible = [r for r in steps if not hit_loss(r, base, hit_tolerance, closed_book)]
    if not eligible:
        return int(steps[0]["step"])
    best = max(eligible, key=lambda r: (r["f1"], -r["step"]))
    return int(best["step"])


def compare_to_base(
    base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]], seed: int = 0, n_resamples: int = 4000
) -> dict[str, dict[str, float]]:
    """Paired bootstrap of ``other − base`` per metric (percentage points), over the questions both answered."""
    by_id = {p["id"]: p for p in other}
    pairs = [(a, by_id[a["id"]]) for a in base if a["id"] in by_id and a.get("scores")]
    if not pairs:
        return {}
    out = {}
    for metric, key in _PER_QUESTION.items():
        a = [100.0 * float(x["scores"][key]) for x, _ in pairs]
        b = [100.0 * float(y["scores"][key]) for _, y in pairs]
        r = paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed)
        out[metric] = {k: round(float(r[k]), 4) for k in ("diff", "lo", "hi", "p_value")}
    return out


def row_metrics(open_book: Sequence[dict[str, Any]], closed_book: Sequence[dict[str, Any]] | None) -> dict[str, float]:
    """A validation row's metrics: with the passages, and closed-book (prefixed ``closed_book_``) when measured."""
    row = _metrics(open_book)
    if closed_book:
        row.update({f"{CLOSED}{k}": v for k, v in _metrics(closed_book).items()})
    return row


@dataclass
class ValidationResult:
    """What validation found: the base reader's metrics, one row per evaluated step, the chosen step and its paired
    comparison with the base reader."""

    rule: str
    hit_tolerance: float
    n_questions: int
    top_k: int
    base: dict[str, float] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    selected_step: int | None = None
    selected: dict[str, float] = field(default_factory=dict)
    versus_base: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule, "hit_tolerance": self.hit_tolerance, "n_questions": self.n_questions,
            "top_k": self.top_k, "base": self.base, "steps": self.steps, "selected_step": self.selected_step,
            "selected": self.selected, "versus_base": self.versus_base,
        }


def validation_markdown(result: dict[str, Any]) -> str:
    """A short markdown table of a ``validation.json`` (the curve and the comparison with the base reader)."""
    cols = [*METRICS, *(f"{CLOSED}{m}" for m in METRICS if f"{CLOSED}{m}" in result["base"])]
    names = {"hits@1": "Hits@1", "em": "EM", "f1": "F1"}
    heads = [names[c] if c in names else f"closed-book {names[c[len(CLOSED):]]}" for c in cols]
    lines = [
        f"Held-out validation: {result['n_questions']} held-out questions, top-{result['top_k']} passages (and "
        f"closed-book where shown), the answer step's prompt and decoding. Rule `{result['rule']}` kept step "
        f"{result['selected_step']}.",
        "",
        "| Reader | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(cols),
        "| base reader | " + " | ".join(f"{result['base'][m]:.1f}" for m in cols) + " |",
    ]
    for row in result["steps"]:
        mark = " (kept)" if row["step"] == result["selected_step"] else ""
        lines.append(f"| step {row['step']}{mark} | " + " | ".join(f"{row.get(m, float('nan')):.1f}" for m in cols)
                     + " |")
    if result.get("versus_base"):
        lines += ["", "Kept weights minus the base reader (paired bootstrap, 95% interval, points):", ""]
        for m, d in result["versus_base"].items():
            lines.append(f"- {m}: {d['diff']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]")
    return "\n".join(lines) + "\n"


class Validator:
    """Answers the validation questions with a model in memory, the answer step's way.

    Args:
        records: held-out questions with ranked passages (``RetrievalRecord``).
        tokenizer: the training tokenizer (its chat template renders the prompts, as at answer time).
        top_k: passages per prompt (0: closed-book).
        template: prompt template name or file (the answer step's).
        chat: chat messages (default) or plain text.
        max_new_tokens: the answer step's decoding budget (greedy).
        batch_size: prompts per generation batch.
        closed_book: also answer closed-book (forgetting: what the reader knew without passages).
    """

    def __init__(
        self, records: Sequence[Any], tokenizer: Any, top_k: int = 3, template: str = "qa", chat: bool = True,
        max_new_tokens: int = 32, batch_size: int = 16, closed_book: bool = False,
    ) -> None:
        from dpa_rag.generation import GenerationParams
        from dpa_rag.prompts import load_template

        if not records:
            raise ValueError("no validation questions")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.template = load_template(template)
        self.chat = chat
        self.params = GenerationParams(max_new_tokens=max_new_tokens)
        self.batch_size = batch_size
        self.closed_book = closed_book

    def predict(self, model: Any, top_k: int | None = None) -> list[dict[str, Any]]:
        """Predictions of ``model`` with ``top_k`` passages (default: the validator's; 0: closed-book), in eval
        mode during the call, its training mode restored after."""
        import torch

        from dpa_rag.generation.hf import HFGenerator
        from dpa_rag.rag.answer import answer_records

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                gen = HFGenerator.from_model(model, self.tokenizer, batch_size=self.batch_size)
                k = self.top_k if top_k is None else top_k
                return answer_records(self.records, gen, self.template, k, self.params, chat=self.chat)
        finally:
            if was_training:
                model.train()

    def evaluate(self, model: Any) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
        """``(row metrics, {"open_book": predictions, "closed_book": predictions})`` of ``model`` (closed-book only
        when the validator measures it)."""
        preds = {"open_book": self.predict(model)}
        if self.closed_book:
            preds["closed_book"] = self.predict(model, top_k=0)
        return row_metrics(preds["open_book"], preds.get("closed_book")), preds



def write_validation(
    out_dir: Path, result: ValidationResult, predictions: dict[str, list[dict[str, Any]]]
) -> list[str]:
    """``validation.json``, ``validation.md``, ``valid_predictions.jsonl`` (base and kept) and the curve
    ``validation.png``; returns the names written."""
    from dpa_rag.io import write_json, write_jsonl, write_text

    data = result.to_dict()
    json_name, md_name, png_name, preds_name = VALIDATION_FILES
    write_json(out_dir / json_name, data)
    write_text(out_dir / md_name, validation_markdown(data))
    rows = [{**p, "reader": name} for name, preds in predictions.items() for p in preds]
    write_jsonl(out_dir / preds_name, rows)
    names = [json_name, md_name, preds_name]
    if _plot(data, out_dir / png_name):
        names.append(png_name)
    return names


CARD_HEADING = "## Held-out validation (dpa-rag)"


def write_model_card_section(model_dir: Path, result: dict[str, Any]) -> None:
    """Add (or replace) the held-out validation section of ``model_dir/README.md`` (the model card)."""
    from dpa_rag.io import write_text

    card = Path(model_dir) / "README.md"
    if not Path(model_dir).is_dir():
        return
    text = card.read_text(encoding="utf-8") if card.exists() else ""
    if CARD_HEADING in text:
        text = text[: text.index(CARD_HEADING)].rstrip() + "\n"
    section = f"{CARD_HEADING}\n\n{validation_markdown(result)}"
    write_text(card, (text.rstrip() + "\n\n" if text.strip() else "") + section)


def _plot(data: dict[str, Any], path: Path) -> bool:
    if len(data["steps"]) < 2:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in data["steps"]]
    for m, color in zip(METRICS, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        ax.plot(steps, [r[m] for r in data["steps"]], marker="o", color=color, label=m)
        ax.axhline(data["base"][m], color=color, linestyle=":", linewidth=1)
    if data.get("selected_step") is not None:
        ax.axvline(data["selected_step"], color="grey", linestyle="--", linewidth=1, label="kept")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("% of held-out questions")
    ax.set_title(f"held-out validation ({data['n_questions']} questions; dotted: base reader)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True
