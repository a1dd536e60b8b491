"""Loaders for questions, corpora and retrieval files in the layouts people actually have.

Every loader validates each record with strict types (an ``id`` is a string or an integer, answers are a list of
strings) and raises :class:`~dpa_rag.io.DataError` naming the file and line of the first bad one; nothing is skipped
or coerced silently. A file without records is an error, and so is an id used twice: inside
:func:`dedupe_ids` (the ``--dedupe-ids`` flag) repeats are renamed ``<id>-2``, ``<id>-3``… and counted in the log.

Question layouts (detected per record): ours/DPR/lost-in-the-middle (``question`` + ``answers``), NQ-open and
WebQuestions (``question`` + ``answer``), FlashRAG (``question`` + ``golden_answers``), the DPA-RAG authors' valid/test
pairs (``question`` + ``reference``) and train records (``query``).

Corpus layouts: ours (``id``, ``title``, ``text``), FlashRAG (``contents`` = ``"Title"\\ntext``), DPR ``psgs_w100.tsv``
(``id\\ttext\\ttitle``), and passages taken out of a DPR-style retrieval file's ``ctxs``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dpa_rag.data.schema import Ctx, Passage, Question, RetrievalRecord
from dpa_rag.io import DataError, iter_lines, read_records

__all__ = [
    "DEDUPE_IDS_HELP",
    "dedupe_ids",
    "dedupe_ids_field",
    "load_corpus",
    "load_questions",
    "load_retrieval",
    "parse_rendered_passage",
    "passage_id",
    "question_id",
]


logger = logging.getLogger(__name__)

_DEDUPE_IDS: ContextVar[bool] = ContextVar("dpa_rag_dedupe_ids", default=False)
DEDUPE_ENV = "DPA_RAG_DEDUPE_IDS"
DEDUPE_IDS_HELP = (
    "Rename repeated question ids (<id>-2, <id>-3…; the count is logged) instead of stopping with an error."
)


def dedupe_ids_field() -> Any:
    """The ``dedupe_ids`` field of the configs whose stage loads question or retrieval files (``--dedupe-ids``).

    Result-neutral (:data:`dpa_rag.stage.RESULT_NEUTRAL_FIELDS`): without it a file with repeated ids is an error,
    so on every input a run without it finishes on, it changes nothing.
    """
    from pydantic import Field

    return Field(False, description=DEDUPE_IDS_HELP)


@contextlib.contextmanager
def dedupe_ids(enabled: bool = True) -> Iterator[None]:
    """Within this block, loaders rename repeated record ids instead of raising (``--dedupe-ids``).

    ``DPA_RAG_DEDUPE_IDS=1`` in the environment does the same (for worker processes).
    """
    token = _DEDUPE_IDS.set(enabled)
    try:
        yield
    finally:
        _DEDUPE_IDS.reset(token)


def _dedupe_enabled(explicit: bool | None) -> bool:
    if explicit is not None:
        return explicit
    return _DEDUPE_IDS.get() or os.environ.get(DEDUPE_ENV, "") not in ("", "0")


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


def _type_name(val: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(val), f"a {type(val).__name__}"
    )


def _answers_of(rec: dict[str, Any]) -> list[str] | None:
    for key in ("answers", "answer", "golden_answers", "reference"):
        if key in rec:
            val = rec[key]
            if isinstance(val, str):
                raise ValueError(f"field '{key}' must be a list of strings, got a string (write [{_json_str(val)}])")
            if not isinstance(val, list):
                raise ValueError(f"field '{key}' must be a list of strings, got {_type_name(val)}")
            for i, a in enumerate(val):
                if not isinstance(a, str):
                    raise ValueError(f"field '{key}' must be a list of strings, item {i} is {_type_name(a)}")
            return list(val)
    return None


def _json_str(val: str, limit: int = 40) -> str:
    return json.dumps(val if len(val) <= limit else val[:limit] + "…", ensure_ascii=False)


def _id_of(rec: dict[str, Any], keys: tuple[str, ...] = ("id", "qid", "_id")) -> str | None:
    """The record's id as a string (a string or an integer in the file), or ``None`` when it has none."""
    for key in keys:
        if key in rec and rec[key] not in (None, ""):
            val = rec[key]
            if isinstance(val, bool) or not isinstance(val, (str, int)):
                raise ValueError(f"field '{key}' must be a string or an integer, got {_type_name(val)}")
            return str(val)
    return None


def _question_of(rec: dict[str, Any]) -> str:
    for key in ("question", "query"):
        if isinstance(rec.get(key), str):
            return rec[key]
    raise ValueError("no 'question' (or 'query') string field")


