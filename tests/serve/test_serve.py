"""``dpa-rag serve``: every endpoint over real HTTP on a loopback port (tiny reranker, fake readers, BM25 sample
index), the formats, ordering, limits and error answers, the API key, micro-batching, and run-folder resolution."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from dpa_rag.config import ConfigError  # noqa: E402
from dpa_rag.prompts import clean_answer  # noqa: E402
from dpa_rag.reranker.rerank import Reranker  # noqa: E402
from dpa_rag.retrieval.index import IndexConfig, build_index, load_index  # noqa: E402
from dpa_rag.sample import sample_path  # noqa: E402
from dpa_rag.serve import ServeConfig, ServerThread, build_app, make_plan  # noqa: E402
from dpa_rag.serve.server import free_port  # noqa: E402
from serve_toys import serving  # noqa: E402

QUERY = "who was the first person to walk on the moon"
DOCS = [
    "Neil Armstrong was the first person to walk on the Moon.",
    "Paris is the capital city of France.",
    "The Nile is a river in Egypt.",
    "Einstein won the Nobel Prize in Physics.",
]


@pytest.fixture(scope="module")
def url(base_cfg: dict) -> Iterator[str]:
    with serving(base_cfg, max_texts=8, max_chars=300, max_body_bytes=4096, max_top_k=10) as u:
        yield u


def _error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
        assert param in err["message"], err
    return err


# --- endpoints and formats -------------------------------------------------------------------------------------


def test_health_and_models(url: str, index_dir: Path):
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["retriever"] == "bm25" and h["source"] == "explicit options"
    assert h["passages"] == len(load_index(index_dir).passages)
    assert set(h["readers"]) == {"dpa-rag", "dpa-rag-base"}
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["dpa-rag", "dpa-rag-base"]


def test_rerank_tei_format_sorted_and_equal_to_in_process(url: str, reranker_dir: Path):
    resp = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True})
    assert resp.status_code == 200, resp.text
    rows = resp.json()
    assert sorted(r["index"] for r in rows) == list(range(len(DOCS)))
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    assert all(r["text"] == DOCS[r["index"]] for r in rows)
    logits = Reranker(str(reranker_dir), device="cpu", dtype="fp32").score(QUERY, DOCS)  # 1-logit head: sigmoid
    for r in rows:
        assert r["score"] == pytest.approx(1 / (1 + math.exp(-logits[r["index"]])), abs=1e-5)
    raw = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    assert {r["index"]: r["score"] for r in raw} == pytest.approx(dict(enumerate(logits)), abs=1e-5)
    assert "text" not in raw[0]


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank"])
def test_rerank_cohere_format(url: str, path: str):
    docs = [DOCS[0], {"text": DOCS[1]}, DOCS[2]]
    body = httpx.post(f"{url}{path}", json={"query": QUERY, "documents": docs, "top_n": 2, "return_documents": True,
                                            "model": "anything", "rank_fields": None}).json()
    assert body["id"] and len(body["results"]) == 2
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    texts = [DOCS[0], DOCS[1], DOCS[2]]
    assert all(r["document"]["text"] == texts[r["index"]] for r in body["results"])
    plain = httpx.post(f"{url}{path}", json={"query": QUERY, "documents": docs}).json()
    # Jina's default (and what Cohere v1 clients accept): the documents come back unless return_documents is false
    assert len(plain["results"]) == 3 and "document" in plain["results"][0]
    assert plain["meta"]["api_version"]["version"] == "1"
    bare = httpx.post(f"{url}{path}", json={"query": QUERY, "documents": docs, "return_documents": False}).json()
    assert "document" not in bare["results"][0]


def test_retrieve_retriever_and_reranker_order(url: str, index_dir: Path):
    retriever = load_index(index_dir).bm25()
    hits = retriever.search([QUERY], 3)[0]
    body = httpx.post(f"{url}/retrieve", json={"query": QUERY, "top_k": 3, "rerank": False}).json()
    assert body["reranker"] is None and body["retriever"] == "bm25"
    assert [p["id"] for p in body["passages"]] == [retriever.passages[i].id for i, _ in hits]
    assert [p["rank"] for p in body["passages"]] == [1, 2, 3]
    assert [p["score"] for p in body["passages"]] == pytest.approx([s for _, s in hits], abs=1e-5)
    rr = httpx.post(f"{url}/retrieve", json={"query": QUERY, "top_k": 4, "candidates": 10}).json()
    assert rr["reranker"] and len(rr["passages"]) == 4
    scores = [p["score"] for p in rr["passages"]]
    assert scores == sorted(scores, reverse=True)
    assert all(1 <= p["retriever_rank"] <= 10 and p["reranker_score"] == p["score"] for p in rr["passages"])


def test_answer_base_and_aligned(url: str):
    base = httpx.post(f"{url}/answer", json={"question": QUERY, "model": "dpa-rag-base", "top_k": 2}).json()
    assert base["reranked"] is False and len(base["passages"]) == 2
    # the fake reader copies the first capitalised phrase of the first passage shown to it
    assert base["answer"] == clean_answer(base["raw_output"]) and base["answer"] != ""
    full = httpx.post(f"{url}/answer", json={"question": QUERY}).json()
    assert full["model"] == "dpa-rag" and full["reranked"] is True and len(full["passages"]) == 3
    closed = httpx.post(f"{url}/answer", json={"question": QUERY, "top_k": 0}).json()
    assert closed["passages"] == [] and closed["answer"] == "unknown"


def test_chat_completions_with_the_openai_client(url: str):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["dpa-rag", "dpa-rag-base"]
    resp = client.chat.completions.create(
        model="dpa-rag-base", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": QUERY}],
        max_tokens=16, temperature=0,
    )
    direct = httpx.post(f"{url}/answer", json={"question": QUERY, "model": "dpa-rag-base"}).json()
    assert resp.choices[0].message.content == direct["answer"]
    assert resp.choices[0].finish_reason == "stop" and resp.model == "dpa-rag-base"
    assert [p["id"] for p in resp.model_extra["dpa_rag"]["passages"]] == [p["id"] for p in direct["passages"]]
    stream = client.chat.completions.create(model="dpa-rag", messages=[{"role": "user", "content": QUERY}],
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == httpx.post(
        f"{url}/answer", json={"question": QUERY}).json()["answer"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUERY}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="dpa-rag", messages=[{"role": "user", "content": QUERY}], n=2)


def test_metrics_prometheus_text(url: str):
    httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS})
    httpx.post(f"{url}/rerank", content=b"{not json", headers={"content-type": "application/json"})
    text = httpx.get(f"{url}/metrics").text
    assert "# TYPE dpa_rag_request_seconds histogram" in text
    assert 'dpa_rag_requests_total{endpoint="/rerank",status="200"}' in text
    assert 'dpa_rag_requests_total{endpoint="/rerank",status="400"}' in text
    assert 'dpa_rag_errors_total{endpoint="/rerank",type="invalid_request_error"}' in text
    assert 'dpa_rag_batch_size_bucket{model="reranker",le="+Inf"}' in text
    assert 'dpa_rag_request_seconds_count{endpoint="/rerank"}' in text
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if line and not line.startswith("#"):
            float(line.rsplit(" ", 1)[1])


def test_page_is_plain_html(url: str):
    resp = httpx.get(f"{url}/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert 'id="retriever"' in resp.text and 'id="reranker"' in resp.text and 'id="readers"' in resp.text
    assert "<script src" not in resp.text  # no framework, nothing fetched from outside


# --- limits and errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/rerank", {"query": QUERY, "texts": "not a list"}, 400, "texts"),
        ("/rerank", {"query": QUERY, "texts": ["ok", 3]}, 400, "texts.1"),
        ("/rerank", {"texts": DOCS}, 400, "query"),
        ("/rerank", {"query": "", "texts": DOCS}, 400, "query"),
        ("/rerank", {"query": QUERY, "texts": DOCS, "documents": DOCS}, 400, None),
        ("/rerank", {"query": QUERY, "texts": []}, 400, "texts"),
        ("/rerank", {"query": QUERY, "texts": ["x"] * 9}, 400, "texts"),
        ("/rerank", {"query": QUERY, "texts": ["x", "y" * 301]}, 400, "texts.1"),
        ("/rerank", {"query": QUERY, "documents": ["x", {"text": "y" * 301}]}, 400, "documents.1.text"),
        ("/rerank", {"query": "q" * 301, "texts": ["x"]}, 400, "query"),
        ("/rerank", {"query": QUERY, "texts": DOCS, "top_n": 0}, 400, "top_n"),
        ("/retrieve", {"query": QUERY, "top_k": 11}, 400, "top_k"),
        ("/retrieve", {"query": QUERY, "candidates": 11}, 400, "candidates"),
        ("/retrieve", {"query": QUERY, "top_k": "three"}, 400, "top_k"),
        ("/answer", {"question": QUERY, "model": "nope"}, 404, "model"),
        ("/answer", {"question": QUERY, "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": "dpa-rag", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "dpa-rag", "messages": [{"role": "user", "content": "q" * 301}]}, 400,
         "messages.0.content"),
        ("/v1/chat/completions", {"model": "dpa-rag", "messages": [{"role": "assistant", "content": "hi"}]}, 400,
         "messages"),
        ("/v1/chat/completions", {"model": "dpa-rag", "messages": [{"role": "wizard", "content": "hi"}]}, 400,
         "messages.0.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ],
)
def test_bad_requests_name_the_field(url: str, path: str, body: dict, status: int, param: str | None):
    err = _error(httpx.post(f"{url}{path}", json=body), status, param)
    assert err["type"] in ("invalid_request_error", "not_found_error")


def test_malformed_json_missing_body_and_size_limit(url: str):
    err = _error(httpx.post(f"{url}/rerank", content=b'{"query": ', headers={"content-type": "application/json"}),
                 400)
    assert err["code"] == "invalid_json" and "malformed JSON" in err["message"]
    _error(httpx.post(f"{url}/retrieve"), 400)
    big = json.dumps({"query": QUERY, "texts": ["word " * 200] * 8})
    assert len(big) > 4096
    err = _error(httpx.post(f"{url}/rerank", content=big, headers={"content-type": "application/json"}), 413)
    assert "4096" in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit still holds
        yield big[:3000].encode()
        yield big[3000:].encode()

    _error(httpx.post(f"{url}/rerank", content=chunks(), headers={"content-type": "application/json"}), 413)
    _error(httpx.get(f"{url}/nowhere"), 404)
    _error(httpx.get(f"{url}/rerank"), 405)


def test_api_key_required_and_compared(base_cfg: dict, monkeypatch: pytest.MonkeyPatch):
    openai = pytest.importorskip("openai")
    monkeypatch.setenv("DPA_TEST_KEY", "s3cret-key")
    with serving(base_cfg, api_key_env="DPA_TEST_KEY") as u:
        body = {"query": QUERY, "texts": DOCS}
        err = _error(httpx.post(f"{u}/rerank", json=body), 401)
        assert err["type"] == "authentication_error"
        _error(httpx.post(f"{u}/rerank", json=body, headers={"Authorization": "Bearer wrong"}), 401)
        _error(httpx.get(f"{u}/metrics"), 401)
        assert httpx.post(f"{u}/rerank", json=body, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert httpx.post(f"{u}/rerank", json=body, headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert httpx.get(f"{u}/health").status_code == 200 and httpx.get(f"{u}/").status_code == 200
        client = openai.OpenAI(base_url=f"{u}/v1", api_key="s3cret-key", max_retries=0)
        assert client.chat.completions.create(model="dpa-rag", messages=[{"role": "user", "content": QUERY}])
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{u}/v1", api_key="nope", max_retries=0).models.list()
    monkeypatch.delenv("DPA_TEST_KEY")
    with pytest.raises(ConfigError, match="DPA_TEST_KEY"):
        build_app(ServeConfig(**base_cfg, api_key_env="DPA_TEST_KEY"))


# --- batching, overload, timeouts -----------------------------------------------------------------------------


class RecordingScorer:
    """Scores ``len(query) + len(text) / 1000``; records every call's size; optional delay per call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[int] = []
        self.lock = threading.Lock()
        self.started = threading.Event()  # set when the first call begins

    def score_pairs(self, pairs):
        self.started.set()
        time.sleep(self.delay)
        with self.lock:
            self.calls.append(len(pairs))
        return [len(q) + len(d) / 1000 for q, d in pairs]

    def score(self, query, docs):
        return self.score_pairs([(query, d) for d in docs])


