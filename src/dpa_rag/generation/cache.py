"""Persistent generation cache (SQLite) and the caching, batching wrapper around any backend.

Key = SHA-256 of (model id, decoding parameters, prompt). Results are committed after every backend batch, so an
interrupted run keeps everything it finished and a re-run with the same inputs makes no model call at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from dpa_rag.generation.base import GenerationParams, Generator, LoglikUnsupported, Prompt, supports_loglik
from dpa_rag.jobs import check_preempted

__all__ = ["CachedGenerator", "GenerationCache", "default_cache_dir"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$DPA_RAG_CACHE`` if set, else ``~/.cache/dpa-rag``."""
    env = os.environ.get("DPA_RAG_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dpa-rag"


class GenerationCache:
    """A key → completion store in one SQLite file (WAL mode; safe across threads and processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS generations (key TEXT PRIMARY KEY, model TEXT, output TEXT, created REAL)"
        )
        self._conn.commit()

    @staticmethod
    def key(model_id: str, params: GenerationParams, prompt: Prompt) -> str:
        payload = json.dumps(
            {"model": model_id, "params": params.model_dump(mode="json"), "prompt": prompt},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    @staticmethod
    def loglik_key(model_id: str, prompt: Prompt, continuation: str) -> str:
        payload = json.dumps(
            {"model": model_id, "kind": "loglik", "prompt": prompt, "continuation": continuation},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(f"SELECT key, output FROM generations WHERE key IN ({marks})", chunk)
                found.update(dict(rows.fetchall()))
        return found

    def put_many(self, model_id: str, items: Sequence[tuple[str, str]]) -> None:
        now = time.time()
        with self._lock:
            self._conn.executemany(
                "INSERT OR REPLACE INTO generations (key, model, output, created) VALUES (?, ?, ?, ?)",
                [(k, model_id, out, now) for k, out in items],
            )
            self._conn.commit()

    def __len__(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM generations").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class CachedGenerator:
    """Wrap a backend with the cache: look everything up, generate only the misses in batches, store each batch.

    Attributes:
        hits, calls: counters over the wrapper's lifetime (cache hits, prompts sent to the backend).
    """

    def __init__(
        self,
        backend: Generator,
        cache: GenerationCache | None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        self.backend = backend
        self.cache = cache
        self.batch_size = batch_size
        self.progress = progress
        self.hits = 0
        self.calls = 0

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    def _cached(
        self, keys: Sequence[str], compute: Callable[[list[int]], Sequence[str]], desc: str, unit: str
    ) -> list[str]:
        """Values for ``keys`` in order: cache hits, then ``compute(first indices)`` for the misses in batches of
        ``batch_size`` (identical keys computed once), each batch stored as soon as it is done."""
        results: list[str | None] = [None] * len(keys)
        if self.cache is not None:
            found = self.cache.get_many(keys)
            for i, k in enumerate(keys):
                if k in found:
                    results[i] = found[k]
        todo: dict[str, list[int]] = {}
        for i, r in enumerate(results):
            if r is None:
                todo.setdefault(keys[i], []).append(i)
        self.hits += len(keys) - sum(len(v) for v in todo.values())
        if todo:
            order = list(todo)
            bar = tqdm(total=len(order), desc=desc, unit=unit, disable=not self.progress, leave=False)
            try:
                for start in range(0, len(order), self.batch_size):
                    batch_keys = order[start : start + self.batch_size]
                    outs = list(compute([todo[k][0] for k in batch_keys]))
                    if len(outs) != len(batch_keys):
                        raise RuntimeError(
                            f"backend {type(self.backend).__name__} returned {len(outs)} outputs for "
                            f"{len(batch_keys)} inputs"
                        )
                    self.calls += len(batch_keys)
                    if self.cache is not None:
                        self.cache.put_many(self.model_id, list(zip(batch_keys, outs, strict=True)))
                    for k, out in zip(batch_keys, outs, strict=True):
                        for i in todo[k]:
                            results[i] = out
                    bar.update(len(batch_keys))
                    if self.cache is not None:  # a safe point: this batch is stored
                        check_preempted(f"{self.calls} call(s) of this run are in the generation cache")
            finally:
                bar.close()
        return [r if r is not None else "" for r in results]

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams, desc: str = "generate") -> list[str]:
        """Completions for ``prompts`` in order; only cache misses reach the backend."""
        keys = [GenerationCache.key(self.model_id, params, p) for p in prompts]
        return self._cached(keys, lambda idx: self.backend.generate([prompts[i] for i in idx], params), desc, "prompt")

    def loglik(
        self, prompts: Sequence[Prompt], continuations: Sequence[str], desc: str = "score"
    ) -> list[tuple[float, int]]:
        """``(sum log-prob, n tokens)`` of each continuation under its prompt; only cache misses reach the backend.

        Raises:
            LoglikUnsupported: the backend cannot score given tokens.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
        if not supports_loglik(self.backend):
            raise LoglikUnsupported(
                f"the {type(self.backend).__name__} backend cannot score answers (no log-probabilities); use the "
                "hf or vllm backend, an OpenAI-compatible server that returns prompt logprobs, or label_rule hit"
            )
        keys = [GenerationCache.loglik_key(self.model_id, p, c) for p, c in zip(prompts, continuations, strict=True)]

        def compute(idx: list[int]) -> list[str]:
            outs = self.backend.loglik([prompts[i] for i in idx], [continuations[i] for i in idx])
            return [json.dumps([float(s), int(n)]) for s, n in outs]

        return [(float(v[0]), int(v[1])) for v in (json.loads(x) for x in self._cached(keys, compute, desc, "pair"))]
