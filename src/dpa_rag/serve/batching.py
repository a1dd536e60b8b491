"""Dynamic micro-batching: concurrent requests share one model call, which runs off the event loop.

A :class:`MicroBatcher` owns one model function ``fn(items) -> results`` and one worker thread. Requests
:meth:`~MicroBatcher.submit` their items (a rerank request: its ``(query, text)`` pairs; a reader request: its
prompt). When the worker is free, the batcher takes the oldest waiting request, then keeps adding waiting requests
(and waits up to ``window_s`` for new ones) until the merged batch would exceed ``max_batch`` items; one call of
``fn`` scores them all and each request gets its own slice back. Requests that queue up while the model is busy
join the next batch without waiting. A request larger than ``max_batch`` runs alone. With ``enabled=False`` every
request is its own call (the same worker thread, so the two modes compare fairly).

At most ``max_queue`` requests wait; one more raises :class:`QueueFull` (the server answers 503 with
``Retry-After``), so latency stays bounded under overload instead of growing with the queue. A request cancelled
while waiting (a client timeout, a client that disconnected) leaves the queue at once and never reaches the model;
a model call that raises fails only the requests of its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from dpa_rag.serve.metrics import Metrics

__all__ = ["MicroBatcher", "QueueFull"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(RuntimeError):
    """The batcher's queue is full; ``retry_after`` is a suggested wait in whole seconds."""

    def __init__(self, name: str, retry_after: int) -> None:
        super().__init__(f"{name}: too many requests waiting; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Request(Generic[T]):
    items: Sequence[T]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[T, R]):
    """Merge concurrent requests into batched calls of ``fn`` on one worker thread.

    Args:
        name: label in logs and metrics (``reranker``, ``reader:dpa-rag``, …).
        fn: the model call: a list of items → one result per item, in order. Runs on the worker thread.
        max_batch: most items per merged call.
        window_s: how long a batch waits for more requests once the worker is free (0 = take only what waits).
        max_queue: most requests waiting (not counting the running batch); more raise :class:`QueueFull`.
        enabled: ``False`` = one call per request (no merging).
        metrics: where batch sizes, queue depth and rejections are recorded.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[list[T]], Sequence[R]],
        max_batch: int = 256,
        window_s: float = 0.005,
        max_queue: int = 64,
        enabled: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and window_s >= 0")
        self.name = name
        self.fn = fn
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queue = max_queue
        self.enabled = enabled
        self.metrics = metrics
        self._pending: deque[_Request[T]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dpa-rag-{name}")
        self._batch_seconds = 0.0  # moving average, for Retry-After

    @property
    def waiting(self) -> int:
        """Requests waiting for the model."""
        return len(self._pending)

    async def submit(self, items: Sequence[T]) -> list[R]:
        """Results of ``fn`` for one request's ``items``, in order (possibly computed together with others)."""
        if not items:
            return []
        self._ensure_running()
        if len(self._pending) >= self.max_queue:
            retry = self._retry_after()
            if self.metrics:
                self.metrics.inc("dpa_rag_rejected_total", {"model": self.name})
            raise QueueFull(self.name, retry)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        req = _Request(list(items), fut)
        self._pending.append(req)
        self._gauge()
        assert self._wake is not None
        self._wake.set()
        try:
            return await fut  # cancelling the caller cancels fut
        except asyncio.CancelledError:  # a client that went away or timed out frees its place in the queue now
            with contextlib.suppress(ValueError):
                self._pending.remove(req)
            self._gauge()
            raise

    def _retry_after(self) -> int:
        """Whole seconds until the queue has drained, from the recent time per batch (at least 1)."""
        if self.enabled:
            ahead = math.ceil(sum(len(r.items) for r in self._pending) / self.max_batch)
        else:
            ahead = len(self._pending)
        return max(1, math.ceil(self._batch_seconds * (ahead + 1)))

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.set("dpa_rag_queue_depth", {"model": self.name}, len(self._pending))

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    def _pop_live(self) -> _Request[T] | None:
        while self._pending:
            req = self._pending.popleft()
            if not req.future.done():
                return req
        return None

    async def _collect(self) -> list[_Request[T]]:
        """The next batch: the oldest live request, plus whatever fits and arrives within the window."""
        assert self._wake is not None
        first = self._pop_live()
        while first is None:
            self._wake.clear()
            await self._wake.wait()
            first = self._pop_live()
        batch, size = [first], len(first.items)
        if not self.enabled:
            return batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        while size < self.max_batch:
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()
            if self._pending:
                if size + len(self._pending[0].items) > self.max_batch:
                    break
                req = self._pending.popleft()
                batch.append(req)
                size += len(req.items)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self._gauge()
            batch = [r for r in batch if not r.future.done()]
            if not batch:
                continue
            items = [x for r in batch for x in r.items]
            t = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self._call, items)
            except Exception as exc:  # the model failed: every request of the batch gets the error
                logger.exception("%s: batch of %d items failed", self.name, len(items))
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            took = time.perf_counter() - t
            self._batch_seconds = took if self._batch_seconds == 0 else 0.8 * self._batch_seconds + 0.2 * took
            if self.metrics:
                self.metrics.observe("dpa_rag_batch_size", {"model": self.name}, len(items))
                self.metrics.observe("dpa_rag_batch_requests", {"model": self.name}, len(batch))
                self.metrics.observe("dpa_rag_batch_seconds", {"model": self.name}, took)
            pos = 0
            for r in batch:
                part = results[pos : pos + len(r.items)]
                pos += len(r.items)
                if not r.future.done():
                    r.future.set_result(part)

    def _call(self, items: list[T]) -> list[R]:
        out = list(self.fn(items))
        if len(out) != len(items):
            raise RuntimeError(f"{self.name}: the model returned {len(out)} results for {len(items)} items")
        return out

    async def aclose(self) -> None:
        """Stop the loop, fail waiting requests and release the worker thread."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        while self._pending:
            req = self._pending.popleft()
            if not req.future.done():
                req.future.set_exception(RuntimeError(f"{self.name}: server shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        """Settings and state, for ``/health``."""
        return {
            "micro_batching": self.enabled, "max_batch": self.max_batch, "window_ms": self.window_s * 1000,
            "max_queue": self.max_queue, "waiting": len(self._pending),
        }
