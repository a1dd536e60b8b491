"""The server under faults: a model call that raises fails only its batch (500 JSON) and the server keeps serving;
a client that disconnects frees its queue slot; shutdown drains requests in flight; /health is not ready while the
models load."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_serve import DOCS, QUERY, RecordingScorer, _error  # noqa: E402

from dpa_rag.serve import ServeConfig, ServerThread, build_app  # noqa: E402
from dpa_rag.serve.server import LoadingGate  # noqa: E402


class FailsOnce(RecordingScorer):
    """Raises on the call whose pairs include the query ``boom``; scores normally otherwise."""

    def score_pairs(self, pairs):
        if any(q == "boom" for q, _ in pairs):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return super().score_pairs(pairs)


def _depth(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('dpa_rag_queue_depth{model="reranker"}'):
            return float(line.split()[-1])
    return 0.0


def test_a_model_call_that_raises_fails_its_batch_only(base_cfg: dict) -> None:
    app = build_app(ServeConfig(**base_cfg, micro_batching=False), scorer=FailsOnce())
    with ServerThread(app) as url:
        err = _error(httpx.post(f"{url}/rerank", json={"query": "boom", "texts": DOCS}), 500)
        assert err["type"] == "server_error" and "device-side assert" in err["message"]
        ok = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS})
        assert ok.status_code == 200 and len(ok.json()) == len(DOCS)
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_client_that_disconnects_frees_its_queue_slot(base_cfg: dict) -> None:
    scorer = RecordingScorer(delay=2.0)
    app = build_app(ServeConfig(**base_cfg, micro_batching=False, max_queue=1), scorer=scorer)
    with ServerThread(app) as url:
        busy = threading.Thread(target=httpx.post, args=(f"{url}/rerank",),
                                kwargs={"json": {"query": "q0", "texts": ["a"]}, "timeout": 30})
        busy.start()
        assert scorer.started.wait(10)  # the model is busy with the first request
        body = b'{"query": "q1", "texts": ["a", "b"]}'
        sock = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        sock.sendall(b"POST /rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 5
        while _depth(url) < 1:  # queued behind the busy model
            assert time.monotonic() < deadline, "the request never queued"
            time.sleep(0.02)
        sock.close()  # the client goes away
        t = time.monotonic()
        while _depth(url) > 0:
            assert time.monotonic() - t < 1.0, "the queue depth stayed raised after the client left"
            time.sleep(0.02)
        # the slot is free: a new request queues (max_queue=1) instead of getting 503
        assert httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS}, timeout=30).status_code == 200
        busy.join(30)
        metrics = httpx.get(f"{url}/metrics").text
    assert scorer.calls == [1, 4]  # the disconnected request never reached the model
    assert 'dpa_rag_disconnects_total{endpoint="/rerank"} 1' in metrics


def test_shutdown_drains_requests_in_flight(base_cfg: dict) -> None:
    scorer = RecordingScorer(delay=1.0)
    app = build_app(ServeConfig(**base_cfg), scorer=scorer)
    server = ServerThread(app, drain_timeout=10)
    result: dict = {}
    with server as url:
        client = threading.Thread(target=lambda: result.update(
            r=httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS}, timeout=30)))
        client.start()
        assert scorer.started.wait(10)
        server.server.should_exit = True  # what uvicorn does on SIGTERM
        client.join(30)
    assert result["r"].status_code == 200 and len(result["r"].json()) == len(DOCS)


def test_health_is_not_ready_while_models_load(base_cfg: dict) -> None:
    gate = LoadingGate()
    with ServerThread(gate) as url:
        loading = httpx.get(f"{url}/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        _error(httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS}), 503)
        gate.ready(build_app(ServeConfig(**base_cfg)))
        ready = httpx.get(f"{url}/health")
        assert ready.status_code == 200 and ready.json()["status"] == "ok"
