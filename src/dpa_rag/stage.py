"""What every stage writes next to its outputs: the resolved config and a manifest.

``config.yaml`` is the resolved configuration. ``manifest.json`` records the config hash, the SHA-256 of each input
file, row counts, timings, versions and the git commit, so ``dpa-rag run`` can tell whether a stage's outputs are
still valid for its current inputs (see :func:`manifest_matches`).
"""

from __future__ import annotations

import contextlib
import json
import platform
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dpa_rag import __version__
from dpa_rag.config import config_hash, save_config
from dpa_rag.io import file_sha256, write_json

__all__ = ["MANIFEST", "StageRecorder", "hash_inputs", "manifest_matches", "read_manifest", "stage_recorder"]

MANIFEST = "manifest.json"
# Fields that never change a stage's result (where to write, how loud, caches, parallelism).
RESULT_NEUTRAL_FIELDS = {
    "out_dir", "cache_dir", "use_cache", "progress", "max_concurrency", "timeout", "max_retries", "chunk_size",
    "records_per_chunk",
}


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
            for f in sorted(x for x in p.rglob("*") if x.is_file() and x.name not in (MANIFEST, "config.yaml")):
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


def manifest_matches(
    out_dir: str | Path, cfg: BaseModel, inputs: Iterable[str | Path | None] | None = None
) -> bool:
    """True iff ``out_dir`` holds a finished manifest for the same config hash and unchanged inputs.

    Args:
        out_dir: the stage's output folder.
        cfg: the config the stage would run with now.
        inputs: the input paths to compare; default: the ones the manifest recorded.
    """
    m = read_manifest(out_dir)
    if not m or m.get("status") != "complete":
        return False
    if m.get("config_hash") != config_hash(cfg, exclude=_neutral(cfg)):
        return False
    recorded = m.get("inputs") or {}
    if m.get("inputs") != hash_inputs(recorded if inputs is None else inputs):
        return False
    return all((Path(out_dir) / o).exists() for o in m.get("outputs", []))


class StageRecorder:
    """Collects counts and timings during a stage; :meth:`finish` writes ``config.yaml`` and ``manifest.json``."""

    def __init__(self, stage: str, cfg: BaseModel, out_dir: str | Path, inputs: Iterable[str | Path | None]) -> None:
        self.stage = stage
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.inputs = [Path(p) for p in inputs if p is not None]
        self.counts: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self._t0 = time.time()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # a stage that starts is not complete until finish(): a kill from here on must not leave an old manifest
        (self.out_dir / MANIFEST).unlink(missing_ok=True)
        save_config(cfg, self.out_dir / "config.yaml")

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
    """Start recording a stage (writes the resolved config right away)."""
    return StageRecorder(stage, cfg, out_dir, inputs)
