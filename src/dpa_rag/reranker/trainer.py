"""The reranker trainer: ``transformers.Trainer`` with the fused multi-loss step and a weighting strategy (its
``TrainingArguments`` come from :mod:`dpa_rag.reranker.training_args`).

Riding the HF Trainer gives mixed precision, gradient accumulation, ``accelerate launch``/DeepSpeed, resume from a
checkpoint, TensorBoard and best-checkpoint selection. What is ours:

* :meth:`RerankerTrainer.compute_loss`: one fused forward (:func:`~dpa_rag.reranker.step.compute_losses`), the
  strategy's weights (``mgda-ub``: ``autograd.grad`` to the last hidden-state tensor only; ``equal``/``fixed``:
  nothing extra), and the weighted sum, which the Trainer backpropagates once.
* ``mgda`` needs each loss's gradient over the encoder parameters. Through one fused forward, every per-loss
  ``autograd.grad`` would run back through *all* rows of the batch; so for ``mgda`` the collator keeps the groups
  apart (``FusedCollator(sort=False, dedupe=False)``) and each group gets its own forward: a loss's gradient then
  only traverses its own rows (together one backward's worth of work). In a single process (no DDP/DeepSpeed/FSDP,
  no fp16 loss scaler) :meth:`RerankerTrainer.training_step` then skips the weighted backward altogether and sets
  ``p.grad = Σ_t α_t ∂L_t/∂p`` from the per-loss gradients it already has (:func:`mgda_direct_gradients`; the
  same gradient, one backward fewer). Elsewhere it falls back to the weighted backward.
* per-loss values and weights of every step are kept (:attr:`RerankerTrainer.step_history`) and added to the logs
  (``loss_point``, ``weight_point``, …; TensorBoard ``train/…``);
* :meth:`RerankerTrainer.evaluate` runs a :class:`~dpa_rag.reranker.evaluation.PairEvaluator` (``eval_f1``, …),
  so ``metric_for_best_model``/``load_best_model_at_end`` work.

Multi-process runs (``accelerate launch``/torchrun, DDP or DeepSpeed): :meth:`RerankerTrainer.evaluate` scores on the
main process only (on every process under ZeRO-3, whose forward gathers partitioned weights) and broadcasts the
main process's metrics, so ``metric_for_best_model``/``load_best_model_at_end`` pick the same checkpoint on every
process; ``mgda``/``mgda-ub`` sum the processes' Gram matrices (:func:`~dpa_rag.reranker.weighting.all_reduce_gram`),
so every process uses the same weights.

Known limits: ``mgda`` differentiates w.r.t. the parameters with ``torch.autograd.grad``; this needs unpartitioned
parameters: under DeepSpeed ZeRO-3 it fails up front (:func:`check_weighting_supported`; use ``mgda-ub`` or
``equal`` there).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from dpa_rag.reranker.evaluation import PairEvaluator
from dpa_rag.reranker.model import shared_parameters
from dpa_rag.reranker.step import compute_losses
from dpa_rag.reranker.weighting import MGDAWeighting, Weighting, gram_matrix

__all__ = [
    "LogCallback",
    "RerankerTrainer",
    "check_weighting_supported",
    "deepspeed_zero3_enabled",
    "mgda_direct_gradients",
]

logger = logging.getLogger(__name__)


def deepspeed_zero3_enabled(accelerator: Any = None) -> bool:
    """Whether this run partitions parameters with DeepSpeed ZeRO stage 3.

    Checked, in order: ``accelerator``'s DeepSpeed plugin (inside a Trainer), transformers'
    ``is_deepspeed_zero3_enabled()`` (a ``TrainingArguments(deepspeed=...)`` config), and what ``accelerate launch``
    exports (``ACCELERATE_USE_DEEPSPEED`` with ``ACCELERATE_DEEPSPEED_ZERO_STAGE=3`` or a
    ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` whose ``zero_optimization.stage`` is 3), so it also works before any Trainer
    exists.
    """
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        return True
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            return True
    except ImportError:  # pragma: no cover - old transformers
        pass
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() not in ("1", "true", "yes"):
        return False
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip() == "3":
        return True
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                stage = (json.load(fh).get("zero_optimization") or {}).get("stage")
        except (OSError, ValueError, AttributeError):
            return False
        return str(stage) == "3"
    return False


def check_weighting_supported(weighting: Weighting, n_losses: int, accelerator: Any = None) -> None:
    """Fail before training where a weighting cannot run: ``mgda`` (more than one loss) under DeepSpeed ZeRO-3.

    Raises:
        ValueError: naming the strategies that do work there (``mgda-ub``, ``equal``).
    """
    if isinstance(weighting, MGDAWeighting) and n_losses > 1 and deepspeed_zero3_enabled(accelerator):
        raise ValueError(
            "weighting 'mgda' takes per-loss gradients over the encoder's parameters (torch.autograd.grad), which "
            "DeepSpeed ZeRO-3 partitions across processes; use --weighting mgda-ub (gradients w.r.t. the shared "
            "representation) or --weighting equal, or ZeRO stage 1/2"
        )


def mgda_direct_gradients(
    model: nn.Module,
    losses: dict[str, torch.Tensor],
    weighting: MGDAWeighting,
    scale: float = 1.0,
) -> dict[str, float]:
    """Parameter-level MGDA without a weighted backward: per-loss gradients → Gram → α → ``p.grad += scale·Σα_t g_t``.

    The Gram matrix uses the shared encoder parameters only (head and pooler excluded, method.md §6.3); every
    trainable parameter gets the weighted gradient (added to ``p.grad``, so gradient accumulation works).

    Returns:
        The weights per loss name.
    """
    names = list(losses)
    params = [p for p in model.parameters() if p.requires_grad]
    shared = {id(p) for p in shared_parameters(model)}
    grads = [
        torch.autograd.grad(losses[k], params, retain_graph=i < len(names) - 1, allow_unused=True)
        for i, k in enumerate(names)
    ]
    if len(names) == 1:
        weights = {names[0]: 1.0}
    else:
        gram = gram_matrix([[g for g, p in zip(gs, params, strict=True) if id(p) in shared] for gs in grads])
        weights = weighting.weights_from_gram(gram, names)
    for j, p in enumerate(params):
        acc = None
        for i, k in enumerate(names):
            g = grads[i][j]
            if g is None or weights[k] == 0.0:
                continue
            acc = g * (weights[k] * scale) if acc is None else acc.add_(g, alpha=weights[k] * scale)
        if acc is not None:
            p.grad = acc.to(p.dtype) if p.grad is None else p.grad.add_(acc)
    return weights


class LogCallback(TrainerCallback):
    """Send the Trainer's logs to ``logging`` (instead of printing dicts to stdout)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and logs:
            text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            logger.info("step %d: %s", state.global_step, text)


class RerankerTrainer(Trainer):
    """HF ``Trainer`` for the reranker's losses: the one Trainer subclass (preference alignment and the relevance
    warm-up).

    Args:
        loss_modules: loss objects by name (:func:`~dpa_rag.reranker.step.build_losses`; the warm-up: its one loss).
        weighting: the loss weighting strategy.
        evaluator: scores the validation pairs in :meth:`evaluate` (``None``: no evaluation).
        forward_chunk_size: rows per encoder forward (``None`` = one forward per step).
        kind: the model's :class:`~dpa_rag.reranker.kinds.base.RerankerKind` (default: detected from the model).
        *args, **kwargs: passed to ``transformers.Trainer`` (``model``, ``args``, ``train_dataset``,
            ``data_collator``, ``processing_class`` = the tokenizer, ...).
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean; the Trainer divides by GA steps

    def __init__(
        self,
        *args: Any,
        loss_modules: dict[str, nn.Module],
        weighting: Weighting,
        evaluator: PairEvaluator | None = None,
        forward_chunk_size: int | None = None,
        kind: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.kind = kind
        check_weighting_supported(weighting, len(loss_modules), self.accelerator)
        self.loss_modules = loss_modules
        self.weighting = weighting
        if evaluator is None and isinstance(self.eval_dataset, PairEvaluator):
            evaluator = self.eval_dataset
        self.evaluator = evaluator
        self.forward_chunk_size = forward_chunk_size
        self.step_history: list[dict[str, Any]] = []
        self._pending: list[dict[str, Any]] = []

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        separate = self.weighting.grouped_batches and bool(inputs.get("grouped", False))
        losses, out = compute_losses(
            model, inputs, self.loss_modules, chunk_size=self.forward_chunk_size, separate=separate, kind=self.kind
        )
        if model.training and len(losses) > 1 and self.weighting.needs is not None:
            params = None
            if self.weighting.needs == "parameters":
                params = shared_parameters(self.accelerator.unwrap_model(model))
            weights = self.weighting.weights(losses, parameters=params, representation=out.hidden)
        else:
            weights = self.weighting.weights(losses)
        total = sum(weights[k] * v for k, v in losses.items())
        if model.training:
            self._record(losses, weights)
        return (total, out) if return_outputs else total

    def _record(self, losses: dict[str, torch.Tensor], weights: dict[str, float]) -> None:
        entry = {
            "step": self.state.global_step + 1,
            "losses": {k: float(v.detach()) for k, v in losses.items()},
            "weights": dict(weights),
        }
        self.step_history.append(entry)
        self._pending.append(entry)

    def _direct_mgda(self) -> bool:
        from accelerate.utils import DistributedType

        return (
            isinstance(self.weighting, MGDAWeighting)
            and self.accelerator.distributed_type == DistributedType.NO
            and getattr(self.accelerator, "scaler", None) is None
            and not self.is_deepspeed_enabled
            and not self.is_fsdp_enabled
            and self.args.n_gpu <= 1
        )

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The Trainer's step, except ``mgda`` in a single process: gradients set from the per-loss gradients."""
        if not self._direct_mgda():
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            separate = bool(inputs.get("grouped", False))
            losses, _ = compute_losses(
                model, inputs, self.loss_modules, chunk_size=self.forward_chunk_size, separate=separate,
                kind=self.kind,
            )
        scale = 1.0 / self.current_gradient_accumulation_steps
        weights = mgda_direct_gradients(self.accelerator.unwrap_model(model), losses, self.weighting, scale)
        self._record(losses, weights)
        total = sum(weights[k] * v.detach() for k, v in losses.items())
        return total * scale

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._pending:
            sums: dict[str, float] = defaultdict(float)
            for entry in self._pending:
                for k, v in entry["losses"].items():
                    sums[f"loss_{k}"] += v
                for k, v in entry["weights"].items():
                    sums[f"weight_{k}"] += v
            logs.update({k: v / len(self._pending) for k, v in sums.items()})
            self._pending = []
        super().log(logs, start_time)

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Score the validation pairs; metrics are prefixed (``eval_f1``, ``eval_mrr``, ...) and logged.

        With several processes the main process scores (every process under ZeRO-3, where the forward gathers the
        partitioned weights) and its metrics are broadcast: every process sees the same values, so the Trainer's
        best-checkpoint choice (``metric_for_best_model``, ``load_best_model_at_end``) cannot differ between them.
        A collective then: every process must call it (the Trainer does).
        """
        evaluator = eval_dataset if isinstance(eval_dataset, PairEvaluator) else self.evaluator
        if evaluator is None:
            return {}
        start = time.time()
        model = self.accelerator.unwrap_model(self.model)
        multi = self.accelerator.num_processes > 1
        metrics: dict[str, float] | None = None
        if not multi or self.accelerator.is_main_process or deepspeed_zero3_enabled(self.accelerator):
            raw = evaluator(model, self.processing_class)
            metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in raw.items()}
            metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        if multi:
            from accelerate.utils import broadcast_object_list

            box: list[Any] = [metrics]
            broadcast_object_list(box, from_process=0)
            metrics = box[0]
        assert metrics is not None
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
