"""Reranker kinds: one file per kind, each a :class:`~dpa_rag.reranker.kinds.base.RerankerKind` that owns loading and
saving, collation, encoding, scoring and its model-card fields.

The registry is torch-free (``dpa-rag --help`` and the configs read :func:`kind_names`): an entry names its class as
``"module:Class"``, imported on first use. Adding a kind is one file in this folder plus one :func:`register_kind`
line below (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_KIND", "get_kind", "kind_names", "kind_of_model", "register_kind", "resolve_kind"]

_REGISTRY: dict[str, Any] = {}
_LOADED: dict[str, Any] = {}


def register_kind(name: str, target: Any) -> None:
    """Register a kind (``target``: its class, or ``"module:Class"``)."""
    if name in _REGISTRY or name == "auto":
        raise ValueError(f"a reranker kind named {name!r} is already registered")
    _REGISTRY[name] = target


def kind_names() -> tuple[str, ...]:
    """The registered kinds, in registration order (the first is the default of ``--kind auto``)."""
    return tuple(_REGISTRY)


def get_kind(name: str) -> Any:
    """The kind registered as ``name`` (an instance of its class).

    Raises:
        ValueError: an unknown kind.
    """
    if name not in _REGISTRY:
        raise ValueError(f"reranker kind must be one of auto, {', '.join(_REGISTRY)}; got {name!r}")
    if name not in _LOADED:
        target = _REGISTRY[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
        _LOADED[name] = target()
    return _LOADED[name]


def resolve_kind(backbone: str, kind: str = "auto") -> str:
    """The kind of ``backbone`` (alias, hub id or folder): ``kind`` itself unless ``auto``; for ``auto``, the first
    registered kind after the default whose :meth:`~dpa_rag.reranker.kinds.base.RerankerKind.detect` recognises the
    backbone (the bi-encoder: sentence-transformers embedding models and folders saved as bi-encoder rerankers), else
    :data:`DEFAULT_KIND` (the cross-encoder: the paper's choice)."""
    if kind != "auto":
        get_kind(kind)  # validates
        return kind
    from dpa_rag.models import resolve_encoder

    path = Path(resolve_encoder(backbone))
    for name in kind_names()[1:]:
        if get_kind(name).detect(backbone, path):
            return name
    return DEFAULT_KIND


def kind_of_model(model: Any) -> Any:
    """The kind of a loaded model (unwrapped from data-parallel wrappers): the first non-default kind that owns it,
    else the default."""
    for name in kind_names()[1:]:
        kind = get_kind(name)
        if kind.owns(model):
            return kind
    return get_kind(DEFAULT_KIND)


# --- the registered kinds (one line each; the first is the default) -------------------------------------------------
register_kind("cross-encoder", "dpa_rag.reranker.kinds.cross_encoder:CrossEncoderKind")
register_kind("bi-encoder", "dpa_rag.reranker.kinds.bi_encoder:BiEncoderKind")

DEFAULT_KIND = kind_names()[0]