async def _fire(url: str, n: int, texts: int = 3) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30) as client:
        bodies = [{"query": "q" * (i + 1), "texts": [f"t{j}" * (j + 1) for j in range(texts)], "raw_scores": True}
                  for i in range(n)]
        return await asyncio.gather(*[client.post(f"{url}/rerank", json=b) for b in bodies])


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_share_model_calls(base_cfg: dict, batching: bool):
    scorer = RecordingScorer(delay=0.05)
    with serving(base_cfg, scorer=scorer, micro_batching=batching, batch_window_ms=20, max_batch_pairs=12) as u:
        responses = asyncio.run(_fire(u, 8))
        metrics = httpx.get(f"{u}/metrics").text
    for i, r in enumerate(responses):  # each request gets its own scores back, whatever it was merged with
        assert r.status_code == 200
        assert {x["index"]: x["score"] for x in r.json()} == pytest.approx(
            {j: (i + 1) + len(f"t{j}" * (j + 1)) / 1000 for j in range(3)})
    assert sum(scorer.calls) == 24
    if batching:
        assert len(scorer.calls) < 8 and max(scorer.calls) > 3 and max(scorer.calls) <= 12
    else:
        assert scorer.calls == [3] * 8
    assert "dpa_rag_batch_requests_bucket" in metrics


