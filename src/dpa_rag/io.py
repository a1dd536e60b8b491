"""File input/output: JSON Lines and JSON (optionally gzipped), atomic writes, hashing.

Every reader names the file and the line of a malformed record; every writer goes through a temporary file in the
same folder and an atomic rename, so a killed process never leaves a half-written output behind.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DataError",
    "append_jsonl",
    "atomic_open",
    "file_sha256",
    "iter_jsonl",
    "read_json",
    "read_records",
    "read_resumable_jsonl",
    "write_json",
    "write_jsonl",
    "write_text",
]


class DataError(ValueError):
    """A data file is malformed. The message names the file and, where it applies, the line."""


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSON Lines file (``.gz`` allowed).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: a line is not valid JSON or not a JSON object; the message names file and line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_json(path: str | Path) -> Any:
    """Read a whole JSON document (``.gz`` allowed); errors name the file and line."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    with _open_text(path) as fh:
        text = fh.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(position, record)`` from a ``.jsonl``/``.json`` file (gzipped or not).

    A ``.json`` file must hold a list of objects (position = 1-based index) or, for ``.jsonl``, one object per line
    (position = line number).
    """
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith(".json"):
        data = read_json(path)
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        for i, obj in enumerate(data, start=1):
            if not isinstance(obj, dict):
                raise DataError(f"{path}: item {i}: expected a JSON object, got {type(obj).__name__}")
            yield i, obj
    else:
        yield from iter_jsonl(path)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write a text file."""
    with atomic_open(path) as fh:
        fh.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write a JSON document (UTF-8, non-ASCII kept)."""
    with atomic_open(path) as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=indent)
        fh.write("\n")
    return Path(path)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> int:
    """Atomically write records as JSON Lines; returns the number written. Pydantic models are dumped."""
    n = 0
    with atomic_open(path) as fh:
        for rec in records:
            if hasattr(rec, "model_dump"):
                rec = rec.model_dump(mode="json", exclude_none=True)
            fh.write(json.dumps(rec, ensure_ascii=False))
            fh.write("\n")
            n += 1
    return n


def append_jsonl(fh: IO[str], record: Any) -> None:
    """Append one record to an open JSON Lines file and flush it (for incremental, resumable outputs)."""
    if hasattr(record, "model_dump"):
        record = record.model_dump(mode="json", exclude_none=True)
    fh.write(json.dumps(record, ensure_ascii=False))
    fh.write("\n")
    fh.flush()


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_resumable_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read the records a killed writer left in an append-only JSON Lines file.

    A process killed mid-write can leave the *last* line incomplete: that line is dropped and the file is truncated
    to the last complete record, so appending can resume. A malformed line anywhere else is a real error.
    """
    path = Path(path)
    if not path.exists():
        return []
    records: list[dict[str, Any]] = []
    good_bytes = 0
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    for i, raw in enumerate(lines, start=1):
        is_last = i == len(lines) or (i == len(lines) - 1 and lines[-1] == b"")
        if not raw.strip():
            good_bytes += len(raw) + (0 if i == len(lines) else 1)
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            if is_last:
                break
            raise DataError(f"{path}:{i}: invalid JSON in a resumable output; delete the file to start over") from None
        if i == len(lines):  # a complete object without its newline: keep it, add the newline below
            records.append(obj)
            good_bytes += len(raw)
            with open(path, "ab") as fh:
                fh.write(b"\n")
            good_bytes += 1
            break
        records.append(obj)
        good_bytes += len(raw) + 1
    if good_bytes < path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_bytes)
    return records
