"""Serve test helper: :func:`serving` runs an app on a loopback port for the duration of a ``with`` block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def serving(base: dict, **kwargs) -> Iterator[str]:
    from dpa_rag.serve import ServeConfig, ServerThread, build_app

    engine_kwargs = {k: kwargs.pop(k) for k in ("scorer",) if k in kwargs}
    app = build_app(ServeConfig(**{**base, **kwargs}), **engine_kwargs)
    with ServerThread(app) as url:
        yield url