async def _fire_while_busy(url: str, scorer: RecordingScorer, n: int) -> list[httpx.Response]:
    """One request that occupies the model, then ``n`` more at once while it runs."""
    async with httpx.AsyncClient(timeout=30) as client:
        first = asyncio.ensure_future(client.post(f"{url}/rerank", json={"query": "q0", "texts": ["a", "b"]}))
        for _ in range(500):  # until the model has started on it (the queue is empty again)
            if scorer.started.is_set():
                break
            await asyncio.sleep(0.01)
        assert scorer.started.is_set(), "the first request never reached the model"
        rest = [client.post(f"{url}/rerank", json={"query": f"q{i}", "texts": ["a", "b"]}) for i in range(1, n + 1)]
        return [await first, *await asyncio.gather(*rest)]


def test_full_queue_answers_503_with_retry_after(base_cfg: dict):
    scorer = RecordingScorer(delay=0.5)
    with serving(base_cfg, scorer=scorer, micro_batching=False, max_queue=1) as u:
        responses = asyncio.run(_fire_while_busy(u, scorer, 5))
        metrics = httpx.get(f"{u}/metrics").text
    codes = [r.status_code for r in responses]
    # the running request and the one queued behind it succeed; later ones find the queue full (or, arriving after
    # the model took the queued one, a free slot)
    assert codes[0] == 200 and 200 in codes[1:] and 503 in codes[1:] and set(codes) <= {200, 503}, codes
    for r in responses:
        if r.status_code == 503:
            err = _error(r, 503)
            assert err["type"] == "overloaded_error" and int(r.headers["retry-after"]) >= 1
    assert 'dpa_rag_rejected_total{model="reranker"}' in metrics


