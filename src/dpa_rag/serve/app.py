"""The HTTP app: rerank / retrieve / answer / OpenAI chat endpoints, health, metrics and the comparison page.

Endpoints:

* ``POST /rerank`` (also ``/v1/rerank``): TEI request ``{"query", "texts"}`` → ``[{"index", "score"}]`` sorted best
  first; Jina / Cohere v1 request ``{"query", "documents", "top_n", "return_documents"}`` → ``{"id", "results":
  [{"index", "relevance_score", "document"}]}``; ``POST /v2/rerank``: Cohere v2 (documents not returned by default).
  Scores are calibrated relevances (:mod:`dpa_rag.reranker.calibration`).
* ``POST /retrieve``: ``{"query", "top_k", "rerank", "candidates"}`` → ``{"passages": [...]}``.
* ``POST /answer``: ``{"question", "model", "top_k"}`` → answer, raw output and the passages used.
* OpenAI-compatible (:mod:`dpa_rag.serve.openai_api`): ``POST /v1/chat/completions`` (streaming too), ``POST
  /v1/responses``, ``GET /v1/models``, ``GET /v1/models/{id}``; models ``dpa-rag`` (aligned reranker + self-aligned
  reader) and ``dpa-rag-base`` (retriever + base reader).
* ``GET /health`` (no filesystem paths without the API key), ``GET /samples`` (answerable evaluation questions),
  ``GET /metrics`` (Prometheus text), ``GET /`` (the comparison page).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from dpa_rag.generation import GenerationParams
from dpa_rag.serve.batching import QueueFull
from dpa_rag.serve.engine import Engine
from dpa_rag.serve.errors import ApiError, from_validation
from dpa_rag.serve.openai_api import add_openai_routes
from dpa_rag.serve.schemas import AnswerRequest, RerankRequest, RetrieveRequest

__all__ = ["create_app"]

T = TypeVar("T")

ENDPOINTS = {
    "/", "/health", "/metrics", "/samples", "/rerank", "/v1/rerank", "/v2/rerank", "/retrieve", "/answer",
    "/v1/models", "/v1/models/{id}", "/v1/chat/completions", "/v1/responses",
}
# no API key needed: the page itself (it sends the key it is given), its sample questions and the probe
OPEN_PATHS = {"/", "/health", "/samples"}


def endpoint_of(path: str) -> str:
    """The metrics label of a request path (one label for every ``/v1/models/{id}``)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in ENDPOINTS else "other"


def _as_json(scope: dict) -> dict:
    """A POST body sent without a JSON content type (``text/plain``, none) is read as JSON, as curl users and
    some clients send it: the scope with ``content-type: application/json``."""
    headers = list(scope.get("headers") or [])
    ctype = dict(headers).get(b"content-type", b"").split(b";")[0].strip().lower()
    if scope.get("method") != "POST" or ctype.startswith(b"application/json") or ctype.endswith(b"+json"):
        return scope
    headers = [(k, v) for k, v in headers if k != b"content-type"] + [(b"content-type", b"application/json")]
    return {**scope, "headers": headers}
MAX_NEW_TOKENS = 4096