class _Ids:
    """Hands out record ids: a repeat is an error naming both lines, or (``dedupe``) renamed ``<id>-2``…"""

    def __init__(self, path: str | Path, dedupe: bool) -> None:
        self.path = path
        self.dedupe = dedupe
        self.first: dict[str, int] = {}
        self.renamed: list[tuple[str, str]] = []

    def take(self, base: str, pos: int, derived: bool) -> str:
        if base in self.first:
            if not self.dedupe:
                what = "the same question (the records have no id)" if derived else f"the id '{base}'"
                unit = "item" if Path(self.path).name.removesuffix(".gz").endswith(".json") else "line"
                raise DataError(
                    f"{self.path}:{pos}: {what} already appears at {unit} {self.first[base]}; give each record its "
                    "own id, or pass --dedupe-ids to rename repeats"
                )
            k, out = 1, base
            while out in self.first:
                k += 1
                out = f"{base}-{k}"
            self.renamed.append((base, out))
            base = out
        self.first[base] = pos
        return base

    def report(self) -> None:
        if self.renamed:
            old, new = self.renamed[0]
            logger.warning(
                "%s: renamed %d repeated id(s) (--dedupe-ids), e.g. '%s' → '%s'",
                self.path, len(self.renamed), old, new,
            )


def _nonempty(path: str | Path, out: list[Any], what: str) -> None:
    if not out:
        raise DataError(f"{path}: no {what} in the file (it is empty or only blank lines); check the path")


def load_questions(
    path: str | Path, require_answers: bool = True, limit: int | None = None, dedupe_ids: bool | None = None
) -> list[Question]:
    """Load questions with gold answers from any supported layout.

    Args:
        path: a ``.jsonl``/``.json`` file, optionally ``.gz``.
        require_answers: raise if a record has no gold answer field (set ``False`` for unlabelled inference).
        limit: keep only the first ``limit`` records.
        dedupe_ids: rename repeated ids instead of raising; ``None``: as set by :func:`dedupe_ids` (default off).

    Raises:
        DataError: a malformed record (file and line named), a repeated id, or no record at all.
    """
    out: list[Question] = []
    ids = _Ids(path, _dedupe_enabled(dedupe_ids))
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
            given = _id_of(rec)
            qid = ids.take(given or question_id(q), pos, derived=given is None)
            extra = {k: rec[k] for k in ("category", "origin_id", "strategy") if k in rec}
            out.append(Question(id=qid, question=q, answers=answers, **extra))
        except DataError:
            raise
        except (ValueError, ValidationError) as exc:
            raise DataError(f"{path}:{pos}: {_msg(exc)}") from None
    _nonempty(path, out, "questions")
    ids.report()
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
            yield Passage(id=_id_of(c, ("id",)) or passage_id(title, text), title=title, text=text)
        return
    if "contents" in rec:
        contents = str(rec["contents"])
        title, sep, text = contents.partition("\n")
        if sep and title.startswith('"') and title.endswith('"'):
            title = title[1:-1]
        elif not sep:
            title, text = "", contents
        yield Passage(id=_id_of(rec, ("id",)) or passage_id(title, text), title=title, text=text)
        return
    if "text" not in rec:
        raise ValueError("a passage needs 'text' (or FlashRAG 'contents', or DPR 'ctxs')")
    title, text = str(rec.get("title", "")), str(rec["text"])
    yield Passage(id=_id_of(rec, ("id",)) or passage_id(title, text), title=title, text=text)


def _iter_tsv(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader((line for _, line in iter_lines(path)), delimiter="\t")
    for row in reader:
        lineno = reader.line_num
        if lineno == 1 and row[:1] == ["id"]:
            continue
        if not row:
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
    c["id"] = _id_of(c, ("id",)) or passage_id(str(c.get("title", "")), str(c.get("text", "")))
    return Ctx.model_validate(c)


def load_retrieval(
    path: str | Path, limit: int | None = None, dedupe_ids: bool | None = None
) -> list[RetrievalRecord]:
    """Load a DPR-style retrieval file (``question``, ``answers``, ``ctxs``).

    Also accepts lost-in-the-middle's ``hasanswer`` key and the authors' valid/test pairs (one ``ctx`` string each).

    Args:
        path: a ``.jsonl``/``.json`` file, optionally ``.gz``.
        limit: keep only the first ``limit`` records.
        dedupe_ids: rename repeated ids instead of raising; ``None``: as set by :func:`dedupe_ids` (default off).

    Raises:
        DataError: a malformed record (file and line named), a repeated id, or no record at all.
    """
    out: list[RetrievalRecord] = []
    ids = _Ids(path, _dedupe_enabled(dedupe_ids))
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
            given = _id_of(rec, ("id", "qid"))
            qid = ids.take(given or question_id(q), pos, derived=given is None)
            extra = {k: rec[k] for k in ("category", "origin_id", "strategy") if k in rec}
            out.append(RetrievalRecord(id=qid, question=q, answers=answers, ctxs=ctxs, **extra))
        except DataError:
            raise
        except (ValueError, ValidationError) as exc:
            raise DataError(f"{path}:{pos}: {_msg(exc)}") from None
    _nonempty(path, out, "records")
    ids.report()
    return out