def test_request_timeout_is_504(base_cfg: dict):
    with serving(base_cfg, scorer=RecordingScorer(delay=1.0), request_timeout=0.2) as u:
        t = time.perf_counter()
        err = _error(httpx.post(f"{u}/rerank", json={"query": QUERY, "texts": DOCS}), 504)
        assert time.perf_counter() - t < 0.9
    assert err["type"] == "timeout_error"


def test_no_reranker(base_cfg: dict):
    with serving(base_cfg, reranker="none") as u:
        _error(httpx.post(f"{u}/rerank", json={"query": QUERY, "texts": DOCS}), 400, "rerank")
        body = httpx.post(f"{u}/answer", json={"question": QUERY}).json()
        assert body["reranked"] is False and len(body["passages"]) == 3


# --- what gets served ------------------------------------------------------------------------------------------


def _complete(step: Path, config: dict | None = None) -> None:
    step.mkdir(parents=True, exist_ok=True)
    (step / "manifest.json").write_text(json.dumps({"status": "complete"}))
    if config is not None:
        (step / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture()
def run_folder(tmp_path: Path, reranker_dir: Path) -> Path:
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "pipeline.yaml").write_text(yaml.safe_dump({
        "out_dir": "runs/demo", "questions": "data/q.jsonl", "corpus": ["data/c.jsonl"],
        "retriever": "bm25", "top_k": 2, "retrieve_top_k": 7, "reader": {"backend": "fake", "model": "base-lm"},
    }))
    build_index(IndexConfig(corpus=[sample_path("corpus.jsonl")], out_dir=run / "index", kind="bm25",
                            progress=False))
    _complete(run / "index")
    _complete(run / "train-reranker")
    import shutil

    shutil.copytree(reranker_dir, run / "train-reranker" / "model")
    _complete(run / "rerank-eval", {"max_length": 64, "fusion": "saved", "batch_size": None})
    _complete(run / "answer-bm25", {"backend": "fake", "model": "base-lm", "template": "dpa", "chat": False,
                                    "top_k": 2, "out_dir": "x"})
    _complete(run / "answer-full", {"backend": "fake", "model": str(run / "train-llm-sft" / "merged"),
                                    "template": "dpa", "top_k": 2})
    return run


