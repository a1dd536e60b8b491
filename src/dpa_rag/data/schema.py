"""The record types every stage reads and writes.

* :class:`Question` — ``{"id", "question", "answers"}`` (+ optional ``category``/``origin_id`` metadata).
* :class:`Passage` — ``{"id", "title", "text"}``; rendered for prompts and cross-encoders as
  ``"Title: <title> Content: <text>"`` like the DPA-RAG authors' files.
* :class:`Ctx` and :class:`RetrievalRecord` — DPR style: ``{"id", "question", "answers", "ctxs": [{"id", "title",
  "text", "score", "has_answer"}]}``.
* :class:`Preference` (one line of ``preferences.jsonl``, written by ``dpa-rag mine``), with its
  :class:`ClosedBook` result and one :class:`Probe` per probed passage (method.md §2, §13).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

__all__ = [
    "Category",
    "ClosedBook",
    "Ctx",
    "Passage",
    "Preference",
    "Probe",
    "Question",
    "RetrievalRecord",
    "format_passage",
]


def format_passage(title: str, text: str) -> str:
    """Render a passage the way the DPA-RAG authors' data does: ``"Title: <title> Content: <text>"``."""
    title = (title or "").strip()
    text = (text or "").strip()
    return f"Title: {title} Content: {text}" if title else text


class Question(BaseModel):
    """A question with its gold answers. ``origin_id`` links an augmented rewrite to its original question."""

    model_config = ConfigDict(extra="allow")

    id: str
    question: str = Field(min_length=1)
    answers: list[str] = Field(default_factory=list)
    origin_id: str | None = None

    @field_validator("question")
    @classmethod
    def _strip(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("question is empty")
        return v

    @field_validator("answers")
    @classmethod
    def _answers(cls, v: list[str]) -> list[str]:
        return [str(a) for a in v if str(a).strip()]


class Passage(BaseModel):
    """A corpus passage."""

    model_config = ConfigDict(extra="ignore")

    id: str
    title: str = ""
    text: str

    def render(self) -> str:
        return format_passage(self.title, self.text)


class Ctx(BaseModel):
    """One retrieved passage in a DPR-style retrieval record."""

    model_config = ConfigDict(extra="allow")

    id: str = ""
    title: str = ""
    text: str
    score: float | None = None
    has_answer: bool | None = None

    def render(self) -> str:
        return format_passage(self.title, self.text)


class RetrievalRecord(BaseModel):
    """A question with its ranked passages (DPR/FiD layout)."""

    model_config = ConfigDict(extra="allow")

    id: str
    question: str
    answers: list[str] = Field(default_factory=list)
    ctxs: list[Ctx] = Field(default_factory=list)
    origin_id: str | None = None

    def as_question(self) -> Question:
        return Question(id=self.id, question=self.question, answers=self.answers, origin_id=self.origin_id)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


Category = Literal["aligned", "unaligned", "both_correct", "both_wrong", "neutral"]
"""A probed passage's preference category (:data:`dpa_rag.mining.labels.CATEGORIES`, same order)."""


def _ordered(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """``data`` with ``keys`` first, in that order (those present), then any other key in its own order."""
    out = {k: data[k] for k in keys if k in data}
    out.update((k, v) for k, v in data.items() if k not in out)
    return out


class ClosedBook(BaseModel):
    """The reader's closed-book result of a question.

    ``answer``/``hit``/``f1`` when it was answered by generation (rules ``hit``, ``f1-delta``; under ``loglik`` for
    every question with ``closed_book_answers``), ``loglik`` (best length-normalised log-probability of a gold) under
    ``loglik``, ``raw`` (the reader's completion before :func:`~dpa_rag.prompts.clean_answer`; build-llm-data's
    closed-book examples are made from it). Dumped (with ``exclude_none``) in the order ``mine`` writes: ``loglik``
    first, then ``answer``, ``hit``, ``f1``, ``raw``.
    """

    model_config = ConfigDict(extra="allow")

    loglik: float | None = None
    answer: str | None = None
    hit: int | None = None
    f1: float | None = None
    raw: str | None = None


_HIT_PROBE_KEYS = ("rank", "ctx", "answer", "hit", "f1", "category")
_LOGLIK_PROBE_KEYS = ("rank", "ctx", "loglik", "gain", "category", "answer", "hit", "f1", "hit_category")


class Probe(BaseModel):
    """One probed passage of a question: its retriever rank, the passage, the reader's result with it alone, and
    its category.

    * rules ``hit`` / ``f1-delta``: ``answer``, ``hit`` (0/1), ``f1``;
    * rule ``loglik``: ``loglik`` (with the passage) and ``gain`` (minus closed-book, nats per answer token); probes of
      the ``agreement_questions`` also carry ``answer``/``hit``/``f1`` and the hit rule's ``hit_category``.

    Dumped (with ``exclude_none``) in the key order ``mine`` writes for its rule (graded probes: ``loglik``, ``gain``
    right after ``ctx``).
    """

    model_config = ConfigDict(extra="allow")

    rank: int = Field(ge=1)
    ctx: Ctx
    answer: str | None = None
    hit: int | None = None
    f1: float | None = None
    loglik: float | None = None
    gain: float | None = None
    category: Category
    hit_category: Category | None = None

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        graded = self.gain is not None or self.loglik is not None
        return _ordered(data, _LOGLIK_PROBE_KEYS if graded else _HIT_PROBE_KEYS)

    def render(self) -> str:
        """The passage as the authors render it (:func:`format_passage`)."""
        return self.ctx.render()


class Preference(BaseModel):
    """One question's preference record: one line of ``preferences.jsonl``.

    ``origin_id`` (an augmented input's original) and ``strategy`` (an inherited rewrite's augmentation strategy) are
    optional; ``dump()`` gives the JSON object ``mine`` writes (``None`` fields left out).
    """

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    question: str
    answers: list[str]
    origin_id: str | None = None
    closed_book: ClosedBook
    probes: list[Probe]
    strategy: str | None = None

    @field_validator("id", "origin_id", mode="before")
    @classmethod
    def _id(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @property
    def graded(self) -> bool:
        """Whether every probe has a ``gain`` (mined with ``label_rule: loglik``) and there is at least one."""
        return bool(self.probes) and all(p.gain is not None for p in self.probes)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
