"""What every stage writes next to its outputs: the resolved config and a manifest.

``config.yaml`` is the resolved configuration. ``manifest.json`` records the config hash, the SHA-256 of each input
file, row counts, timings, versions and the git commit, so ``dpa-rag run`` can tell whether a stage's outputs are
still valid for its current inputs (see :func:`manifest_matches`).

A stage never destroys a finished result before its new run is known to start: the recorder checks the output folder
and the models the config names (:func:`dpa_rag.models.check_model`) when it is created, but it removes the old
``manifest.json`` and writes the new ``config.yaml`` only just before the stage first writes into its folder (or at
:meth:`StageRecorder.finish`). A run that fails on its inputs or models leaves a finished folder as it was.

A run that fails after it started writing is undone by :func:`discard_unfinished` (the command line's error boundary
calls it): the files and folders the run created are removed, files that were there before are never touched, and the
old ``config.yaml`` and ``manifest.json`` come back when every other file the folder held is unchanged. Resume state
is kept so a re-run picks up finished work: ``*.partial.jsonl``/``*.partial.json`` and ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import platform
import subprocess
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePath
from typing import IO, Any, ClassVar, TypeVar

from pydantic import BaseModel

from dpa_rag import __version__
from dpa_rag.config import ConfigError, config_hash, save_config
from dpa_rag.io import (
    DataError,
    append_jsonl,
    file_sha256,
    read_json,
    read_resumable_jsonl,
    respect_umask,
    respect_umask_tree,
    unwatch_folder,
    watch_folder,
    write_json,
)
from dpa_rag.jobs import LOCK_FILE, check_preempted

__all__ = [
    "MANIFEST",
    "STAGE_CONFIG",
    "ChunkLog",
    "StageOutputs",
    "StageRecorder",
    "check_out_dir",
    "check_stage_models",
    "discard_unfinished",
    "hash_inputs",
    "manifest_matches",
    "resume_state",
    "read_manifest",
    "rebase_path",
    "rebase_values",
    "recorded_run_dir",
    "recorder_mark",
    "stage_recorder",
]

_log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGE_CONFIG = "config.yaml"  # the resolved config a stage writes next to its outputs
# Fields that never change a stage's result (where to write, how loud, caches, parallelism).
RESULT_NEUTRAL_FIELDS = {
    "out_dir", "cache_dir", "use_cache", "progress", "max_concurrency", "timeout", "max_retries", "chunk_size",
    "records_per_chunk", "dedupe_ids",
}


OutputsT = TypeVar("OutputsT", bound="StageOutputs")


@dataclasses.dataclass(frozen=True)
class StageOutputs:
    """What a stage wrote: its folder and one path per named output file.

    A stage module declares ``FILES`` (field name → file name in the stage folder; the first is the main output)
    and a path field for each; ``Outputs.at(folder)`` names the files of a stage folder without running anything
    (the pipeline wires the next stage's inputs with it). ``os.fspath(outputs)`` is the main output.
    """

    out_dir: Path
    FILES: ClassVar[dict[str, str]] = {}
    # the stage also writes files not named in FILES (index parts, progress files): `written` can't list them all
    OPEN: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.FILES:
            raise TypeError(f"{cls.__name__}: declare FILES (field name -> file name)")

    @classmethod
    def at(cls: type[OutputsT], out_dir: str | Path) -> OutputsT:
        """The outputs of the stage folder ``out_dir``."""
        folder = Path(out_dir)
        return cls(folder, **{name: folder / file for name, file in cls.FILES.items()})  # type: ignore[arg-type]

    @classmethod
    def written(cls, cfg: Any) -> set[str] | None:
        """The first path components the stage writes in its folder for ``cfg`` (``None``: not all are named)."""
        return None if cls.OPEN else set(cls.FILES.values())

    @property
    def main(self) -> Path:
        """The main output (the first of ``FILES``)."""
        return getattr(self, next(iter(self.FILES)))

    def files(self) -> dict[str, Path]:
        """Every named output."""
        return {name: getattr(self, name) for name in self.FILES}

    def __fspath__(self) -> str:
        return str(self.main)

    def __str__(self) -> str:
        """The folder and the named outputs that exist in it (``wrote runs/x (a.jsonl, b.json)``)."""
        present = [name for name in self.FILES.values() if (Path(self.out_dir) / name).exists()]
        return f"{self.out_dir} ({', '.join(present)})" if present else str(self.out_dir)


def _neutral(cfg: BaseModel) -> set[str]:
    """Fields of ``cfg`` left out of its manifest hash (the global list plus the class's ``result_neutral``)."""
    extra = getattr(type(cfg), "result_neutral", frozenset())
    return (RESULT_NEUTRAL_FIELDS | set(extra)) & set(type(cfg).model_fields)


def hash_inputs(paths: Iterable[str | Path | None]) -> dict[str, str]:
    """Fingerprint of each input: SHA-256 of a file's bytes; for a folder (an index, a model), the relative names,
    sizes and modification times of its files (hashing gigabytes of weights on every check would be too slow)."""
    import hashlib

    out: dict[str, str] = {}
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        if p.is_dir():
            h = hashlib.sha256()
            skip = (MANIFEST, "config.yaml", LOCK_FILE)
            for f in sorted(x for x in p.rglob("*") if x.is_file() and x.name not in skip):
                st = f.stat()
                h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            out[str(p)] = "dir:" + h.hexdigest()
        elif p.exists():
            out[str(p)] = file_sha256(p)
        else:
            out[str(p)] = "missing"
    return out


def _git_sha() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def rebase_path(value: str | Path, recorded: str | Path, now: str | Path) -> Path | None:
    """``value`` moved from the run folder ``recorded`` (as a run wrote it) to ``now``; ``None`` if ``value`` is not
    inside ``recorded``. Works on the path text (nothing is resolved against the current directory)."""
    p, old = PurePath(str(value)), PurePath(str(recorded))
    if p.is_absolute() != old.is_absolute() or str(old) in ("", "."):
        return None
    try:
        rel = p.relative_to(old)
    except ValueError:
        return None
    return Path(now) / rel


def rebase_values(data: Any, recorded: str | Path | Sequence[str | Path], now: str | Path) -> Any:
    """``data`` (a config's values) with every string that names a path inside ``recorded`` (or the first of several
    recorded folders it lies in) moved to ``now``."""
    roots = [recorded] if isinstance(recorded, (str, Path)) else list(recorded)
    if isinstance(data, dict):
        return {k: rebase_values(v, roots, now) for k, v in data.items()}
    if isinstance(data, list):
        return [rebase_values(v, roots, now) for v in data]
    if isinstance(data, str) and data:
        for root in roots:
            moved = rebase_path(data, root, now)
            if moved is not None:
                return str(moved)
    return data


def recorded_run_dir(step_dir: str | Path) -> str | None:
    """The run folder a pipeline step's ``config.yaml`` was written in (the parent of its recorded ``out_dir``,
    as written: relative to the directory the run was started from, or absolute); ``None`` if not recorded."""
    from dpa_rag.config import load_yaml

    path = Path(step_dir) / STAGE_CONFIG
    if not path.is_file():
        return None
    try:
        out = load_yaml(path).get("out_dir")
    except Exception:  # an unreadable config: the step will not match anyway
        return None
    return str(PurePath(str(out)).parent) if out else None


def manifest_matches(
    out_dir: str | Path,
    cfg: BaseModel,
    inputs: Iterable[str | Path | None] | None = None,
    moved: tuple[str | Path, str | Path] | None = None,
) -> bool:
    """True iff ``out_dir`` holds a finished manifest for the same config hash and unchanged inputs.

    Args:
        out_dir: the stage's output folder.
        cfg: the config the stage would run with now.
        inputs: the input paths to compare; default: the ones the manifest recorded.
        moved: ``(recorded, now)``: the run folder was written as ``recorded`` and is now ``now`` (moved, copied or
            run from another directory): paths inside it compare by their place in the run folder.
    """
    m = read_manifest(out_dir)
    if not m or m.get("status") != "complete":
        return False
    neutral = _neutral(cfg)
    hashes = {config_hash(cfg, exclude=neutral)}
    if moved is not None:
        data = rebase_values(cfg.model_dump(mode="json", exclude=neutral), moved[1], moved[0])
        hashes.add(hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16])
    if m.get("config_hash") not in hashes:
        return False
    recorded = m.get("inputs") or {}
    if inputs is None and moved is not None:
        now = {k: str(rebase_path(k, *moved) or k) for k in recorded}
        fresh = hash_inputs(now.values())
        if any(fresh.get(now[k]) != v for k, v in recorded.items()):
            return False
    elif m.get("inputs") != hash_inputs(recorded if inputs is None else inputs):
        return False
    return all((Path(out_dir) / o).exists() for o in m.get("outputs", []))


def check_out_dir(out_dir: str | Path) -> None:
    """Raise :class:`~dpa_rag.config.ConfigError` unless ``out_dir`` is (or can be made) a writable folder."""
    out_dir = Path(out_dir)
    probe = out_dir
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(f"{out_dir}: {probe} is a broken symbolic link; choose another --out-dir")
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "exists and is a file" if probe == out_dir else f"cannot be created: {probe} is a file"
        raise ConfigError(f"{out_dir}: {what}, not a folder; choose another --out-dir")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{out_dir}: cannot write to {probe} (permission denied); choose another --out-dir or fix its permissions"
        )


