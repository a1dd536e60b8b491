"""The ``dpa-rag`` command line: one typer app, one thin command per pipeline stage.

Commands live in ``dpa_rag/cli/commands/<module>.py``; each module has ``register(app)``. They are listed here in
pipeline order so ``--help`` reads like the pipeline.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os

import typer

from dpa_rag.cli.errors import error_boundary

__all__ = ["app", "main"]

COMMAND_MODULES = [
    "env",
    "retrieval",  # index, retrieve
    "mining",  # mine, build-reranker-data, build-llm-data
    "augment",  # augment, filter
    "reranker",  # train-reranker, rerank
    "llm",  # train-llm
    "answer",  # answer
    "evaluate",  # evaluate
    "serve",  # serve
    "pipeline",  # run, demo
]

app = typer.Typer(
    name="dpa-rag",
    help=(
        "DPA-RAG: align retrieval with what the reader LLM can use.\n\n"
        "Stages: index → retrieve → mine → augment → filter → build-reranker-data → train-reranker → rerank → "
        "build-llm-data → train-llm → answer → evaluate; `run` chains them from one YAML config."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _global(
    verbose: bool = typer.Option(
        False, "--verbose", "-v", "--debug", help="Debug logging (and tracebacks on errors)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler()
    handler.setLevel(level)  # libraries that set their own logger to DEBUG (bm25s) stay quiet unless -v
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in (
        "httpx", "urllib3", "filelock", "huggingface_hub", "sentence_transformers", "transformers", "bm25s", "faiss",
        "faiss.loader", "accelerate", "peft", "trl", "datasets",
    ):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _guard(name: str, callback):
    """Run ``callback`` inside the error boundary (one ``error:`` line, exit code 2; see ``cli/errors.py``) with
    SIGTERM/SIGINT turned into a stop at the next safe point (:mod:`dpa_rag.jobs`)."""

    from dpa_rag.jobs import handle_preemption

    @functools.wraps(callback)
    def guarded(*args, **kwargs):
        # serve: uvicorn handles SIGTERM/SIGINT itself (it drains in-flight requests)
        signals = contextlib.nullcontext() if name == "serve" else handle_preemption()
        with error_boundary(name), signals:
            return callback(*args, **kwargs)

    return guarded


def _register_all() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"dpa_rag.cli.commands.{name}").register(app)
    for info in app.registered_commands:  # every command, however registered, fails the same way
        if info.callback is not None:
            info.callback = _guard(info.name or info.callback.__name__, info.callback)


_register_all()


def main() -> None:
    """Entry point of the ``dpa-rag`` script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
