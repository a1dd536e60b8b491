"""Loaders for questions, corpora and retrieval files in the layouts people actually have.

Every loader validates each record and raises :class:`~dpa_rag.io.DataError` naming the file and line of the first bad
one; nothing is skipped silently.

Question layouts (detected per record): ours/DPR/lost-in-the-middle (``question`` + ``answers``), NQ-open and
WebQuestions (``question`` + ``answer``), FlashRAG (``question`` + ``golden_answers``), the DPA-RAG authors' valid/test
pairs (``question`` + ``reference``) and train records (``query``).

Corpus layouts: ours (``id``, ``title``, ``text``), FlashRAG (``contents`` = ``"Title"\\ntext``), DPR ``psgs_w100.tsv``
(``id\\ttext\\ttitle``), and passages taken out of a DPR-style retrieval file's ``ctxs``.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dpa_rag.data.schema import Ctx, Passage, Question, RetrievalRecord
from dpa_rag.io import DataError, read_records

__all__ = [
    "load_corpus",
    "load_questions",
    "load_retrieval",
    "parse_rendered_passage",
    "passage_id",
    "question_id",
]


def question_id(question: str) -> str:
    """A stable id from the question text, so the same question gets the same id in every file."""
    return "q" + hashlib.sha1(question.strip().lower().encode("utf-8")).hexdigest()[:12]


def passage_id(title: str, text: str) -> str:
    """A stable id from a passage's title and text."""
    return "p" + hashlib.sha1(f"{title.strip()}\n{text.strip()}".encode()).hexdigest()[:12]


def parse_rendered_passage(s: str) -> tuple[str, str]:
    """Split ``"Title: <t> Content: <x>"`` (the authors' layout) into ``(title, text)``; other strings: ``("", s)``."""
    s = s.strip()
    if s.startswith("Title:") and " Content:" in s:
        title, _, text = s[len("Title:") :].partition(" Content:")
        return title.strip(), text.strip()
    return "", s


def _answers_of(rec: dict[str, Any]) -> list[str] | None:
    for key in ("answers", "answer", "golden_answers", "reference"):
        if key in rec:
            val = rec[key]
            if isinstance(val, str):
                return [val]
            if isinstance(val, list) and all(isinstance(a, (str, int, float)) for a in val):
                return [str(a) for a in val]
            raise ValueError(f"field '{key}' must be a string or a list of strings")
    return None


def _question_of(rec: dict[str, Any]) -> str:
    for key in ("question", "query"):
        if isinstance(rec.get(key), str):
            return rec[key]
    raise ValueError("no 'question' (or 'query') string field")


def _unique(ids: set[str], base: str) -> str:
    out, k = base, 1
    while out in ids:
        k += 1
        out = f"{base}-{k}"
    ids.add(out)
    return out


def load_questions(path: str | Path, require_answers: bool = True, limit: int | None = None) -> list[Question]:
    """Load questions with gold answers from any supported layout.

    Args:
        path: a ``.jsonl``/``.json`` file, optionally ``.gz``.
        require_answers: raise if a record has no gold answer field (set ``False`` for unlabelled inference).
        limit: keep only the first ``limit`` records.
    """
    out: list[Question] = []
    seen: set[str] = set()
    for pos, rec in read_records(path):
        if limit is not None and len(out) >= limit:
            break
        try:
            q = _question_of(rec)
            answers = _answers_of(rec)
            if answers is None:
                if require_answers:
                    raise ValueError("no gold answers (expected 'answers', 'answer', 'golden_answers' or 'reference')")
                answers = []
            qid = str(rec.get("id", rec.get("qid", rec.get("_id", "")))) or question_id(q)
            extra = {k: rec[k] for k in ("category", "origin_id", "strategy") if k in rec}
            out.append(Question(id=_unique(seen, qid), question=q, answers=answers, **extra))
        except (ValueError, ValidationError) as exc:
            raise DataError(f"{path}:{pos}: {_msg(exc)}") from None
    return out


def _msg(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        errs = exc.errors()
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in errs)
    return str(exc)