def _model_fields(cfg: BaseModel) -> list[str]:
    """Fields of ``cfg`` that name a model the stage will load (for its current backend/kind)."""
    fields = type(cfg).model_fields
    backend = getattr(cfg, "backend", None)
    out = []
    if "model" in fields and backend not in ("openai", "fake"):
        out.append("model")
    out += [f for f in ("backbone", "init_model") if f in fields]
    if "encoder" in fields and getattr(cfg, "kind", "dense") in ("dense", "both") and backend in (None, "similarity"):
        out.append("encoder")
    if "nli_model" in fields and backend == "nli":
        out.append("nli_model")
    return out


def check_stage_models(cfg: BaseModel) -> None:
    """Fail before a stage writes anything if a model its config names cannot be loaded (see
    :func:`dpa_rag.models.check_model`): a missing folder, a folder without a model, a hub id missing while offline."""
    from dpa_rag.models import attn_kwargs, check_model

    if getattr(cfg, "backend", None) in (None, "hf"):
        attn_kwargs(getattr(cfg, "attn_implementation", "auto"))  # flash_attention_2 without flash-attn
    for name in _model_fields(cfg):
        value = getattr(cfg, name, None)
        if isinstance(value, (str, Path)) and str(value):
            check_model(str(value), what=f"--{name.replace('_', '-')}")


