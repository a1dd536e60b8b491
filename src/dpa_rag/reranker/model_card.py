"""The ``README.md`` model card written next to a trained reranker (config, losses, weighting, metrics, usage)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["render_model_card"]


def _table(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "_not evaluated_\n"
    rows = ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        rows.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(rows) + "\n"


def _retrieval_table(report: dict[str, dict[str, float]]) -> str:
    keys = ["mrr", "hit@1", "hit@3", "n_questions"]  # dpa_rag.eval.ranking's key scheme
    rows = ["| ranking | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, m in report.items():
        rows.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4f}" for k in keys) + " |")
    return "\n".join(rows) + "\n"


def render_model_card(
    *,
    config: dict[str, Any],
    head: str,
    score: str,
    losses: dict[str, dict[str, Any]],
    weighting: dict[str, Any],
    valid_metrics: dict[str, Any],
    test_metrics: dict[str, Any],
    retrieval_report: dict[str, dict[str, float]] | None = None,
    warmup: dict[str, Any] | None = None,
    fusion: dict[str, Any] | None = None,
    kind: str | None = None,
    utility_report: str | None = None,
) -> str:
    """Markdown model card: what the model is, how it was trained, how it scores, how to load it."""
    from dpa_rag.reranker.kinds import DEFAULT_KIND, get_kind

    kind = kind or DEFAULT_KIND
    card_cfg = {k: {kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v
                for k, v in config.items() if v is not None}
    own = get_kind(kind).card_fields(head)
    parts = [
        f"---\nlibrary_name: sentence-transformers\npipeline_tag: {own['pipeline_tag']}\ntags:\n- {own['tag']}\n"
        "- reranker\n- dpa-rag\n---\n",
        "# DPA-RAG aligned reranker\n",
        own["description"]
        + "trained with `dpa-rag train-reranker` to rank passages by what the reader LLM can use "
        "(DPA-RAG, Dong et al., WWW 2025): point-wise, pair-wise and contrastive preference losses combined by a "
        "weighting strategy.\n",
        f"- backbone: `{config.get('backbone')}`\n- kind: `{kind}`\n- loads with: {own['loads_with']}\n"
        + own["head_line"] +
        f"- inference score: `{score}`\n- weighting: `{weighting.get('weighting')}`\n",
        "## Usage\n",
        "```python\nfrom dpa_rag.reranker import Reranker\n"
        'rr = Reranker("path/to/model")\nrr.score("who wrote hamlet", ["Title: Hamlet Content: ..."])\n\n'
        f"from sentence_transformers import {own['st_class']}\n" + own["loader"] + "```\n",
        "Command line: `dpa-rag rerank --input retrieval.jsonl --model path/to/model --top-k 3`.\n",
        "## Losses\n",
        "```json\n" + json.dumps({"losses": losses, "weighting": weighting}, indent=2) + "\n```\n",
        "## Validation metrics (best checkpoint)\n",
        _table(valid_metrics),
        "## Test metrics (best checkpoint)\n",
        _table(test_metrics),
    ]
    if utility_report:
        parts += ["## Utility ranking on held-out questions (the reader's graded preferences)\n", utility_report]
    if warmup:
        parts += ["## Relevance warm-up\n", "```json\n" + json.dumps(warmup, indent=2) + "\n```\n"]
    if retrieval_report:
        parts += [
            "## Ranking quality on held-out questions\n",
            "Answer-bearing (`has_answer`) passages on held-out questions (training questions are dropped): "
            "retriever order = the retrieval file's order; backbone = the model before any training; reranker = "
            "this model (its checkpoint was picked on the preference validation pairs, whose questions may be among "
            "these); the fused row is optimistic: its weight was chosen on these same questions.\n",
            _retrieval_table(retrieval_report),
        ]
    if fusion:
        parts += [
            "## Retriever fusion\n",
            f"`dpa_rag.Reranker` and `dpa-rag rerank` sort by `alpha * z(reranker score) + (1 - alpha) * "
            f"z(-log retriever rank)` with **alpha = {fusion['alpha']:g}** (1 = this model alone, 0 = the "
            f"retriever's order), chosen by {fusion['metric'].upper()} on {fusion['questions']} held-out questions "
            "and saved in `config.json` (`dpa_rag.retriever_fusion`). `--fusion off` ranks by the model alone; "
            "`sentence_transformers.CrossEncoder` gives the model's own scores.\n",
            _retrieval_table({f"alpha={a}": m for a, m in fusion.get("grid", {}).items()}),
        ]
    parts += ["## Training configuration\n", "```json\n" + json.dumps(card_cfg, indent=2) + "\n```\n"]
    return "\n".join(parts)
