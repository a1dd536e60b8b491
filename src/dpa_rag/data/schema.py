"""The record types every stage reads and writes.

* :class:`Question` — ``{"id", "question", "answers"}`` (+ optional ``category``/``origin_id`` metadata).
* :class:`Passage` — ``{"id", "title", "text"}``; rendered for prompts and cross-encoders as
  ``"Title: <title> Content: <text>"`` like the DPA-RAG authors' files.
* :class:`Ctx` and :class:`RetrievalRecord` — DPR style: ``{"id", "question", "answers", "ctxs": [{"id", "title",
  "text", "score", "has_answer"}]}``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["Ctx", "Passage", "Question", "RetrievalRecord", "format_passage"]


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
