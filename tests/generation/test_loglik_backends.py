"""Answer scoring (``loglik``) on the vllm and openai backends, checked against the hf backend on the same tiny model.

vLLM is not installed here: a stand-in ``vllm`` module computes ``prompt_logprobs`` with the tiny HF model, so the test
checks that the backend sends the right token ids and sums the right positions. The openai backend talks to loopback
servers: one computes vLLM-style ``echo`` + ``logprobs`` answers with the tiny model, scripted ones return hand-made
bodies (a token straddling the boundary, a BOS in the echo, no logprobs, an error saying echo is unsupported).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from dpa_rag.generation import CachedGenerator, GenerationCache, GenerationParams, LoglikUnsupported
from dpa_rag.generation.base import prompt_to_text
from dpa_rag.generation.openai_compat import LOGLIK_CAPABILITY, BackendError, OpenAICompatibleGenerator
from dpa_rag.io import write_jsonl
from dpa_rag.mining.prompts import qa_prompt

CHATS = [
    qa_prompt("who was the first king of france", []),
    qa_prompt("what river runs through paris", ["Title: Paris Content: the river of paris is the seine"]),
    qa_prompt("who wrote the song", ["Title: Song Content: a long passage " + "about the song " * 12]),
]
CONTS = ["the king", "seine", "the beatles"]


@pytest.fixture(scope="module")
def tiny_hf(tiny_llm_dir: Path):  # type: ignore[no-untyped-def]
    from dpa_rag.generation.hf import HFGenerator

    return HFGenerator(str(tiny_llm_dir), dtype="float32", device="cpu", batch_size=2)


def _token_logprobs(model: Any, ids: list[int]) -> tuple[list[float | None], list[dict[int, float]], int]:
    """``log p(ids[i] | ids[:i])`` (``None`` at 0), the top-1 token and its log-prob per position, and the argmax
    next token after the whole sequence."""
    import torch

    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.float(), dim=-1)[0]
    own: list[float | None] = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]
    top = [{int(logp[i - 1].argmax()): float(logp[i - 1].max())} for i in range(1, len(ids))]
    return own, [{}] + top, int(logp[-1].argmax())


# --------------------------------------------------------------------------------------------------------------------
# vllm: a stand-in module backed by the tiny HF model


@pytest.fixture()
def fake_vllm(monkeypatch: pytest.MonkeyPatch, tiny_llm_dir: Path) -> dict[str, Any]:
    """Inject a ``vllm`` module whose ``LLM.generate`` returns prompt logprobs computed by the tiny model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seen: dict[str, Any] = {"calls": [], "drop_prompt_logprobs": False}

    class Logprob:
        def __init__(self, logprob: float, rank: int) -> None:
            self.logprob, self.rank = logprob, rank

    class SamplingParams:
        def __init__(self, **kw: Any) -> None:
            self.kw = kw

    def TokensPrompt(prompt_token_ids: list[int]) -> dict[str, Any]:  # noqa: N802 - vLLM's TypedDict
        return {"prompt_token_ids": prompt_token_ids}

    class LLM:
        def __init__(self, **kw: Any) -> None:
            seen["llm"] = kw
            self.tok = AutoTokenizer.from_pretrained(kw["model"])
            self.model = AutoModelForCausalLM.from_pretrained(kw["model"], dtype=torch.float32).eval()
            self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=512))

        def get_tokenizer(self) -> Any:
            return self.tok

        def generate(self, prompts: list[Any], sp: SamplingParams, use_tqdm: bool = True) -> list[Any]:
            seen["calls"].append((prompts, sp.kw))
            outs = []
            for p in prompts:
                ids = list(p["prompt_token_ids"]) if isinstance(p, dict) else self.tok(p)["input_ids"]
                own, top, nxt = _token_logprobs(self.model, ids)
                plp = None
                if sp.kw.get("prompt_logprobs") is not None and not seen["drop_prompt_logprobs"]:
                    # like vLLM: the top-k first (rank 1), then the prompt's own token if it is not among them
                    plp = [None] + [
                        {**{t: Logprob(v, 1) for t, v in top[i].items()}, ids[i]: Logprob(own[i], 2)}
                        if ids[i] not in top[i] else {ids[i]: Logprob(own[i], 1)}
                        for i in range(1, len(ids))
                    ]
                text = self.tok.decode([nxt])
                outs.append(types.SimpleNamespace(prompt_logprobs=plp, outputs=[types.SimpleNamespace(text=text)]))
            return outs

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.TokensPrompt = LLM, SamplingParams, TokensPrompt  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    return seen


