"""Start the server: resolve the plan, load the models, run uvicorn (or a background thread, for tests/benchmarks)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from typing import Any

from dpa_rag.config import ConfigError
from dpa_rag.serve.config import ServeConfig

__all__ = ["LoadingGate", "ServerThread", "api_key_from_env", "build_app", "free_port", "run"]

logger = logging.getLogger(__name__)


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("dpa-rag serve needs the serve extra: pip install -e '.[serve]'") from None


def api_key_from_env(cfg: ServeConfig) -> str | None:
    """The API key from ``cfg.api_key_env`` (``None`` when no variable is named); an unset variable is an error."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "").strip()
    if not key:
        raise ConfigError(f"--api-key-env {cfg.api_key_env}: that environment variable is not set or empty")
    return key


def build_app(cfg: ServeConfig, **engine_kwargs: Any) -> Any:
    """The FastAPI app for ``cfg`` (models loaded now); ``engine_kwargs`` go to :class:`Engine` (tests: fakes)."""
    _require_extra()
    from dpa_rag.serve.app import create_app
    from dpa_rag.serve.engine import Engine
    from dpa_rag.serve.plan import make_plan

    key = api_key_from_env(cfg)
    plan = engine_kwargs.pop("plan", None) or make_plan(cfg)
    engine = Engine(cfg, plan, **engine_kwargs)
    info = engine.info(paths=True)
    logger.info("serving %s: index %s (%d passages, %s), reranker %s, readers %s", info["source"], info["index"],
                info["passages"], info["retriever"], info["reranker"],
                ", ".join(f"{k}={v['model']}" for k, v in info["readers"].items()))
    return create_app(engine, api_key=key)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LoadingGate:
    """The ASGI app served while the models load: ``/health`` answers 503 ``{"status": "loading"}`` (not ready),
    every other path 503 with ``Retry-After``; once :meth:`ready` is given the real app, everything goes to it."""

    def __init__(self) -> None:
        self.app: Any = None
        self.failed: BaseException | None = None

    def ready(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if self.app is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        from dpa_rag.serve.errors import ApiError

        if scope.get("path") == "/health":
            from fastapi.responses import JSONResponse

            response: Any = JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        else:
            response = ApiError(503, "the server is loading its models; retry shortly", code="loading",
                                headers={"Retry-After": "5"}).response()
        await response(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                engine = getattr(getattr(self.app, "state", None), "engine", None)
                if engine is not None:
                    await engine.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


def run(cfg: ServeConfig) -> None:
    """``dpa-rag serve``: bind at once (``/health`` not ready), load the models, serve until SIGTERM/SIGINT, then
    drain the requests in flight for up to ``drain_timeout`` seconds."""
    _require_extra()
    import uvicorn

    from dpa_rag.serve.plan import make_plan

    if not _is_loopback(cfg.host) and cfg.api_key_env is None:
        logger.warning("binding %s without --api-key-env: anyone who can reach this port can use the server",
                       cfg.host)
    api_key_from_env(cfg)  # configuration errors fail before binding
    plan = make_plan(cfg)
    gate = LoadingGate()
    server = uvicorn.Server(uvicorn.Config(gate, host=cfg.host, port=cfg.port, log_level="warning",
                                           access_log=False, timeout_graceful_shutdown=cfg.drain_timeout))

    def load() -> None:
        try:
            gate.ready(build_app(cfg, plan=plan))
            logger.info("ready on http://%s:%d", cfg.host, server.config.port)
        except BaseException as exc:  # noqa: BLE001 - reported by run() once the server is down
            gate.failed = exc
            server.should_exit = True

    threading.Thread(target=load, name="dpa-rag-load", daemon=True).start()
    server.run()
    if gate.failed is not None:
        raise gate.failed


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """Run an app with uvicorn in a background thread on loopback (``with ServerThread(app) as url: ...``)."""

    def __init__(self, app: Any, port: int | None = None, drain_timeout: float | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                lifespan="on", timeout_graceful_shutdown=drain_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dpa-rag-serve", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