class _Guard:
    """ASGI middleware: body-size limit, API key, request metrics (outermost, so 401/413 are counted too)."""

    def __init__(self, app: Any, engine: Engine, api_key: str | None) -> None:
        self.app = app
        self.engine = engine
        self.api_key = api_key.encode() if api_key else None
        self.max_body = engine.cfg.max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = endpoint_of(path)
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            error = self._check_auth(scope, path)
            body = b""
            if error is None:
                body, error = await self._read_body(scope, receive)
            if error is None and body:
                try:
                    body.decode("utf-8")
                except UnicodeDecodeError as exc:
                    error = ApiError(400, f"the request body is not UTF-8 text ({exc.reason} at byte {exc.start})",
                                     code="invalid_encoding")
            scope = _as_json(scope)
            scope.setdefault("state", {})["authenticated"] = self.api_key is not None and self._has_key(scope)
            if error is not None:
                self.engine.metrics.inc("dpa_rag_errors_total", {"endpoint": endpoint, "type": error.type})
                await error.response()(scope, receive, send_tracked)
                return
            if not await _until_disconnect(self.app, scope, body, receive, send_tracked):
                status["code"] = 499  # the client closed the connection first (nginx's code)
                self.engine.metrics.inc("dpa_rag_disconnects_total", {"endpoint": endpoint})
        finally:
            m = self.engine.metrics
            m.inc("dpa_rag_requests_total", {"endpoint": endpoint, "status": str(status["code"])})
            m.observe("dpa_rag_request_seconds", {"endpoint": endpoint}, time.perf_counter() - t0)

    def _has_key(self, scope: dict) -> bool:
        return self.api_key is not None and self._check_auth(scope, "") is None

    def _check_auth(self, scope: dict, path: str) -> ApiError | None:
        if self.api_key is None or path in OPEN_PATHS:
            return None
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if given is not None and hmac.compare_digest(given, self.api_key):
            return None
        why = "missing API key" if given is None else "invalid API key"
        return ApiError(401, f"{why}: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                        code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope: dict, receive: Any) -> tuple[bytes, ApiError | None]:
        too_big = ApiError(413, f"request body larger than {self.max_body} bytes (--max-body-bytes)",
                           code="body_too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return b"", too_big
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", too_big
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), None


async def _until_disconnect(app: Any, scope: dict, body: bytes, receive: Any, send: Any) -> bool:
    """Run ``app`` on the request whose ``body`` was read; if the client disconnects first, cancel it (its place in
    a model queue is freed at once) and return ``False``."""
    gone = asyncio.Event()
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()  # the app listens for the disconnect (streaming responses): the watcher below sees it
        return {"type": "http.disconnect"}

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()

    task = asyncio.ensure_future(app(scope, replay, send))
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        task.result()
        return True
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher


def _score_legend(engine: Engine, reranked: bool) -> dict[str, str]:
    """What each number of a passage is (the page shows these labels)."""
    if not reranked:
        return {"score": "retriever score (sorted by)", "retriever_score": "retriever score"}
    fused = engine.fusion_alpha is not None
    return {
        "score": (f"fused score: reranker weight {engine.fusion_alpha:g} blended with the retriever rank (sorted by)"
                  if fused else "reranker score (sorted by)"),
        "reranker_score": f"the reranker's own score ({engine.score_mode})",
        "retriever_score": "retriever score",
    }


def _page() -> str:
    return (files("dpa_rag.serve") / "page.html").read_text(encoding="utf-8")


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over ``engine``; ``api_key``: required from clients when set (except ``/`` and
    ``/health``)."""
    cfg = engine.cfg

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.aclose()

    app = FastAPI(title="dpa-rag", summary="DPA-RAG: retrieval, aligned reranker, self-aligned reader",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.engine = engine  # for a server that wraps the app (LoadingGate closes it on shutdown)

    def count_error(request: Request, err: ApiError) -> JSONResponse:
        endpoint = endpoint_of(request.url.path)
        engine.metrics.inc("dpa_rag_errors_total", {"endpoint": endpoint, "type": err.type})
        return err.response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return count_error(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return count_error(request, from_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return count_error(request, ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return count_error(request, ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))

    async def run(work: Awaitable[T]) -> T:
        """Await model work under the request time limit; a full queue is 503, a timeout 504."""
        try:
            return await asyncio.wait_for(work, cfg.request_timeout)
        except QueueFull as exc:
            raise ApiError(503, str(exc), code="queue_full", headers={"Retry-After": str(exc.retry_after)}) from None
        except asyncio.TimeoutError:
            raise ApiError(504, f"request took longer than {cfg.request_timeout:g} s (--request-timeout)",
                           code="timeout") from None
        except LookupError as exc:
            raise ApiError(400, str(exc), param="rerank", code="no_reranker") from None

    def check_text(value: str, param: str) -> None:
        if len(value) > cfg.max_chars:
            raise ApiError(400, f"{param}: {len(value)} characters, at most {cfg.max_chars} allowed (--max-chars)",
                           param=param, code="text_too_long")

    def check_depth(value: int | None, param: str) -> None:
        if value is not None and value > cfg.max_top_k:
            raise ApiError(400, f"{param}: {value} is above the limit {cfg.max_top_k} (--max-top-k)", param=param,
                           code="limit_exceeded")

    def check_model(model: str) -> None:
        if model not in engine.readers:
            raise ApiError(404, f"model '{model}' does not exist; served: {', '.join(engine.readers)}",
                           param="model", code="model_not_found")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page())

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        # filesystem paths only for a client that sent the server's API key (never without a key configured)
        return {"status": "ok", **engine.info(paths=bool(request.scope.get("state", {}).get("authenticated")))}

    @app.get("/samples")
    async def samples() -> dict[str, Any]:
        """Evaluation questions of the served run (or the bundled sample) that the served corpus can answer."""
        return {"questions": await run(engine.samples())}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def rerank(body: RerankRequest, version: int) -> Any:
        check_text(body.query, "query")
        texts = body.items
        if not texts:
            raise ApiError(400, f"{body.field}: give at least one text", param=body.field, code="empty")
        if len(texts) > cfg.max_texts:
            raise ApiError(400, f"{body.field}: {len(texts)} texts, at most {cfg.max_texts} per request "
                           "(--max-texts)", param=body.field, code="limit_exceeded")
        for i, t in enumerate(texts):
            check_text(t, f"{body.field}.{i}" + (".text" if body.documents and not isinstance(body.documents[i], str)
                                                  else ""))
        scores = await run(engine.rerank(body.query, texts))
        order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))[: body.top_n]
        if body.texts is not None:  # TEI
            out = []
            for i in order:
                score = scores[i] if body.raw_scores else engine.relevance(scores[i])
                row: dict[str, Any] = {"index": i, "score": score}
                if body.return_text:
                    row["text"] = texts[i]
                out.append(row)
            return out
        # Cohere v2 and v1, Jina: Jina (and Cohere v1 clients that do not send it) default to the documents back
        with_docs = body.return_documents if body.return_documents is not None else version != 2
        results = []
        for i in order:
            row = {"index": i, "relevance_score": engine.relevance(scores[i])}
            if body.raw_scores:
                row["raw_score"] = scores[i]
            if with_docs:
                row["document"] = {"text": texts[i]}
            results.append(row)
        return {"id": str(uuid.uuid4()), "results": results,
                "meta": {"api_version": {"version": str(version)}, "billed_units": {"search_units": 1}}}

    @app.post("/rerank")
    async def rerank_tei(body: RerankRequest) -> Any:
        return await rerank(body, 1)

    @app.post("/v1/rerank", include_in_schema=False)
    async def rerank_v1(body: RerankRequest) -> Any:
        return await rerank(body, 1)

    @app.post("/v2/rerank")
    async def rerank_v2(body: RerankRequest) -> Any:
        if body.texts is not None:
            raise ApiError(400, "texts: /v2/rerank takes Cohere's `documents` (TEI's `texts` go to /rerank)",
                           param="texts", code="invalid_value")
        return await rerank(body, 2)

    @app.post("/retrieve")
    async def retrieve(body: RetrieveRequest) -> dict[str, Any]:
        check_text(body.query, "query")
        check_depth(body.top_k, "top_k")
        check_depth(body.candidates, "candidates")
        use_reranker = engine.rerank_batcher is not None if body.rerank is None else body.rerank
        top_k = body.top_k or engine.plan.top_k
        passages = await run(engine.retrieve(body.query, top_k, use_reranker, body.candidates))
        return {"query": body.query, "retriever": engine.plan.retriever,
                "reranker": engine.info()["reranker"] if use_reranker else None, "passages": passages,
                "scores": _score_legend(engine, use_reranker)}

    def params_for(model: str, max_tokens: int | None, temperature: float | None, top_p: float | None = None,
                   stop: tuple[str, ...] = (), seed: int | None = None) -> GenerationParams:
        opts = engine.reader(model).options
        if max_tokens is not None and max_tokens > MAX_NEW_TOKENS:
            raise ApiError(400, f"max_tokens: {max_tokens} is above {MAX_NEW_TOKENS}", param="max_tokens",
                           code="limit_exceeded")
        values: dict[str, Any] = {"stop": stop}
        for key, value in (("max_new_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                           ("seed", seed)):
            if value is not None:
                values[key] = value
        return opts.generation_params(**values)

    @app.post("/answer")
    async def answer(body: AnswerRequest) -> dict[str, Any]:
        check_text(body.question, "question")
        check_model(body.model)
        check_depth(body.top_k, "top_k")
        params = params_for(body.model, body.max_tokens, body.temperature)
        result = await run(engine.answer(body.question, body.model, body.top_k, body.rerank, params))
        usage = engine.usage(body.model, result.pop("prompt"), result["raw_output"])
        return {**result, "scores": _score_legend(engine, result["reranked"]),
                **({"usage": usage} if usage else {})}

    add_openai_routes(app, engine, run, check_text, check_depth, check_model, params_for)

    app.add_middleware(_Guard, engine=engine, api_key=api_key)
    return app

