"""File input/output: JSON Lines and JSON (optionally gzipped), atomic writes, hashing.

Every reader names the file and the line of a malformed record (bad JSON, bytes that are not UTF-8, a gzip file that
is truncated or not gzip at all); every writer goes through a temporary file in the same folder and an atomic rename,
so a killed process never leaves a half-written output behind. Written files and folders get the permissions the
umask allows (``0o666 & ~umask``), like files made with ``open``, not the private mode of ``mkstemp``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tempfile
import threading
import weakref
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DataError",
    "append_jsonl",
    "atomic_open",
    "file_sha256",
    "iter_lines",
    "iter_jsonl",
    "read_json",
    "read_records",
    "read_resumable_jsonl",
    "respect_umask",
    "respect_umask_tree",
    "unwatch_folder",
    "watch_folder",
    "write_json",
    "write_jsonl",
    "write_text",
]


class DataError(ValueError):
    """A data file is malformed. The message names the file and, where it applies, the line."""


# Objects (stage recorders) told before the first write into their folder: ``folder -> weakref(object)``; the object
# has ``before_first_write()`` and is dropped once told. See :class:`dpa_rag.stage.StageRecorder`.
_WATCHERS: dict[Path, weakref.ref] = {}
_WATCH_LOCK = threading.Lock()


def watch_folder(folder: str | Path, watcher: Any) -> None:
    """Call ``watcher.before_first_write()`` once, before this module first writes a file inside ``folder``.

    A newer watcher of the same folder replaces the older one.
    """
    with _WATCH_LOCK:
        _WATCHERS[Path(os.path.abspath(folder))] = weakref.ref(watcher)


def unwatch_folder(folder: str | Path, watcher: Any) -> None:
    """Stop watching ``folder`` (only if ``watcher`` is still the one registered)."""
    key = Path(os.path.abspath(folder))
    with _WATCH_LOCK:
        ref = _WATCHERS.get(key)
        if ref is not None and ref() in (None, watcher):
            del _WATCHERS[key]


def _before_write(path: str | Path) -> None:
    if not _WATCHERS:
        return
    target = Path(os.path.abspath(path))
    with _WATCH_LOCK:
        hits = [k for k in _WATCHERS if target.is_relative_to(k) and target != k]
        refs = [_WATCHERS.pop(k) for k in hits]
    for ref in refs:
        watcher = ref()
        if watcher is not None:
            watcher.before_first_write()


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected a file")


def _decode(path: Path, raw: bytes, lineno: int) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        hint = "it looks gzipped: name it *.gz" if raw[:2] == b"\x1f\x8b" else "re-save it as UTF-8"
        raise DataError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} of the line); "
            f"{hint}"
        ) from None
    return text.removeprefix("\ufeff") if lineno == 1 else text


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each line of a UTF-8 text file, gzipped when the name ends in ``.gz``.

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: a folder, a gzip file that is truncated or not gzip, or a line that is not UTF-8 (file and line
            named).
    """
    path = Path(path)
    _check_readable(path)
    lineno = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                yield lineno, _decode(path, raw, lineno)
    except gzip.BadGzipFile:
        raise DataError(f"{path}: not a gzip file (rename it without .gz if it is plain text)") from None
    except EOFError:
        raise DataError(
            f"{path}:{lineno + 1}: truncated gzip file (it ends inside line {lineno + 1}); download or compress it "
            "again"
        ) from None
    except zlib.error as exc:
        raise DataError(f"{path}:{lineno + 1}: corrupt gzip data ({exc}); download or compress it again") from None


def _read_text(path: Path) -> str:
    _check_readable(path)
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            raw = fh.read()
    except gzip.BadGzipFile:
        raise DataError(f"{path}: not a gzip file (rename it without .gz if it is plain text)") from None
    except (EOFError, zlib.error):
        raise DataError(f"{path}: truncated or corrupt gzip file; download or compress it again") from None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        line = raw[raw.rfind(b"\n", 0, exc.start) + 1 :].split(b"\n", 1)[0]
        return _decode(path, line, lineno)  # raises: names the line and the byte


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` for each non-blank line of a JSON Lines file (``.gz`` allowed).

    Raises:
        FileNotFoundError: the file does not exist.
        DataError: a line is not valid JSON or not a JSON object, or the file cannot be decoded (see
            :func:`iter_lines`); the message names file and line.
    """
    path = Path(path)
    for lineno, line in iter_lines(path):
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
    text = _read_text(path)
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


def _umask() -> int:
    try:  # Linux: read it without changing it (changing it is not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def respect_umask(path: str | Path) -> None:
    """Give a file made by ``mkstemp`` (0600) or a folder made by ``mkdtemp`` (0700) the mode ``open``/``mkdir``
    would have given it (``0o666``/``0o777`` less the umask), so other users of a shared folder can read it."""
    path = Path(path)
    with contextlib.suppress(OSError):
        mode = (0o777 if path.is_dir() else 0o666) & ~_umask()
        os.chmod(path, mode)


def respect_umask_tree(root: str | Path) -> None:
    """:func:`respect_umask` for ``root`` and everything under it that has the private mode of ``mkstemp`` (0600)
    or ``mkdtemp`` (0700), e.g. a model folder whose weights a library saved through a temporary file; other modes
    are left as they are."""
    root = Path(root)
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        try:
            if p.is_symlink():
                continue
            mode = p.stat().st_mode & 0o777
        except OSError:
            continue
        if (p.is_dir() and mode == 0o700) or (p.is_file() and mode == 0o600):
            respect_umask(p)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    _before_write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        respect_umask(tmp)
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
    if _WATCHERS and isinstance(getattr(fh, "name", None), str):
        _before_write(fh.name)
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
