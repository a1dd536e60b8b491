"""``dpa-rag serve`` driven by the real clients it names: cohere's ``ClientV2`` (``/v2/rerank``), langchain-cohere's
``CohereRerank``, the ``openai`` SDK (errors as ``BadRequestError``, ``models.retrieve``, the Responses API, ``usage``
counted with the reader's tokenizer), plus the smaller request-format points (text/plain JSON, non-UTF-8 bodies,
closed-book answers, the v1 response's api_version, /health without paths)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from dpa_rag.models import resolve_llm  # noqa: E402
from serve_toys import serving  # noqa: E402

QUERY = "who was the first person to walk on the moon"
DOCS = [
    "Neil Armstrong was the first person to walk on the Moon.",
    "Paris is the capital city of France.",
    "The Nile is a river in Egypt.",
]


@pytest.fixture(scope="module")
def url(base_cfg: dict) -> Iterator[str]:
    with serving(base_cfg) as u:
        yield u


def test_cohere_client_v2_rerank(url: str):
    cohere = pytest.importorskip("cohere")
    client = cohere.ClientV2(api_key="unused", base_url=url)
    resp = client.rerank(model="dpa-rag", query=QUERY, documents=DOCS, top_n=2)
    assert len(resp.results) == 2
    direct = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS}).json()  # TEI: the same scores
    assert [r.index for r in resp.results] == [r["index"] for r in direct[:2]]
    assert [r.relevance_score for r in resp.results] == pytest.approx([r["score"] for r in direct[:2]])
    assert all(0.0 <= r.relevance_score <= 1.0 for r in resp.results)
    raw = httpx.post(f"{url}/v2/rerank", json={"model": "x", "query": QUERY, "documents": DOCS}).json()
    assert raw["meta"]["api_version"]["version"] == "2" and "document" not in raw["results"][0]  # v2 default
    v1 = cohere.Client(api_key="unused", base_url=url).rerank(model="dpa-rag", query=QUERY, documents=DOCS)
    assert [r.index for r in v1.results] == [r["index"] for r in direct]


def test_langchain_cohere_rerank(url: str):
    cohere = pytest.importorskip("cohere")
    lc = pytest.importorskip("langchain_cohere")
    from langchain_core.documents import Document

    reranker = lc.CohereRerank(client=cohere.ClientV2(api_key="unused", base_url=url), model="dpa-rag", top_n=2)
    out = reranker.compress_documents([Document(page_content=d) for d in DOCS], QUERY)
    direct = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": DOCS}).json()
    assert [d.page_content for d in out] == [DOCS[r["index"]] for r in direct[:2]]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx([r["score"] for r in direct[:2]])


def test_openai_errors_models_responses_and_usage(url: str):
    openai = pytest.importorskip("openai")
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="dpa-rag", messages=[{"role": "user", "content": QUERY}], n=2)
    assert err.value.status_code == 400 and err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="dpa-rag", messages=[{"role": "user", "content": QUERY}],
                                       temperature=5)
    assert client.models.retrieve("dpa-rag-base").id == "dpa-rag-base"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")

    direct = httpx.post(f"{url}/answer", json={"question": QUERY}).json()
    resp = client.responses.create(model="dpa-rag", input=QUERY)
    assert resp.output_text == direct["answer"] and resp.status == "completed"
    assert resp.model_extra["dpa_rag"]["passages"] == direct["passages"]
    listed = client.responses.create(model="dpa-rag", instructions="be brief",
                                     input=[{"role": "user", "content": [{"type": "input_text", "text": QUERY}]}])
    assert listed.output_text == direct["answer"]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="dpa-rag", input=QUERY, stream=True)

    # usage: the reader's own tokenizer (the fake backend serves the bundled SmolLM2's name)
    tok = AutoTokenizer.from_pretrained(resolve_llm("smollm2-135m"))
    chat = client.chat.completions.create(model="dpa-rag", messages=[{"role": "user", "content": QUERY}])
    completion = len(tok(direct["raw_output"], add_special_tokens=False)["input_ids"])
    assert chat.usage.completion_tokens == completion and chat.usage.prompt_tokens > 20
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + completion
    assert resp.usage.output_tokens == completion and resp.usage.input_tokens == chat.usage.prompt_tokens


def test_request_formats_and_closed_book(url: str):
    body = json.dumps({"query": QUERY, "texts": ["a", "b"]})
    plain = httpx.post(f"{url}/rerank", content=body, headers={"content-type": "text/plain"})
    assert plain.status_code == 200 and len(plain.json()) == 2
    bad = httpx.post(f"{url}/rerank", content=b'{"query": "\xff\xfe", "texts": ["a"]}',
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_encoding"
    wrong = httpx.post(f"{url}/rerank", json={"query": QUERY, "texts": "x"})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "invalid_value"
    closed = httpx.post(f"{url}/answer", json={"question": QUERY, "top_k": 0}).json()
    assert closed["reranked"] is False and closed["passages"] == []


def test_health_shows_no_paths(url: str, base_cfg: dict, monkeypatch: pytest.MonkeyPatch):
    text = httpx.get(f"{url}/health").text
    assert str(base_cfg["index"]) not in text and str(Path(base_cfg["reranker"]).parent) not in text
    assert "index" not in httpx.get(f"{url}/health").json()
    monkeypatch.setenv("DPA_TEST_KEY", "k3y")
    with serving(base_cfg, api_key_env="DPA_TEST_KEY") as u:
        assert "index" not in httpx.get(f"{u}/health").json()
        keyed = httpx.get(f"{u}/health", headers={"Authorization": "Bearer k3y"}).json()
        assert keyed["index"] == str(base_cfg["index"]) and keyed["reranker"] == base_cfg["reranker"]
