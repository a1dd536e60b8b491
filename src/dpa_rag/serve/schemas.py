"""Request bodies of the HTTP API (pydantic). Unknown fields are ignored, as the APIs they mirror do.

* :class:`RerankRequest`: Text Embeddings Inference (``texts``) or Cohere/Jina (``documents``, ``top_n``).
* :class:`RetrieveRequest`, :class:`AnswerRequest`: this server's own.
* :class:`ChatRequest`: OpenAI chat completions; :class:`ResponsesRequest`: the OpenAI Responses API (the fields a
  RAG answer uses).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AnswerRequest", "ChatMessage", "ChatRequest", "Document", "RerankRequest", "ResponsesRequest", "RetrieveRequest",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class Document(_Body):
    """A Cohere-style document object (``{"text": ...}``)."""

    text: str


class RerankRequest(_Body):
    """``POST /rerank``: TEI (``texts`` → a list of ``{index, score}``) or Cohere (``documents`` → ``results``)."""

    query: str = Field(min_length=1)
    texts: list[str] | None = None
    documents: list[str | Document] | None = None
    top_n: int | None = Field(None, ge=1)
    return_documents: bool | None = None  # default: true on /rerank and /v1/rerank (Jina), false on /v2/rerank
    return_text: bool = False
    raw_scores: bool = False
    model: str | None = None

    @model_validator(mode="after")
    def _one_list(self) -> RerankRequest:
        if (self.texts is None) == (self.documents is None):
            raise ValueError("texts, documents: give one of them (texts: TEI format, documents: Cohere format)")
        return self

    @property
    def items(self) -> list[str]:
        if self.texts is not None:
            return self.texts
        return [d if isinstance(d, str) else d.text for d in self.documents or []]

    @property
    def field(self) -> str:
        return "texts" if self.texts is not None else "documents"


class RetrieveRequest(_Body):
    """``POST /retrieve``: the top-k passages for a query, reranked unless ``rerank`` is false."""

    query: str = Field(min_length=1)
    top_k: int | None = Field(None, ge=1)
    rerank: bool | None = None
    candidates: int | None = Field(None, ge=1)


class AnswerRequest(_Body):
    """``POST /answer``: retrieve (+ rerank) and read; ``model`` is ``dpa-rag`` (aligned) or ``dpa-rag-base``."""

    question: str = Field(min_length=1)
    model: str = "dpa-rag"
    top_k: int | None = Field(None, ge=0)
    rerank: bool | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    @field_validator("content")
    @classmethod
    def _parts(cls, v: str | list[dict] | None) -> str | list[dict] | None:
        if isinstance(v, list):
            for part in v:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        return v

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p["text"] for p in self.content)


class ChatRequest(_Body):
    """``POST /v1/chat/completions``: the last user message is the question; the reader answers from passages."""

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    top_k: int | None = Field(None, ge=0)
    rerank: bool | None = None

    @property
    def question(self) -> str:
        users = [m for m in self.messages if m.role == "user"]
        return users[-1].text if users else ""


class ResponsesRequest(_Body):
    """``POST /v1/responses`` (OpenAI Responses API, non-streaming): ``input`` is the question (a string) or a list
    of messages/items whose last user text is the question; ``instructions`` are ignored (the run's prompt)."""

    model: str
    input: str | list[dict] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    top_k: int | None = Field(None, ge=0)
    rerank: bool | None = None

    @field_validator("input")
    @classmethod
    def _items(cls, v: str | list[dict]) -> str | list[dict]:
        if isinstance(v, list):
            for item in v:
                content = item.get("content")
                if content is not None and not isinstance(content, (str, list)):
                    raise ValueError("each input item's content must be a string or a list of parts")
        return v

    @property
    def question(self) -> str:
        if isinstance(self.input, str):
            return self.input
        for item in reversed(self.input):
            if item.get("role", "user") != "user" or item.get("type", "message") != "message":
                continue
            content = item.get("content")
            if isinstance(content, str):
                return content
            texts = [p.get("text", "") for p in content or [] if isinstance(p, dict)
                     and p.get("type") in ("input_text", "text") and isinstance(p.get("text"), str)]
            return "\n".join(texts)
        return ""