def test_plan_from_a_run_folder(run_folder: Path):
    plan = make_plan(ServeConfig(run=run_folder))
    assert plan.index_dir == run_folder / "index" and plan.retriever == "bm25"
    assert plan.reranker == {"model_path": str(run_folder / "train-reranker" / "model"), "max_length": 64,
                             "fusion": "saved"}
    assert plan.reranker_aligned and plan.top_k == 2 and plan.candidates == 7
    assert plan.base_reader.model == "base-lm" and plan.template == "dpa" and plan.chat is False
    assert plan.aligned_reader is not None and plan.aligned_reader.model.endswith("merged")
    over = make_plan(ServeConfig(run=run_folder, top_k=1, reranker="none", backend="fake", reader="other"))
    assert over.top_k == 1 and over.reranker is None and over.aligned_reader.model == "other"
    app = build_app(ServeConfig(run=run_folder))
    with ServerThread(app) as u:
        h = httpx.get(f"{u}/health").json()
        assert h["reranker_aligned"] and h["readers"]["dpa-rag"]["aligned"] and not h["readers"]["dpa-rag-base"][
            "aligned"]
        assert len(httpx.post(f"{u}/answer", json={"question": QUERY}).json()["passages"]) == 2


@pytest.mark.parametrize(("reader", "reranker"), [(False, True), (True, False), (False, False)])
def test_serve_only_promoted_parts(run_folder: Path, reader: bool, reranker: bool):
    """A component the promotion gate turned down is not served; /health and /v1/models say which and why."""
    decisions = {"reader": {"promoted": reader, "reason": "r-why"}, "reranker": {"promoted": reranker, "reason": "x"}}
    _complete(run_folder / "promote")
    (run_folder / "promote" / "promotion.json").write_text(json.dumps(decisions))
    plan = make_plan(ServeConfig(run=run_folder))
    assert (plan.reranker is not None) is reranker and (plan.aligned_reader is not None) is reader
    assert plan.promotion["reader"] == {"promoted": reader, "reason": "r-why"}
    with ServerThread(build_app(ServeConfig(run=run_folder))) as u:
        h = httpx.get(f"{u}/health").json()
        assert h["promotion"]["reader"]["promoted"] is reader and h["promotion"]["reranker"]["promoted"] is reranker
        assert h["readers"]["dpa-rag"]["aligned"] is reader
        card = httpx.get(f"{u}/v1/models/dpa-rag").json()
        assert card["aligned_reader"] is reader and card["reranker"] is reranker
        assert card["promotion"]["reranker"]["reason"] == "x"
        assert httpx.post(f"{u}/answer", json={"question": QUERY}).json()["reranked"] is reranker