def test_vllm_loglik_equals_hf(fake_vllm: dict[str, Any], tiny_llm_dir: Path, tiny_hf, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from dpa_rag.generation.vllm_backend import VLLMGenerator

    gen = VLLMGenerator(str(tiny_llm_dir), dtype="float32")
    prompts = [*CHATS, "a plain string prompt"]
    conts = [*CONTS, "yes"]
    got = gen.loglik(prompts, conts)
    want = tiny_hf.loglik(prompts, conts)
    for (s, n), (s_hf, n_hf) in zip(got, want, strict=True):
        assert n == n_hf
        assert s == pytest.approx(s_hf, abs=1e-4)
        assert s < 0
    (inputs, kw), = fake_vllm["calls"]
    assert kw == {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1}
    for inp, p, c in zip(inputs, prompts, conts, strict=True):
        ids, cont = tiny_hf.encode_pair(p, c)
        assert inp == {"prompt_token_ids": ids + cont}  # the same token ids the hf backend scores

    # behind the cache: a second call is answered from disk
    cached = CachedGenerator(gen, GenerationCache(tmp_path / "g.sqlite"), batch_size=2, progress=False)
    first = cached.loglik(prompts, conts)
    assert [n for _, n in first] == [n for _, n in got]
    assert [s for s, _ in first] == pytest.approx([s for s, _ in got])
    assert cached.loglik(prompts, conts) == first and cached.hits == len(prompts)
    assert len(fake_vllm["calls"]) == 1 + 2  # two batches of two, then nothing


def test_vllm_loglik_truncates_the_prompt_and_keeps_the_answer(fake_vllm: dict[str, Any], tiny_llm_dir: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from dpa_rag.generation.vllm_backend import VLLMGenerator

    gen = VLLMGenerator(str(tiny_llm_dir), dtype="float32")
    full, cont = gen.encode_pair(CHATS[2], "the beatles")
    assert len(full) + len(cont) + 1 > 12
    gen.llm.llm_engine.model_config.max_model_len = 12
    with caplog.at_level(logging.WARNING, logger="dpa_rag.generation.vllm_backend"):
        ids, cont2 = gen.encode_pair(CHATS[2], "the beatles")
    assert cont2 == cont and len(ids) + len(cont) + 1 == 12 and ids == full[-len(ids) :]
    assert "exceeds the context" in caplog.text
    (s, n), = gen.loglik([CHATS[2]], ["the beatles"])
    assert n == len(cont) and s < 0


def test_vllm_without_prompt_logprobs_is_unsupported(fake_vllm: dict[str, Any], tiny_llm_dir: Path) -> None:
    from dpa_rag.generation.vllm_backend import VLLMGenerator

    gen = VLLMGenerator(str(tiny_llm_dir), dtype="float32")
    fake_vllm["drop_prompt_logprobs"] = True
    with pytest.raises(LoglikUnsupported, match="prompt logprobs"):
        gen.loglik(CHATS[:1], CONTS[:1])
    assert gen.generate(["hello"], GenerationParams(max_new_tokens=1))  # generation is unaffected


# --------------------------------------------------------------------------------------------------------------------
# openai: loopback servers


class _Server:
    """A loopback OpenAI-compatible server; ``answer(path, body) -> (status, json-able body)`` makes each answer."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.bodies.append((self.path, body))
                    status, payload = server.answer(self.path, body)
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setattr(OpenAICompatibleGenerator, "_backoff", lambda self, retry, wait: 0.0)
    servers: list[_Server] = []

    def start(answer: Any) -> _Server:
        servers.append(_Server(answer))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _vllm_like(tiny_llm_dir: Path) -> Any:
    """Answers ``/completions`` like vLLM's server: echo + logprobs from the tiny model, one generated token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()

    def answer(path: str, body: dict[str, Any]) -> tuple[int, Any]:
        if not path.endswith("/completions") or path.endswith("/chat/completions"):
            return 404, {"error": {"message": "not found"}}
        ids = tok(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))["input_ids"]
        own, top, nxt = _token_logprobs(model, ids)
        out_ids = ids + [nxt] if body.get("echo") else [nxt]
        tokens = [tok.decode([i]) for i in out_ids]
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
        logprobs = [*own, top[-1].get(nxt, -0.5)] if body.get("echo") else [-0.5]
        choice = {"index": 0, "text": "".join(tokens), "finish_reason": "length",
                  "logprobs": {"tokens": tokens, "text_offset": offsets, "token_logprobs": logprobs,
                               "top_logprobs": [None] + [{"x": -1.0}] * (len(tokens) - 1)}}
        return 200, {"id": "cmpl-1", "object": "text_completion", "choices": [choice],
                     "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    return answer


def test_openai_loglik_with_tokenizer_equals_hf(serve, tiny_llm_dir: Path, tiny_hf) -> None:  # type: ignore[no-untyped-def]
    server = serve(_vllm_like(tiny_llm_dir))
    gen = OpenAICompatibleGenerator("tiny", base_url=server.url, tokenizer=str(tiny_llm_dir), max_concurrency=2)
    assert gen.model_id.startswith(f"openai:{server.url}:tiny:chat-")
    got = gen.loglik(CHATS, CONTS)
    want = tiny_hf.loglik(CHATS, CONTS)
    tok = tiny_hf.tokenizer
    for (s, n), (s_hf, n_hf), p, c in zip(got, want, CHATS, CONTS, strict=True):
        ids, cont = tiny_hf.encode_pair(p, c)
        # precondition: the server's tokenisation of the whole text splits at the prompt/answer boundary
        assert tok(tiny_hf.render(p) + c, add_special_tokens=False)["input_ids"] == ids + cont
        assert (n, s) == (n_hf, pytest.approx(s_hf, abs=1e-4))
    assert len(server.bodies) == 3 and gen.answered == 3
    texts = {tiny_hf.render(p) + c for p, c in zip(CHATS, CONTS, strict=True)}
    assert {body["prompt"] for _, body in server.bodies} == texts
    for path, body in server.bodies:
        assert path == "/v1/completions"
        assert body == {"model": "tiny", "prompt": body["prompt"], "max_tokens": 1, "temperature": 0.0,
                        "echo": True, "logprobs": 1, "add_special_tokens": False}


def test_openai_loglik_without_tokenizer_scores_plain_text_and_warns_once(  # type: ignore[no-untyped-def]
    serve, tiny_llm_dir: Path, tiny_hf, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve(_vllm_like(tiny_llm_dir))
    gen = OpenAICompatibleGenerator("tiny", base_url=server.url, max_concurrency=1)
    assert gen.model_id == f"openai:{server.url}:tiny"
    conts = [" the king", " seine"]
    with caplog.at_level(logging.WARNING, logger="dpa_rag.generation.openai_compat"):
        got = gen.loglik(CHATS[:2], conts)
    assert caplog.text.count("without the model's chat template") == 1
    want = tiny_hf.loglik([prompt_to_text(p) for p in CHATS[:2]], conts)
    assert [n for _, n in got] == [n for _, n in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-4)
    assert all("add_special_tokens" not in b for _, b in server.bodies)
    assert server.bodies[0][1]["prompt"] == prompt_to_text(CHATS[0]) + " the king"


def _echo(tokens: list[str], logprobs: list[float | None], prompt_tokens: int | None, offsets: list[int] | None = None
          ) -> dict[str, Any]:
    if offsets is None:
        offsets, at = [], 0
        for t in tokens:
            offsets.append(at)
            at += len(t)
    data: dict[str, Any] = {"choices": [{"index": 0, "text": "".join(tokens),
                                         "logprobs": {"tokens": tokens, "text_offset": offsets,
                                                      "token_logprobs": logprobs}}]}
    if prompt_tokens is not None:
        data["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": 1}
    return data


@pytest.mark.parametrize(
    ("body", "want"),
    [
        # "bc" straddles the boundary between the prompt "ab" and the answer "cd": it counts with the answer
        (_echo(["a", "bc", "d", "X"], [None, -1.0, -2.0, -4.0], 3), (-3.0, 2)),
        # no usage: everything but the last token is the echo (max_tokens=1)
        (_echo(["a", "bc", "d", "X"], [None, -1.0, -2.0, -4.0], None), (-3.0, 2)),
        # the echo starts with a BOS the prompt text lacks: the answer is found from the end of the echo
        (_echo(["<s>", "a", "b", "c", "d", "X"], [None, -0.5, -1.0, -2.0, -3.0, -9.0], 5), (-5.0, 2)),
    ],
    ids=["straddle", "no-usage", "bos"],
)
def test_openai_picks_the_answer_tokens(serve, body: dict[str, Any], want: tuple[float, int]) -> None:  # type: ignore[no-untyped-def]
    server = serve(lambda path, b: (200, body))
    gen = OpenAICompatibleGenerator("m", base_url=server.url, max_concurrency=1)
    assert gen.loglik(["ab"], ["cd"]) == [pytest.approx(want)]


def test_openai_loglik_retries_like_generation(serve) -> None:  # type: ignore[no-untyped-def]
    answers = iter([(503, "busy"), (200, "<html>"), (200, _echo(["a", "b", "c", "X"], [None, -1.0, -2.0, -3.0], 3))])
    server = serve(lambda path, b: next(answers))
    gen = OpenAICompatibleGenerator("m", base_url=server.url, max_concurrency=1, max_retries=2)
    assert gen.loglik(["ab"], ["c"]) == [(-2.0, 1)]
    assert gen.requests_sent == 3


@pytest.mark.parametrize(
    "answer",
    [
        (200, {"choices": [{"index": 0, "text": "abcX", "logprobs": None}]}),  # a server that ignores logprobs
        (200, {"choices": [{"index": 0, "text": "X", "logprobs": {"tokens": ["X"], "text_offset": [4],
                                                                   "token_logprobs": [-0.1]}}],
               "usage": {"prompt_tokens": 3}}),  # logprobs of the generated token only (no echo)
        (400, {"error": {"message": "echo is not supported with logprobs for this model"}}),
        (404, {"error": {"message": "This is a chat model and not supported in the v1/completions endpoint."}}),
    ],
    ids=["no-logprobs", "no-echo", "400-echo", "chat-only"],
)
def test_openai_without_prompt_logprobs_is_unsupported(serve, answer) -> None:  # type: ignore[no-untyped-def]
    server = serve(lambda path, b: answer)
    gen = OpenAICompatibleGenerator("m", base_url=server.url, max_concurrency=1, max_retries=3)
    with pytest.raises(LoglikUnsupported) as info:
        gen.loglik(["ab"], ["c"])
    msg = str(info.value)
    assert f"{server.url}/completions" in msg and LOGLIK_CAPABILITY in msg and "\n" not in msg
    assert len(server.bodies) == 1  # not retried


def test_openai_other_4xx_stays_a_backend_error(serve) -> None:  # type: ignore[no-untyped-def]
    server = serve(lambda path, b: (404, {"error": {"message": "The model `m` does not exist."}}))
    gen = OpenAICompatibleGenerator("m", base_url=server.url, max_concurrency=1)
    with pytest.raises(BackendError, match="HTTP 404"):
        gen.loglik(["ab"], ["c"])


def _no_logprobs(path: str, body: dict[str, Any]) -> tuple[int, Any]:
    if path.endswith("/chat/completions"):
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}}]}
    return 200, {"choices": [{"index": 0, "text": "Paris", "logprobs": None}]}


def test_cli_mine_loglik_against_a_server_without_logprobs(serve, run_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from dpa_rag.cli.main import app

    server = serve(_no_logprobs)
    ctxs = [{"id": f"c{j}", "title": f"Doc {j}", "text": t}
            for j, t in enumerate(["paris is the capital of france", "london is a city"])]
    write_jsonl(run_dir / "ret.jsonl", [{"id": "q1", "question": "what is the capital of france",
                                         "answers": ["Paris"], "ctxs": ctxs}])
    args = ["-q", "mine", "--retrieval", str(run_dir / "ret.jsonl"), "--out-dir", str(run_dir / "mine"),
            "--label-rule", "loglik", "--backend", "openai", "--base-url", server.url, "--model", "m",
            "--max-retries", "1", "--max-concurrency", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln.strip() for ln in result.output.replace("\r", "\n").splitlines() if ln.strip().startswith("error:")]
    assert len(lines) == 1, result.output
    assert f"{server.url}/completions" in lines[0] and "echo + logprobs" in lines[0]
