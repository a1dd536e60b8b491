"""MicroBatcher (no HTTP): merged calls respect max_batch, results go back to their requests, a failing call fails
only its own batch, a cancelled request never reaches the model, the queue bound; the Prometheus renderer."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from dpa_rag.serve.batching import MicroBatcher, QueueFull
from dpa_rag.serve.metrics import Metrics


class Model:
    def __init__(self, delay: float = 0.02, fail_on: str | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.calls: list[list[str]] = []
        self.threads: set[str] = set()

    def __call__(self, items: list[str]) -> list[str]:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        self.calls.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("model failure")
        return [x.upper() for x in items]


def _run(coro):
    return asyncio.run(coro)


def test_merges_concurrent_requests_up_to_max_batch():
    model = Model()

    async def main():
        b = MicroBatcher("m", model, max_batch=5, window_s=0.02, metrics=Metrics())
        reqs = [[f"r{i}a", f"r{i}b"] for i in range(6)]
        out = await asyncio.gather(*[b.submit(r) for r in reqs])
        await b.aclose()
        return reqs, out, b

    reqs, out, b = _run(main())
    assert out == [[x.upper() for x in r] for r in reqs]
    assert all(len(c) <= 5 for c in model.calls) and len(model.calls) < 6
    assert sorted(x for c in model.calls for x in c) == sorted(x for r in reqs for x in r)
    assert model.threads and all(t.startswith("dpa-rag-m") for t in model.threads)  # off the event loop
    assert b.metrics.get("dpa_rag_batch_size", {"model": "m"}) == len(model.calls)


def test_disabled_means_one_call_per_request_and_big_requests_run_alone():
    model = Model(delay=0.0)

    async def main():
        off = MicroBatcher("off", model, max_batch=100, enabled=False)
        await asyncio.gather(*[off.submit(["a", "b"]) for _ in range(4)])
        await off.aclose()
        on = MicroBatcher("on", model, max_batch=3, window_s=0.01)
        res = await asyncio.gather(on.submit(["x"] * 7), on.submit(["y"]))
        await on.aclose()
        return res

    res = _run(main())
    assert model.calls[:4] == [["a", "b"]] * 4
    assert ["x"] * 7 in model.calls[4:] and res == [["X"] * 7, ["Y"]]


def test_failure_reaches_only_its_batch():
    model = Model(delay=0.0, fail_on="bad")

    async def main():
        b = MicroBatcher("m", model, max_batch=1, window_s=0.0)
        results = await asyncio.gather(b.submit(["ok"]), b.submit(["bad"]), b.submit(["fine"]),
                                       return_exceptions=True)
        await b.aclose()
        return results

    ok, bad, fine = _run(main())
    assert ok == ["OK"] and fine == ["FINE"] and isinstance(bad, RuntimeError)


def test_cancelled_requests_are_skipped_and_the_queue_is_bounded():
    model = Model(delay=0.1)

    async def main():
        metrics = Metrics()
        b = MicroBatcher("m", model, max_batch=1, window_s=0.0, max_queue=2, metrics=metrics)
        first = asyncio.ensure_future(b.submit(["first"]))
        await asyncio.sleep(0.02)  # running now
        doomed = asyncio.ensure_future(b.submit(["doomed"]))
        kept = asyncio.ensure_future(b.submit(["kept"]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await b.submit(["one too many"])
        doomed.cancel()
        assert await first == ["FIRST"] and await kept == ["KEPT"]
        await b.aclose()
        return info.value, metrics

    full, metrics = _run(main())
    assert full.retry_after >= 1
    assert [c for c in model.calls] == [["first"], ["kept"]]
    assert metrics.get("dpa_rag_rejected_total", {"model": "m"}) == 1


def test_invalid_settings():
    with pytest.raises(ValueError):
        MicroBatcher("m", Model(), max_batch=0)


def test_prometheus_rendering():
    m = Metrics()
    m.inc("dpa_rag_requests_total", {"endpoint": "/rerank", "status": "200"})
    m.inc("dpa_rag_requests_total", {"endpoint": "/rerank", "status": "200"})
    for v in (1, 3, 3, 2000):
        m.observe("dpa_rag_batch_size", {"model": 'a"b'}, v)
    m.set("dpa_rag_queue_depth", {"model": "r"}, 4)
    text = m.render()
    assert 'dpa_rag_requests_total{endpoint="/rerank",status="200"} 2' in text
    assert 'dpa_rag_batch_size_bucket{model="a\\"b",le="1"} 1' in text
    assert 'dpa_rag_batch_size_bucket{model="a\\"b",le="4"} 3' in text
    assert 'dpa_rag_batch_size_bucket{model="a\\"b",le="+Inf"} 4' in text
    assert 'dpa_rag_batch_size_sum{model="a\\"b"} 2007' in text
    assert 'dpa_rag_batch_size_count{model="a\\"b"} 4' in text
    assert 'dpa_rag_queue_depth{model="r"} 4' in text
    with pytest.raises(KeyError):
        m.inc("dpa_rag_unknown", {})
