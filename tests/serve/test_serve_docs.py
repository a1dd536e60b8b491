"""docs/serve.md's examples run: every request marked ``<!-- example: METHOD /path -->`` is sent to a server on the
bundled sample (the demo's corpus and questions) and its answer has the documented fields; the passages the examples
quote are in the bundled corpus and their questions in the bundled question set; the Python example runs."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from dpa_rag.data.loaders import load_corpus, load_questions  # noqa: E402
from dpa_rag.sample import sample_path  # noqa: E402
from serve_toys import serving  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "serve.md"
MARK = re.compile(r"<!-- example: (POST /\S+|python) -->\s*```(\w+)\n(.*?)```\s*(?:```json\n(.*?)```)?", re.S)


def _examples() -> list[tuple[str, str, str, str | None]]:
    return [m.groups() for m in MARK.finditer(DOC.read_text(encoding="utf-8"))]


def _request(kind: str, lang: str, body: str) -> tuple[str, dict]:
    if lang == "bash":  # a curl command: its URL path and -d body
        args = shlex.split(body.replace("\\\n", " "))
        url = next(a for a in args if a.startswith("localhost:8000/"))
        return url.removeprefix("localhost:8000"), json.loads(args[args.index("-d") + 1])
    return kind.split(" ", 1)[1], json.loads(body)


def _fields_match(doc: object, real: object, where: str = "") -> None:
    """Every field the documentation shows is in the real answer, with the same kind of value."""
    if isinstance(doc, dict):
        assert isinstance(real, dict), f"{where}: {real!r}"
        for key, value in doc.items():
            assert key in real, f"{where}.{key} missing from {sorted(real)}"
            _fields_match(value, real[key], f"{where}.{key}")
    elif isinstance(doc, list):
        assert isinstance(real, list) and real, f"{where}: {real!r}"
        _fields_match(doc[0], real[0], f"{where}[0]")
    elif isinstance(doc, bool):
        assert isinstance(real, bool), where
    elif isinstance(doc, (int, float)):
        assert isinstance(real, (int, float)) and not isinstance(real, bool), where
    elif isinstance(doc, str):
        assert isinstance(real, str), where


def _strings(data: object, keys: set[str]) -> Iterator[str]:
    if isinstance(data, dict):
        for k, v in data.items():
            if k in keys and isinstance(v, str):
                yield v
            yield from _strings(v, keys)
    elif isinstance(data, list):
        for v in data:
            if isinstance(v, str) and "texts" in keys:
                yield v
            yield from _strings(v, keys)


@pytest.fixture(scope="module")
def url(base_cfg: dict) -> Iterator[str]:
    with serving(base_cfg, questions=sample_path("questions.jsonl")) as u:
        yield u


def test_every_marked_example_is_found():
    kinds = [k for k, *_ in _examples()]
    assert kinds == ["POST /rerank", "POST /v2/rerank", "POST /v1/rerank", "POST /retrieve", "POST /answer", "python"]


def test_examples_quote_the_bundled_sample():
    corpus = " ".join(p.text for p in load_corpus(sample_path("corpus.jsonl")))
    questions = {q.question for q in load_questions(sample_path("questions.jsonl"))}
    for kind, lang, body, response in _examples():
        if lang == "python":
            assert re.search(r'question = "([^"]+)"', body).group(1) in questions
            continue
        _, request = _request(kind, lang, body)
        assert request.get("query", request.get("question")) in questions, kind
        quoted = [*_strings(request, {"text", "texts", "documents"}), *_strings(json.loads(response), {"text"})]
        assert quoted, kind
        for text in quoted:
            assert text in corpus, f"{kind}: {text!r} is not in the bundled corpus"


@pytest.mark.parametrize("index", range(5))
def test_example_requests_answer_the_documented_fields(url: str, index: int):
    kind, lang, body, response = _examples()[index]
    path, request = _request(kind, lang, body)
    resp = httpx.post(f"{url}{path}", json=request)
    assert resp.status_code == 200, resp.text
    _fields_match(json.loads(response), resp.json(), kind)


def test_python_example_runs(url: str):
    pytest.importorskip("openai")
    kind, _, body, _ = _examples()[5]
    code = body.replace("http://127.0.0.1:8000/v1", f"{url}/v1")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/serve.md", "exec"), {})  # noqa: S102 - the documentation's own example
    lines = out.getvalue().splitlines()
    answer = httpx.post(f"{url}/answer", json={"question": "who was the first person to walk on the moon"}).json()
    assert lines[0] == answer["answer"] and int(lines[1]) > 0 and lines[3] == answer["answer"]
    assert lines[4] == "dpa-rag-base"
