"""LLM self-alignment: the reader's pre-aligned stage, then SFT, on TRL's ``SFTTrainer`` (LoRA, QLoRA or full).

Entry points: :func:`run` (``dpa-rag train-llm``), :func:`load_for_inference` (a folder the answer stage loads),
:func:`init_args_from` (how the SFT stage starts from the prealign run), :func:`recipe_path` (shipped recipes).
"""

from __future__ import annotations

from dpa_rag.llm.config import TrainLLMConfig
from dpa_rag.llm.data import DataReport, LLMExample, check_lengths, load_examples, record_to_messages
from dpa_rag.llm.merge import init_args_from, load_for_inference, merge_adapter, read_train_info
from dpa_rag.llm.plot import plot_loss
from dpa_rag.llm.recipes import (
    accelerate_config_path,
    deepspeed_config_path,
    list_recipes,
    recipe_path,
    resolve_config_arg,
)
from dpa_rag.llm.templates import CHAT_TEMPLATES, resolve_chat_template
from dpa_rag.llm.train import build_model, build_trainer, data_files, load_tokenizer, run

__all__ = [
    "CHAT_TEMPLATES",
    "DataReport",
    "LLMExample",
    "TrainLLMConfig",
    "accelerate_config_path",
    "build_model",
    "build_trainer",
    "check_lengths",
    "data_files",
    "deepspeed_config_path",
    "init_args_from",
    "list_recipes",
    "load_examples",
    "load_for_inference",
    "load_tokenizer",
    "merge_adapter",
    "plot_loss",
    "read_train_info",
    "recipe_path",
    "record_to_messages",
    "resolve_chat_template",
    "resolve_config_arg",
    "run",
]