def _passages_from_record(rec: dict[str, Any]) -> Iterator[Passage]:
    if "ctxs" in rec:
        for c in rec["ctxs"]:
            title, text = str(c.get("title", "")), str(c["text"])
            yield Passage(id=str(c.get("id") or passage_id(title, text)), title=title, text=text)
        return
    if "contents" in rec:
        contents = str(rec["contents"])
        title, sep, text = contents.partition("\n")
        if sep and title.startswith('"') and title.endswith('"'):
            title = title[1:-1]
        elif not sep:
            title, text = "", contents
        yield Passage(id=str(rec.get("id") or passage_id(title, text)), title=title, text=text)
        return
    if "text" not in rec:
        raise ValueError("a passage needs 'text' (or FlashRAG 'contents', or DPR 'ctxs')")
    title, text = str(rec.get("title", "")), str(rec["text"])
    yield Passage(id=str(rec.get("id") or passage_id(title, text)), title=title, text=text)


def _iter_tsv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for lineno, row in enumerate(reader, start=1):
            if lineno == 1 and row[:1] == ["id"]:
                continue
            if len(row) < 2:
                raise DataError(f"{path}:{lineno}: expected 'id<TAB>text[<TAB>title]', got {len(row)} column(s)")
            yield lineno, {"id": row[0], "text": row[1], "title": row[2] if len(row) > 2 else ""}


def load_corpus(paths: str | Path | Iterable[str | Path], dedup: bool = True) -> list[Passage]:
    """Load passages from one or more corpus files (layouts in the module docstring).

    With ``dedup`` a passage whose (title, text) was already seen is dropped (retrieval files repeat passages); two
    *different* passages with the same id are an error.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Passage] = []
    by_id: dict[str, Passage] = {}
    seen_content: set[tuple[str, str]] = set()
    for path in paths:
        path = Path(path)
        it = _iter_tsv(path) if path.suffix == ".tsv" else read_records(path)
        for pos, rec in it:
            try:
                passages = list(_passages_from_record(rec))
            except (ValueError, KeyError, ValidationError) as exc:
                raise DataError(f"{path}:{pos}: {_msg(exc) if not isinstance(exc, KeyError) else exc}") from None
            for p in passages:
                key = (p.title.strip(), p.text.strip())  # same normalisation as passage_id
                if dedup and key in seen_content:
                    continue
                if p.id in by_id:
                    raise DataError(f"{path}:{pos}: passage id '{p.id}' is used by two different passages")
                seen_content.add(key)
                by_id[p.id] = p
                out.append(p)
    if not out:
        raise DataError(f"no passages found in {', '.join(map(str, paths))}")
    return out


def _ctx_of(c: Any) -> Ctx:
    if isinstance(c, str):
        title, text = parse_rendered_passage(c)
        return Ctx(id=passage_id(title, text), title=title, text=text)
    if not isinstance(c, dict):
        raise ValueError(f"a ctx must be an object or a string, got {type(c).__name__}")
    c = dict(c)
    if "has_answer" not in c and "hasanswer" in c:
        c["has_answer"] = c.pop("hasanswer")
    if "id" not in c or c["id"] in (None, ""):
        c["id"] = passage_id(str(c.get("title", "")), str(c.get("text", "")))
    c["id"] = str(c["id"])
    return Ctx.model_validate(c)


def load_retrieval(path: str | Path, limit: int | None = None) -> list[RetrievalRecord]:
    """Load a DPR-style retrieval file (``question``, ``answers``, ``ctxs``).

    Also accepts lost-in-the-middle's ``hasanswer`` key and the authors' valid/test pairs (one ``ctx`` string each).
    """
    out: list[RetrievalRecord] = []
    seen: set[str] = set()
    for pos, rec in read_records(path):
        if limit is not None and len(out) >= limit:
            break
        try:
            q = _question_of(rec)
            answers = _answers_of(rec) or []
            if "ctxs" in rec:
                raw = rec["ctxs"]
            elif "ctx" in rec:
                raw = [rec["ctx"]]
            else:
                raise ValueError("no 'ctxs' list (is this a retrieval file?)")
            if not isinstance(raw, list):
                raise ValueError("'ctxs' must be a list")
            ctxs = [_ctx_of(c) for c in raw]
            qid = str(rec.get("id", rec.get("qid", ""))) or question_id(q)
            extra = {k: rec[k] for k in ("category", "origin_id", "strategy") if k in rec}
            out.append(RetrievalRecord(id=_unique(seen, qid), question=q, answers=answers, ctxs=ctxs, **extra))
        except (ValueError, ValidationError) as exc:
            raise DataError(f"{path}:{pos}: {_msg(exc)}") from None
    return out
