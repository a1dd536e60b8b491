"""``dpa-rag answer``: the reader answers each question from its top-k (optionally reranked) passages."""

from __future__ import annotations

import typer

from dpa_rag.cli.builder import add_stage_command
from dpa_rag.rag import answer

__all__ = ["register"]

HELP = (
    "Answer questions with the reader LLM from the top-k passages of a retrieval file (baseline RAG), optionally "
    "reranked first (--reranker), or closed-book (--questions, or --top-k 0). Writes predictions.jsonl and "
    "metrics.json; generations are cached, so a re-run makes no model calls."
)


def register(app: typer.Typer) -> None:
    """Add the ``answer`` command to ``app``."""
    add_stage_command(app, "answer", answer.Config, answer.run, help=HELP, rich_help_panel="Inference")
