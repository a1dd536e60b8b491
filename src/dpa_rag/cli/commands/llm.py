"""``dpa-rag train-llm``: the reader's self-alignment (pre-aligned stage, then SFT)."""

from __future__ import annotations

import inspect
from typing import Any

import typer

from dpa_rag.cli.builder import add_stage_command, fail
from dpa_rag.config import ConfigError
from dpa_rag.stage import StageOutputs

__all__ = ["register"]

HELP = (
    "Fine-tune the reader with TRL's SFTTrainer: --stage prealign, then --stage sft from the prealign run "
    "(--init-adapter <prealign>/adapter, or --init-model <prealign>/merged|model). LoRA by default, "
    "--method qlora|full. "
    "Loss on the answer tokens only. --config takes a YAML file or a shipped recipe name (paper, cpu_smollm2). "
    "Writes adapter/ (or model/), merged/ with --merge, train_log.json, loss.png, data_report.json."
)


def _run(cfg: Any) -> StageOutputs:
    from dpa_rag.llm.train import run

    return run(cfg)


def register(app: typer.Typer) -> None:
    """Add ``train-llm`` to ``app``; ``--config`` also accepts a shipped recipe name."""
    from dpa_rag.llm.config import TrainLLMConfig
    from dpa_rag.llm.recipes import resolve_config_arg

    inner = add_stage_command(typer.Typer(), "train-llm", TrainLLMConfig, _run, help=HELP)

    def train_llm(**kwargs: Any) -> None:
        if kwargs.get("config") is not None:
            try:
                kwargs["config"] = resolve_config_arg(kwargs["config"])
            except ConfigError as exc:
                fail(str(exc))
        inner(**kwargs)

    train_llm.__signature__ = inspect.signature(inner)  # type: ignore[attr-defined]
    train_llm.__annotations__ = dict(inner.__annotations__)
    app.command("train-llm", help=inner.__doc__, rich_help_panel="Reader alignment",
                **inner.command_kwargs)(train_llm)  # type: ignore[attr-defined]  # bare --flash_attn
