"""JSON errors in the OpenAI layout: ``{"error": {"message", "type", "param", "code"}}``.

``param`` names the offending field (``texts.3``, ``top_k``, ``messages.0.content``); ``code`` names the error
(``invalid_json``, ``invalid_value``, ``text_too_long``, ``model_not_found``, …). As OpenAI's API answers (and its
clients raise ``BadRequestError`` for): every invalid request is 400 (malformed JSON, a body that is not UTF-8, a
wrong type, a value out of range, a limit exceeded); a body over the size limit is 413, a missing or wrong API key
401, an unknown model or path 404, a full queue 503 with ``Retry-After``, a request over the time limit 504.
"""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

__all__ = ["ApiError", "error_body", "from_validation"]

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
    413: "invalid_request_error", 422: "invalid_request_error", 503: "overloaded_error", 504: "timeout_error",
}


class ApiError(Exception):
    """An error answer.

    Args:
        status: HTTP status.
        message: what went wrong, for people.
        param: the request field at fault (dotted path), if any.
        code: a machine-readable code (default: ``invalid_request`` for a 400, else the error type).
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else ("invalid_request" if status == 400 else self.type)
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status, self.headers)


def error_body(message: str, type_: str, param: str | None, code: str | int) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _loc(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    # pydantic adds the union member it tried (``documents.0.str``): drop type names after an index
    cleaned: list[str] = []
    for p in parts:
        if cleaned and cleaned[-1].isdigit() and p in ("str", "Document", "list[dict]", "function-after[_parts()]"):
            continue
        cleaned.append(p)
    return ".".join(cleaned) or None


def from_validation(exc: RequestValidationError) -> ApiError:
    """A 400 naming the first field: malformed JSON, a missing body, a wrong type or a value out of range."""
    errors = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "value_error"}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ApiError(400, f"malformed JSON body{': ' + str(detail) if detail else ''}", code="invalid_json")
    if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
        return ApiError(400, "a JSON request body is required", code="missing_body")
    messages = []
    for e in errors:
        param = _loc(tuple(e.get("loc", ())))
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        messages.append(f"{param}: {msg}" if param else msg)
    return ApiError(400, "; ".join(dict.fromkeys(messages)), param=_loc(tuple(first.get("loc", ()))),
                    code="invalid_value")
