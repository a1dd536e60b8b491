"""The DPA-RAG authors' reranker data files (``example_{train,valid,test}_dataset.jsonl``), read and written as is.

Train record::

    {"query": str, "classification": {"text": str, "label": 1 | 2},
     "rank_list": [str, ...], "positive": [str, ...], "negative": [str, ...]}

``label`` 1 = aligned (the passage helped the reader), 2 = unaligned (it hurt). ``rank_list`` is most preferred first.

Valid/test pair record::

    {"question": str, "reference": [str], "ctx": str,
     "before": {"answer": str, "em": 0 | 1, "f1": float}, "after": {...}, "category": 1 | 2}
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dpa_rag.io import DataError, read_records

__all__ = [
    "AnswerScore",
    "RerankerPairRecord",
    "RerankerTrainRecord",
    "load_reranker_pairs",
    "load_reranker_train",
]


class Classification(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    label: Literal[1, 2]


class RerankerTrainRecord(BaseModel):
    """One training record in the authors' format. Group sizes are checked by the consumer, not fixed here."""

    model_config = ConfigDict(extra="allow")
    query: str = Field(min_length=1)
    classification: Classification
    rank_list: list[str]
    positive: list[str]
    negative: list[str]


class AnswerScore(BaseModel):
    model_config = ConfigDict(extra="allow")
    answer: str
    em: int
    f1: float


class RerankerPairRecord(BaseModel):
    """One (question, passage) pair with the reader's answers before/after and its category (1 aligned, 2 not)."""

    model_config = ConfigDict(extra="allow")
    question: str = Field(min_length=1)
    reference: list[str]
    ctx: str
    before: AnswerScore | None = None
    after: AnswerScore | None = None
    category: Literal[1, 2]


def _load(path: str | Path, model: type[BaseModel]) -> list:
    out = []
    for pos, rec in read_records(path):
        try:
            out.append(model.model_validate(rec))
        except ValidationError as exc:
            msg = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors())
            raise DataError(f"{path}:{pos}: not a {model.__name__}: {msg}") from None
    if not out:
        raise DataError(f"{path}: no records")
    return out


def load_reranker_train(path: str | Path) -> list[RerankerTrainRecord]:
    """Load an authors'-format reranker training file, validating every record."""
    return _load(path, RerankerTrainRecord)


def load_reranker_pairs(path: str | Path) -> list[RerankerPairRecord]:
    """Load an authors'-format valid/test pair file, validating every record."""
    return _load(path, RerankerPairRecord)
