"""The one place that maps loss names (and the authors' ``--cls_loss/--rank_loss/--scl_loss`` flags) to losses.

Torch-free, so :mod:`dpa_rag.reranker.config` validates ``--losses`` with it and ``dpa-rag --help`` stays cheap: an
entry names its class as ``"module:Class"`` (imported on first use) or holds the class itself (a loss registered at
run time, e.g. in a test). Adding a loss is one file in ``reranker/losses/`` plus one :func:`register_loss` line at the
bottom of this file (see docs/architecture.md).

Stages: ``align`` losses are trained by preference alignment (``--losses``, MGDA over them); ``warmup`` losses by the
relevance warm-up (one per ``--warmup-target``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LOSS_NAMES",
    "LossEntry",
    "align_loss_names",
    "authors_flags",
    "default_losses",
    "get_loss_class",
    "loss_classes",
    "loss_entry",
    "register_loss",
    "unregister_loss",
    "warmup_loss_name",
]


@dataclass(frozen=True)
class LossEntry:
    """One registered loss.

    Attributes:
        name: the name on the command line, in YAML, logs and the model card (``--losses point,pair``).
        target: the loss class, or ``"module:Class"`` to import on first use.
        stage: ``align`` (preference alignment) or ``warmup`` (relevance warm-up).
        default: trained when ``--losses`` is not given.
        authors_flag: the authors' switch for it (``cls_loss``), an accepted alias of ``--losses``.
        warmup_target: for a warm-up loss, the ``--warmup-target`` it trains.
    """

    name: str
    target: Any
    stage: str = "align"
    default: bool = False
    authors_flag: str | None = None
    warmup_target: str | None = None


_REGISTRY: dict[str, LossEntry] = {}


def register_loss(name: str, target: Any, *, stage: str = "align", default: bool = False,
                  authors_flag: str | None = None, warmup_target: str | None = None) -> LossEntry:
    """Register a loss under ``name`` (registration order = the order losses are collated, logged and weighted).

    Raises:
        ValueError: the name is taken or ``stage`` is unknown.
    """
    if name in _REGISTRY:
        raise ValueError(f"a reranker loss named {name!r} is already registered")
    if stage not in ("align", "warmup"):
        raise ValueError(f"loss stage must be 'align' or 'warmup'; got {stage!r}")
    entry = LossEntry(name, target, stage, default, authors_flag, warmup_target)
    _REGISTRY[name] = entry
    return entry


def unregister_loss(name: str) -> None:
    """Remove a loss registered at run time (tests)."""
    _REGISTRY.pop(name, None)


def loss_entry(name: str) -> LossEntry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown reranker loss {name!r}; choose from {', '.join(align_loss_names())}")
    return _REGISTRY[name]


def get_loss_class(name: str) -> type:
    """The loss class registered as ``name`` (imported on first use)."""
    target = loss_entry(name).target
    if isinstance(target, str):
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
    return target


def loss_classes(losses: Any) -> list[type]:
    """Alignment-loss classes for names (or classes), in registration order.

    Raises:
        ValueError: an unknown name or an empty set.
    """
    wanted = {x if isinstance(x, str) else x.name for x in losses}
    names = [n for n in align_loss_names() if n in wanted]
    if set(names) != wanted or not names:
        raise ValueError(f"losses must be a non-empty subset of {', '.join(align_loss_names())}; got {list(losses)}")
    return [get_loss_class(n) for n in names]


def align_loss_names() -> tuple[str, ...]:
    """Names of the preference-alignment losses, in registration order."""
    return tuple(e.name for e in _REGISTRY.values() if e.stage == "align")


def default_losses() -> list[str]:
    """The losses trained when ``--losses`` is not given."""
    return [e.name for e in _REGISTRY.values() if e.stage == "align" and e.default]


def authors_flags() -> dict[str, str]:
    """The authors' switches and the loss each turns on (``{"cls_loss": "point", ...}``)."""
    return {e.authors_flag: e.name for e in _REGISTRY.values() if e.authors_flag}


def warmup_loss_name(target: str) -> str:
    """The warm-up loss that trains ``--warmup-target`` ``target`` (distilled targets share one loss)."""
    for e in _REGISTRY.values():
        if e.stage == "warmup" and e.warmup_target in (target, "*"):
            return e.name
    raise ValueError(f"no warm-up loss for target {target!r}")


# --- the registered losses (one line each) -------------------------------------------------------------------------
register_loss("point", "dpa_rag.reranker.losses.pointwise:PointwiseLoss", default=True, authors_flag="cls_loss")
register_loss("pair", "dpa_rag.reranker.losses.pairwise:PairwiseLoss", default=True, authors_flag="rank_loss")
register_loss("contrastive", "dpa_rag.reranker.losses.contrastive:ContrastiveLoss", default=True,
              authors_flag="scl_loss")
register_loss("listwise", "dpa_rag.reranker.losses.listwise:ListwiseLoss")
register_loss("relevance-ce", "dpa_rag.reranker.losses.relevance:RelevanceCELoss", stage="warmup",
              warmup_target="has-answer")
register_loss("distill-kl", "dpa_rag.reranker.losses.distill:DistillKLLoss", stage="warmup", warmup_target="*")

# The authors' three preference losses, in their order (cls, rank, scl).
LOSS_NAMES: tuple[str, ...] = tuple(default_losses())
