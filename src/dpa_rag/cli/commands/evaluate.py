"""``dpa-rag evaluate``: score prediction files and write a comparison report."""

from __future__ import annotations

import typer

from dpa_rag.cli.builder import add_stage_command
from dpa_rag.eval import evaluate

__all__ = ["register"]

HELP = (
    "Score one or more predictions files (Hits@1, EM, F1 ×100; per category; answer recall of the passages used) "
    "and write metrics.json, report.md and metrics.png. Repeat --predictions to compare systems; label them with "
    "--name or name=path. With --baseline NAME, every other system gets paired differences against it (Δ Hits@1, "
    "EM, F1 in points, questions aligned by id) with paired bootstrap confidence intervals (95% by default)."
)


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command to ``app``."""
    add_stage_command(app, "evaluate", evaluate.Config, evaluate.run, help=HELP, rich_help_panel="Inference")
