"""``dpa-rag augment`` and ``dpa-rag filter``: query rewrites and their consistency filter."""

from __future__ import annotations

import typer

from dpa_rag.augment.augment import AugmentConfig
from dpa_rag.augment.augment import run as run_augment
from dpa_rag.augment.filter import FilterConfig
from dpa_rag.augment.filter import run as run_filter
from dpa_rag.cli.builder import add_stage_command

__all__ = ["register"]

PANEL = "Query augmentation"


def register(app: typer.Typer) -> None:
    """Add ``augment`` and ``filter`` to the app."""
    add_stage_command(
        app,
        "augment",
        AugmentConfig,
        run_augment,
        help="Rewrite each question once per strategy (rephrasing, complexity, decomposition, constraint, sparql) "
        "with an LLM; writes augmented.jsonl (authors' format) and questions_augmented.jsonl. Resumable.",
        rich_help_panel=PANEL,
    )
    add_stage_command(
        app,
        "filter",
        FilterConfig,
        run_filter,
        help="Keep only rewrites consistent with their original (nli: no contradiction; similarity: cosine above a "
        "threshold); writes the filtered files and filter_report.{json,md}.",
        rich_help_panel=PANEL,
    )