def _fix_private_modes(out_dir: Path, outputs: Iterable[str]) -> None:
    """Outputs written through ``mkstemp``/``mkdtemp`` (0600/0700) get the modes the umask allows (a folder output,
    such as a saved model, with everything inside it)."""
    seen: set[Path] = set()
    for rel in outputs:
        p = out_dir / rel
        if p.is_dir():
            respect_umask_tree(p)
        chain = [p, *[q for q in p.parents if q != out_dir and q.is_relative_to(out_dir)]]
        for q in chain:
            if q in seen:
                continue
            seen.add(q)
            try:
                mode = q.stat().st_mode & 0o777
            except OSError:
                continue
            if (q.is_dir() and mode == 0o700) or (q.is_file() and mode == 0o600):
                respect_umask(q)


# what a failed run leaves for its re-run to resume from (see discard_unfinished)
KEEP_ON_FAILURE_DIRS = frozenset({"checkpoints"})
KEEP_ON_FAILURE_SUFFIXES = (".partial.jsonl", ".partial.json")
_SEQ = itertools.count()
_UNFINISHED: dict[int, weakref.ref[StageRecorder]] = {}
_UNFINISHED_LOCK = threading.Lock()


def _snapshot(folder: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under ``folder`` (relative, ``/``-separated) → (is a folder, size, mtime in ns)."""
    out: dict[str, tuple[bool, int, int]] = {}
    if not folder.is_dir():
        return out
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            p = Path(root) / name
            try:
                st = p.lstat()
            except OSError:
                continue
            is_dir = p.is_dir() and not p.is_symlink()
            key = (True, 0, 0) if is_dir else (False, st.st_size, st.st_mtime_ns)
            out[p.relative_to(folder).as_posix()] = key
    return out


def _kept_on_failure(rel: str) -> bool:
    return rel.split("/", 1)[0] in KEEP_ON_FAILURE_DIRS or rel.endswith(KEEP_ON_FAILURE_SUFFIXES)


def recorder_mark() -> int:
    """A mark for :func:`discard_unfinished`: recorders created after it are the ones it may undo."""
    return next(_SEQ)


def discard_unfinished(since: int = 0) -> list[Path]:
    """Undo the unfinished stage runs recorded after ``since`` (see :func:`recorder_mark`); returns their folders.

    Called when a stage fails: each such run's folder is put back as the recorder found it (see the module doc).
    """
    with _UNFINISHED_LOCK:
        seqs = sorted((s for s in _UNFINISHED if s > since), reverse=True)
        refs = [_UNFINISHED.pop(s) for s in seqs]
    folders = []
    for ref in refs:
        rec = ref()
        if rec is not None and not rec.finished:
            rec.discard()
            folders.append(rec.out_dir)
    return folders


class StageRecorder:
    """Collects counts and timings during a stage; writes ``config.yaml`` and ``manifest.json``.

    Creating one checks the output folder and the config's models but changes nothing on disk except creating the
    folder; the old manifest is removed and the new ``config.yaml`` written by :meth:`start`, which runs by itself
    just before the stage's first write through :mod:`dpa_rag.io` into the folder, or at :meth:`finish`.
    """

    def __init__(self, stage: str, cfg: BaseModel, out_dir: str | Path, inputs: Iterable[str | Path | None]) -> None:
        self.stage = stage
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.counts: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self._t0 = time.time()
        self.started = False
        self.finished = False
        check_out_dir(self.out_dir)
        check_stage_models(cfg)
        # what the folder held, so a failed run can be undone (discard)
        self._created = next((p for p in [*reversed(self.out_dir.parents), self.out_dir] if not p.exists()), None)
        self._before = _snapshot(self.out_dir)
        self._saved = {n: (self.out_dir / n).read_bytes() for n in (MANIFEST, "config.yaml")
                       if (self.out_dir / n).is_file()}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        watch_folder(self.out_dir, self)
        self._seq = next(_SEQ)
        with _UNFINISHED_LOCK:
            _UNFINISHED[self._seq] = weakref.ref(self)

    def discard(self) -> None:
        """Undo this unfinished run: remove what it created (resume state excepted), restore the old
        ``config.yaml``/``manifest.json`` when nothing else that was there changed, remove a folder it created."""
        if self.finished:
            return
        self.finished = True
        unwatch_folder(self.out_dir, self)
        with _UNFINISHED_LOCK:
            _UNFINISHED.pop(self._seq, None)
        now = _snapshot(self.out_dir)
        removed = []
        for rel in sorted(now, key=lambda r: r.count("/"), reverse=True):  # deepest first
            if rel in self._before or _kept_on_failure(rel):
                continue
            p = self.out_dir / rel
            try:
                if now[rel][0]:
                    if not any(p.iterdir()):
                        p.rmdir()
                        removed.append(rel)
                else:
                    p.unlink()
                    removed.append(rel)
            except OSError as exc:
                _log.warning("could not remove %s of the failed %s run: %s", p, self.stage, exc)
        others = {r: v for r, v in self._before.items() if r not in self._saved}
        if self._saved and all(now.get(r) == v for r, v in others.items()):
            for name, data in self._saved.items():
                (self.out_dir / name).write_bytes(data)
        if self._created is not None:
            for folder in [self.out_dir, *self.out_dir.parents]:
                if not folder.is_dir() or any(folder.iterdir()):
                    break
                folder.rmdir()
                if folder == self._created:
                    break
        if removed:
            _log.info("%s failed: removed what it wrote in %s (%s)", self.stage, self.out_dir, ", ".join(removed[:5]))

    def before_first_write(self) -> None:
        """Called by :mod:`dpa_rag.io` before the stage's first write into its folder."""
        self.start()

    def start(self) -> None:
        """The new run starts producing: drop the old manifest, write the resolved config (once)."""
        if self.started:
            return
        self.started = True
        unwatch_folder(self.out_dir, self)
        # not complete until finish(): a kill from here on must not leave an old manifest next to new outputs
        (self.out_dir / MANIFEST).unlink(missing_ok=True)
        save_config(self.cfg, self.out_dir / "config.yaml")

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t, 3)

    def finish(self, outputs: Iterable[str], **counts: Any) -> Path:
        import torch
        import transformers

        self.start()
        self.finished = True
        with _UNFINISHED_LOCK:
            _UNFINISHED.pop(self._seq, None)
        outputs = list(outputs)
        _fix_private_modes(self.out_dir, outputs)
        self.counts.update(counts)
        neutral = _neutral(self.cfg)
        manifest = {
            "stage": self.stage,
            "status": "complete",
            "config_hash": config_hash(self.cfg, exclude=neutral),
            "inputs": hash_inputs(self.inputs),
            "outputs": sorted(outputs),
            "counts": self.counts,
            "timings_s": {**self.timings, "total": round(time.time() - self._t0, 3)},
            "versions": {
                "dpa_rag": __version__,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "git_sha": _git_sha(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return write_json(self.out_dir / MANIFEST, manifest)


def stage_recorder(
    stage: str, cfg: BaseModel, out_dir: str | Path, inputs: Iterable[str | Path | None]
) -> StageRecorder:
    """Start recording a stage: checks the output folder and models now, writes the resolved config lazily."""
    return StageRecorder(stage, cfg, out_dir, inputs)


def resume_state(cfg: BaseModel, inputs: Iterable[str | Path | None], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """What ties a stage's partial output to the run that wrote it: the config hash (result-neutral fields and
    ``exclude`` left out) and the fingerprints of ``inputs`` (see :func:`hash_inputs`)."""
    return {"config_hash": config_hash(cfg, exclude=_neutral(cfg) | set(exclude)), "inputs": hash_inputs(inputs)}


class ChunkLog:
    """The finished chunks of a stage's work, kept in ``out_dir/<name>.partial.jsonl`` so a killed run resumes.

    One record per input item (each with the item's ``id``), appended chunk by chunk and flushed.
    ``<name>.partial.json`` ties the file to ``state`` (:func:`resume_state`); a file written under another state,
    or whose ids are not those of the items now, is discarded. Only whole chunks are kept: a chunk's results can
    depend on which items were computed together (batching, padding), so a resumed run recomputes exactly the
    chunks a clean run computes and its output is byte-identical. A last line cut by a kill is dropped.

    Example::

        with ChunkLog(out_dir, "reranked", state, [r.id for r in records], chunk_size) as log:
            for start in range(log.start, len(records), chunk_size):
                log.append(work(records[start : start + chunk_size]))
        log.finish(rename_to=out_dir / "reranked.jsonl")  # or log.finish(): delete the partial file

    Attributes:
        done: the records kept from the partial file (then every appended one, as given).
        start: index of the first item still to do (a multiple of ``chunk_size``, or all items).
    """

    def __init__(
        self, out_dir: str | Path, name: str, state: dict[str, Any], ids: Sequence[str], chunk_size: int
    ) -> None:
        import logging

        out_dir = Path(out_dir)
        self.path = out_dir / f"{name}.partial.jsonl"
        self.state_path = out_dir / f"{name}.partial.json"
        self.done: list[Any] = []
        self._fh: IO[str] | None = None
        log = logging.getLogger(__name__)
        try:
            same = self.state_path.exists() and read_json(self.state_path) == state
        except DataError:
            same = False
        if same and self.path.exists():
            kept = read_resumable_jsonl(self.path)
            n = len(kept) if len(kept) == len(ids) else min(len(kept), len(ids)) // chunk_size * chunk_size
            if all(str(r.get("id")) == str(ids[i]) for i, r in enumerate(kept[:n])):
                if n < len(kept):
                    self._truncate(n)
                self.done = kept[:n]
                if n:
                    log.info("resuming: %d of %d item(s) already done in %s", n, len(ids), self.path)
            else:
                same = False
        if not same:
            if self.path.exists():
                log.warning("%s was written with another config or input; starting over", self.path)
                self.path.unlink()
            write_json(self.state_path, state)
        self.start = len(self.done)

    def _truncate(self, n: int) -> None:
        data = self.path.read_bytes()
        cut = 0
        for _ in range(n):
            cut = data.index(b"\n", cut) + 1
        with open(self.path, "r+b") as fh:
            fh.truncate(cut)

    def __enter__(self) -> ChunkLog:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._fh is not None:
            if exc_type is None:
                os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def append(self, records: Iterable[Any]) -> None:
        """Append one finished chunk (dicts or pydantic models; each flushed); then stop here after SIGTERM/SIGINT
        (:func:`~dpa_rag.jobs.check_preempted`)."""
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by __exit__/finish
        for r in records:
            append_jsonl(self._fh, r)
            self.done.append(r)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        check_preempted(f"{len(self.done)} finished item(s) are kept in {self.path}")  # a safe point

    def finish(self, rename_to: str | Path | None = None) -> None:
        """All chunks done: rename the partial file to ``rename_to`` (atomically), or delete it; drop the state."""
        if self._fh is not None:
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        if rename_to is None:
            self.path.unlink(missing_ok=True)
        else:
            if not self.path.exists():
                self.path.touch()
            os.replace(self.path, rename_to)
        self.state_path.unlink(missing_ok=True)
