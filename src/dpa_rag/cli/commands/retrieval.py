"""``dpa-rag index`` and ``dpa-rag retrieve``."""

from __future__ import annotations

import typer

from dpa_rag.cli.builder import add_stage_command
from dpa_rag.retrieval import index, retrieve

__all__ = ["register"]

PANEL = "Retrieval"


def register(app: typer.Typer) -> None:
    """Add the ``index`` and ``retrieve`` commands to ``app``."""
    add_stage_command(
        app,
        "index",
        index.Config,
        index.run,
        help="Build a BM25 and/or dense (faiss) index over one or more corpus files; the index folder keeps its own "
        "copy of the passages (passages.jsonl).",
        rich_help_panel=PANEL,
    )
    add_stage_command(
        app,
        "retrieve",
        retrieve.Config,
        retrieve.run,
        help="Retrieve the top-k passages for each question (bm25, dense, or hybrid RRF); writes DPR-style "
        "retrieval.jsonl with has_answer flags and retrieval_metrics.json (answer hit@k, MRR).",
        rich_help_panel=PANEL,
    )
