"""The reranker's ``TrainingArguments``: built in one place from :class:`~dpa_rag.reranker.config.TrainRerankerConfig`.

:class:`RerankerTrainingArguments` subclasses ``transformers.TrainingArguments`` (as sentence-transformers and TRL
do) with the authors' optimiser as its defaults (AdamW, eps 1e-6, weight decay 0, no clipping; method.md §6.4), run
by torch's fused AdamW kernel (the same update; transformers' default on torch >= 2.8). The config's fields that are
``TrainingArguments`` fields (:data:`CONFIG_FIELDS`, same names) are copied by name: their defaults live in the
config only. Two runs use it: preference alignment (:meth:`RerankerTrainingArguments.for_alignment`) and the
relevance warm-up (:meth:`RerankerTrainingArguments.for_warmup`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from dpa_rag.eval.ranking import canonical_metric

__all__ = ["CONFIG_FIELDS", "RerankerTrainingArguments"]

# TrainRerankerConfig fields passed to TrainingArguments under the same name
CONFIG_FIELDS = (
    "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "max_grad_norm", "bf16", "seed", "eval_strategy", "eval_steps",
    "save_total_limit", "logging_steps",
)


@dataclass
class RerankerTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the authors' optimiser, no worker processes, logging to ``logging``."""

    optim: str = field(default="adamw_torch_fused", metadata={"help": "Optimiser (the authors' AdamW)."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon (the authors' 1e-6)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (the authors' 0)."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "Gradient clipping norm (0 = off, the authors')."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Collators need the whole records."})
    disable_tqdm: bool = field(default=True, metadata={"help": "Progress goes to logging."})

    @classmethod
    def for_alignment(cls, cfg: Any, output_dir: str, *, use_cpu: bool, evaluate: bool,
                      tensorboard: bool) -> RerankerTrainingArguments:
        """Preference alignment: checkpoints on the evaluation schedule, the best one (``metric_for_best_model``,
        older spellings mapped by :func:`dpa_rag.eval.ranking.canonical_metric`) loaded at the end."""
        metric = canonical_metric(cfg.metric_for_best_model)
        values = {name: getattr(cfg, name) for name in CONFIG_FIELDS}
        return cls(
            output_dir=output_dir, **{**values, "eval_strategy": cfg.eval_strategy if evaluate else "no"},
            max_steps=cfg.max_steps or -1, data_seed=cfg.seed, use_cpu=use_cpu,
            save_strategy=cfg.eval_strategy, save_steps=cfg.eval_steps, load_best_model_at_end=evaluate,
            metric_for_best_model=metric if evaluate else None,
            greater_is_better=not any(x in metric for x in ("loss", "error")) if evaluate else None,
            report_to=["tensorboard"] if tensorboard else [],
        )

    @classmethod
    def for_warmup(cls, cfg: Any, output_dir: str, *, use_cpu: bool) -> RerankerTrainingArguments:
        """The relevance warm-up: a constant ``warmup_lr`` for ``warmup_epochs``, no evaluation, checkpoints or
        TensorBoard, a loss logged every step (the batch size, clipping, precision and seed of the alignment)."""
        return cls(
            output_dir=output_dir, num_train_epochs=cfg.warmup.epochs,
            per_device_train_batch_size=cfg.per_device_train_batch_size, learning_rate=cfg.warmup.lr,
            lr_scheduler_type="constant", max_steps=cfg.max_steps or -1, max_grad_norm=cfg.max_grad_norm,
            bf16=cfg.bf16, seed=cfg.seed, use_cpu=use_cpu, eval_strategy="no", save_strategy="no",
            logging_steps=1, report_to=[],
        )