def test_plan_rejects_unfinished_runs(run_folder: Path, tmp_path: Path):
    (run_folder / "index" / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="index step has not finished"):
        make_plan(ServeConfig(run=run_folder))
    with pytest.raises(ConfigError, match="pipeline.yaml"):
        make_plan(ServeConfig(run=tmp_path))
    with pytest.raises(FileNotFoundError):
        make_plan(ServeConfig(run=tmp_path / "missing"))


def test_bundled_defaults_plan(tmp_path: Path):
    plan = make_plan(ServeConfig(cache_dir=tmp_path))
    assert plan.source == "bundled defaults" and plan.reranker == {"model_path": "minilm"}
    assert plan.base_reader.model == "smollm2-135m" and plan.aligned_reader is None
    assert (plan.index_dir / "index.json").exists() and plan.index_dir.is_relative_to(tmp_path)
    with pytest.raises(Exception, match="host|port"):
        ServeConfig(port=70000)


def test_cli_serve_in_a_subprocess(base_cfg: dict, tmp_path: Path):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dpa_rag.cli.main", "serve", "--index", str(base_cfg["index"]), "--reranker",
           base_cfg["reranker"], "--backend", "fake", "--no-use-cache", "--cache-dir", str(tmp_path),
           "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        assert httpx.post(f"http://127.0.0.1:{port}/rerank", json={"query": QUERY, "texts": DOCS}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    bad = subprocess.run([*cmd[:4], "--api-key-env", "DPA_UNSET_VARIABLE_X", "--backend", "fake"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "DPA_UNSET_VARIABLE_X" in bad.stderr


def test_cli_help_documents_every_option():
    from typer.main import get_command
    from typer.testing import CliRunner

    from dpa_rag.cli.main import app

    res = CliRunner().invoke(app, ["serve", "--help"])
    assert res.exit_code == 0 and "Usage" in res.output
    cmd = get_command(app).commands["serve"]  # type: ignore[attr-defined]
    assert all(p.help for p in cmd.params if p.param_type_name == "option" and p.name != "help")


def test_run_folder_with_relative_paths_served_from_elsewhere(run_folder: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """The stage configs hold paths relative to where `dpa-rag run` started (`runs/demo/...`): copied to another
    place and served from a third folder, every path follows the run folder and nothing is written to the cwd."""
    import shutil

    rel = {"backend": "fake", "model": "runs/demo/train-llm-sft/merged", "cache_dir": "runs/demo/cache",
           "template": "dpa", "top_k": 2, "out_dir": "runs/demo/answer-full"}
    (run_folder / "answer-full" / "config.yaml").write_text(yaml.safe_dump(rel))
    (run_folder / "answer-bm25" / "config.yaml").write_text(yaml.safe_dump(
        {**rel, "model": "base-lm", "out_dir": "runs/demo/answer-bm25"}))
    moved = tmp_path / "copies" / "my-run"
    shutil.copytree(run_folder, moved)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    plan = make_plan(ServeConfig(run=moved, reader="other-reader"))
    assert plan.aligned_reader.model == "other-reader" and plan.base_reader.model == "base-lm"
    assert Path(plan.base_reader.cache_dir) == moved / "cache" == Path(plan.aligned_reader.cache_dir)
    plan = make_plan(ServeConfig(run=moved))
    assert Path(plan.aligned_reader.model) == moved / "train-llm-sft" / "merged"
    with ServerThread(build_app(ServeConfig(run=moved))) as u:
        assert httpx.post(f"{u}/answer", json={"question": QUERY}).status_code == 200
        health = httpx.get(f"{u}/health").json()
        assert health["readers"]["dpa-rag"]["model"] == "train-llm-sft/merged" and str(tmp_path) not in str(health)
    assert list(work.iterdir()) == [] and (moved / "cache").is_dir()
