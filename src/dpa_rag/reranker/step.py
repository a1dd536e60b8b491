"""One training step's losses from one fused forward (or, as a reference, from the authors' separate passes).

:func:`compute_losses` encodes a kind's collated batch once (the kind's :meth:`~dpa_rag.reranker.kinds.base.
RerankerKind.encode`) and lets every loss object read its slice of the outputs; :func:`build_losses` makes the loss
objects from their registered names (:mod:`dpa_rag.reranker.losses.registry`). With ``separate=True`` the batch
(collated with ``grouped=True``: ``sort=False, dedupe=False``) is encoded group by group, each group padded to its
own length: the authors' four passes (method.md §6.1), kept for tests, ``mgda`` and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from dpa_rag.reranker.kinds import kind_of_model
from dpa_rag.reranker.losses.base import LossOptions, RerankerLoss
from dpa_rag.reranker.losses.registry import loss_classes
from dpa_rag.reranker.model import EncodeOutput

__all__ = ["build_losses", "compute_losses", "loss_classes", "losses_from_outputs"]


def build_losses(
    losses: Sequence[str],
    num_labels: int = 1,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrastive_anchor: str = "pairs",
    pair_margin: float = 0.0,
    options: LossOptions | None = None,
) -> dict[str, RerankerLoss]:
    """Loss objects by name, in registration order (``options`` overrides the keyword settings)."""
    options = options or LossOptions(num_labels=num_labels, temperature=temperature, base_temperature=base_temperature,
                                     contrastive_anchor=contrastive_anchor, pair_margin=pair_margin)
    return {cls.name: cls.from_options(options) for cls in loss_classes(losses)}


def losses_from_outputs(out: EncodeOutput, batch: dict[str, Any], modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Every loss's value from the fused forward's outputs (each loss reads its own slice)."""
    return {name: loss.compute(out, batch) for name, loss in modules.items()}


def compute_losses(
    model: nn.Module,
    batch: dict[str, Any],
    modules: dict[str, nn.Module],
    chunk_size: int | None = None,
    separate: bool = False,
    kind: Any = None,
) -> tuple[dict[str, Tensor], EncodeOutput]:
    """Encode the batch and return ``({loss name: value}, encoder outputs)``.

    Args:
        model: the reranker (any kind; ``kind`` defaults to the model's:
            :func:`~dpa_rag.reranker.kinds.kind_of_model`).
        batch: a batch of that kind's collator.
        modules: loss objects from :func:`build_losses`.
        chunk_size: rows per forward (``None`` or 0 = one forward; with ``separate``, per group).
        separate: one forward per group (``group_bounds``), each cut to its own padding: the authors' layout.
    """
    kind = kind or kind_of_model(model)
    out = kind.encode(model, batch, chunk_size=chunk_size, separate=separate)
    return losses_from_outputs(out, batch, modules), out
