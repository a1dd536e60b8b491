"""``dpa-rag mine``, ``build-reranker-data``, ``build-llm-data``: preference extraction and the data builders."""

from __future__ import annotations

import typer

from dpa_rag.cli.builder import add_stage_command
from dpa_rag.stage import StageOutputs

__all__ = ["register"]

PANEL = "Preference data"


def _mine(cfg: object) -> StageOutputs:
    from dpa_rag.mining.mine import run

    return run(cfg)  # type: ignore[arg-type]


def _reranker_data(cfg: object) -> StageOutputs:
    from dpa_rag.mining.reranker_data import run

    return run(cfg)  # type: ignore[arg-type]


def _llm_data(cfg: object) -> StageOutputs:
    from dpa_rag.mining.llm_data import run

    return run(cfg)  # type: ignore[arg-type]


def register(app: typer.Typer) -> None:
    """Add the three commands to the ``dpa-rag`` app."""
    from dpa_rag.mining.llm_data import LLMDataConfig
    from dpa_rag.mining.mine import MineConfig
    from dpa_rag.mining.reranker_data import RerankerDataConfig

    add_stage_command(
        app,
        "mine",
        MineConfig,
        _mine,
        help="Preference knowledge extraction: the reader answers closed-book and with each probed passage "
        "(ranks 1, 25, 50, 100); each passage is labelled aligned, unaligned, both-correct or both-wrong. "
        "Batched, cached and resumable.",
        rich_help_panel=PANEL,
    )
    add_stage_command(
        app,
        "build-reranker-data",
        RerankerDataConfig,
        _reranker_data,
        help="Reranker train/valid/test files in the DPA-RAG authors' format from preferences.jsonl.",
        rich_help_panel=PANEL,
    )
    add_stage_command(
        app,
        "build-llm-data",
        LLMDataConfig,
        _llm_data,
        help="The reader's pre-aligned and SFT sets (LLaMA-Factory alpaca JSON and chat-messages JSONL).",
        rich_help_panel=PANEL,
    )
