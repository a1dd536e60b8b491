"""The OpenAI-compatible routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``
(streaming too) and ``POST /v1/responses`` (the Responses API, non-streaming), with ``usage`` counted by the reader's
tokenizer (:mod:`dpa_rag.serve.usage`). Errors follow OpenAI's layout and status codes (400 for invalid requests,
404 for an unknown model), so the ``openai`` SDK raises ``BadRequestError`` / ``NotFoundError``."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from dpa_rag.serve.engine import ALIGNED_MODEL, Engine
from dpa_rag.serve.errors import ApiError
from dpa_rag.serve.schemas import ChatRequest, ResponsesRequest

__all__ = ["add_openai_routes"]


def add_openai_routes(
    app: FastAPI,
    engine: Engine,
    run: Callable[[Awaitable[Any]], Awaitable[Any]],
    check_text: Callable[[str, str], None],
    check_depth: Callable[[int | None, str], None],
    check_model: Callable[[str], None],
    params_for: Callable[..., Any],
) -> None:
    """Add the OpenAI routes to ``app`` (the helpers are the app's request checks and model-call wrapper)."""

    def model_card(model_id: str, created: int) -> dict[str, Any]:
        r = engine.readers[model_id]
        return {"id": model_id, "object": "model", "created": created, "owned_by": "dpa-rag",
                "reader": engine.info()["readers"][model_id]["model"], "aligned_reader": r.aligned,
                "reranker": model_id == ALIGNED_MODEL and engine.rerank_batcher is not None,
                **({"promotion": engine.plan.promotion} if model_id == ALIGNED_MODEL and engine.plan.promotion
                   else {})}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [model_card(k, created) for k in engine.readers]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card(model_id, int(time.time()))

    async def answer(question: str, model_id: str, top_k: int | None, rerank: bool | None,
                     params: Any) -> tuple[dict[str, Any], dict[str, int] | None]:
        result = await run(engine.answer(question, model_id, top_k, rerank, params))
        usage = engine.usage(model_id, result.pop("prompt"), result["raw_output"])
        return result, usage

    def extra(result: dict[str, Any]) -> dict[str, Any]:
        return {k: result[k] for k in ("passages", "reranked", "reader", "gold") if k in result}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        check_model(body.model)
        for i, m in enumerate(body.messages):
            check_text(m.text, f"messages.{i}.content")
        question = body.question.strip()
        if not question:
            raise ApiError(400, "messages: no user message with text to answer", param="messages",
                           code="invalid_value")
        check_depth(body.top_k, "top_k")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        params = params_for(body.model, body.max_completion_tokens or body.max_tokens, body.temperature,
                            body.top_p, stop, body.seed)
        result, usage = await answer(question, body.model, body.top_k, body.rerank, params)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            return {
                "id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"]},
                             "finish_reason": "stop", "logprobs": None}],
                **({"usage": usage} if usage else {}),
                "dpa_rag": extra(result),
            }

        def chunk(delta: dict[str, Any], finish: str | None) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            yield chunk({"content": result["answer"]}, None)
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest) -> dict[str, Any]:
        check_model(body.model)
        if body.stream:
            raise ApiError(400, "stream: /v1/responses answers without streaming here (use stream=false, or "
                           "/v1/chat/completions with stream=true)", param="stream", code="unsupported_value")
        question = body.question.strip()
        if not question:
            raise ApiError(400, "input: no user text to answer", param="input", code="invalid_value")
        check_text(question, "input")
        check_depth(body.top_k, "top_k")
        params = params_for(body.model, body.max_output_tokens, body.temperature, body.top_p)
        result, usage = await answer(question, body.model, body.top_k, body.rerank, params)
        opts = engine.reader(body.model).options
        return {
            "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
            "status": "completed", "model": body.model, "error": None, "incomplete_details": None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "metadata": {},
            "output": [{
                "type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": result["answer"], "annotations": []}],
            }],
            "parallel_tool_calls": False, "previous_response_id": None, "reasoning": None, "store": False,
            "temperature": body.temperature if body.temperature is not None else opts.temperature,
            "top_p": body.top_p if body.top_p is not None else opts.top_p, "text": {"format": {"type": "text"}},
            "tool_choice": "none", "tools": [], "truncation": "disabled",
            "usage": None if usage is None else {
                "input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"], "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
            "dpa_rag": extra(result),
        }
