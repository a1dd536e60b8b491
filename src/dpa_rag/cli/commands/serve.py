"""``dpa-rag serve``: serve a pipeline run (or explicit models) over HTTP."""

from __future__ import annotations

import typer

from dpa_rag.cli.builder import add_stage_command
from dpa_rag.serve.config import ServeConfig

__all__ = ["register"]

HELP = (
    "Serve the aligned system over HTTP: TEI/Cohere-style /rerank, /retrieve, OpenAI-compatible "
    "/v1/chat/completions and /v1/models, /answer, /health, /metrics and a comparison page at /. "
    "--run RUN_FOLDER serves that run's index, aligned reranker and self-aligned reader; with no option, the "
    "bundled sample and models (offline). Concurrent requests are micro-batched. Needs the serve extra "
    "(pip install -e '.\\[serve]'). See docs/serve.md."
)


def _run(cfg: ServeConfig) -> None:
    from dpa_rag.serve.server import run

    run(cfg)


def register(app: typer.Typer) -> None:
    """Add the ``serve`` command to ``app``."""
    add_stage_command(app, "serve", ServeConfig, _run, help=HELP, rich_help_panel="Inference")
