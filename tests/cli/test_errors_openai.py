"""A misbehaving OpenAI-compatible server (loopback only): bad 2xx bodies are retried like 5xx; after the last retry
the CLI prints one ``error:`` line with the endpoint, the status and how many answers are already cached."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpa_rag.cli.main import app
from dpa_rag.generation.base import GenerationParams
from dpa_rag.generation.openai_compat import BackendError, OpenAICompatibleGenerator
from dpa_rag.sample import sample_path

OK = {"choices": [{"message": {"role": "assistant", "content": "Paris"}}]}


class _Server:
    """Answers request ``i`` (0-based) with ``script[i]`` (the last entry repeats): (status, body text)."""

    def __init__(self, script: list[tuple[int, str]]) -> None:
        self.script = script
        self.requests = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with server.lock:
                    i = server.requests
                    server.requests += 1
                status, body = server.script[min(i, len(server.script) - 1)]
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    monkeypatch.setattr(OpenAICompatibleGenerator, "_backoff", lambda self, retry, wait: 0.0)
    servers: list[_Server] = []

    def start(script: list[tuple[int, str]]) -> _Server:
        servers.append(_Server(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.mark.parametrize(
    "bad",
    [(200, "<html>oops</html>"), (200, json.dumps({"choices": []})), (200, json.dumps({"error": "x"})), (503, "busy")],
    ids=["non-json", "no-choices", "wrong-schema", "503"],
)
def test_bad_bodies_are_retried(serve, bad) -> None:
    server = serve([bad, bad, (200, json.dumps(OK))])
    gen = OpenAICompatibleGenerator("m", base_url=server.url, max_retries=2, max_concurrency=1)
    assert gen.generate(["q"], GenerationParams()) == ["Paris"]
    assert server.requests == 3


def test_last_retry_names_endpoint_status_and_answered(serve) -> None:
    server = serve([(200, json.dumps(OK)), (200, "not json")])
    gen = OpenAICompatibleGenerator("m", base_url=server.url, max_retries=1, max_concurrency=1)
    assert gen.generate(["a"], GenerationParams()) == ["Paris"]
    with pytest.raises(BackendError) as info:
        gen.generate(["b"], GenerationParams())
    assert info.value.status == 200 and info.value.answered == 1 and info.value.url.startswith(server.url)
    assert "non-JSON" in str(info.value) and "\n" not in str(info.value)


def _answer_args(url: str, out: Path) -> list[str]:
    return ["-q", "answer", "--questions", str(sample_path("questions.jsonl")), "--limit", "3", "--top-k", "0",
            "--backend", "openai", "--base-url", url, "--model", "m", "--max-retries", "1", "--batch-size", "1",
            "--max-concurrency", "1", "--out-dir", str(out)]


@pytest.mark.parametrize("failure", [(500, "boom"), (200, "<html>"), (200, "{}")], ids=["500", "non-json", "schema"])
def test_cli_after_retries_one_line_and_resume(serve, run_dir: Path, failure, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-do-not-print")
    server = serve([(200, json.dumps(OK)), failure])  # the first question is answered, then the server breaks
    result = CliRunner().invoke(app, _answer_args(server.url, run_dir / "out"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "sk-secret" not in result.output
    lines = [ln.strip() for ln in result.output.replace("\r", "\n").splitlines() if ln.strip().startswith("error:")]
    assert len(lines) == 1, result.output
    line = lines[0]
    assert f"{server.url}/chat/completions" in line and f"HTTP {failure[0]}" in line and "1 prompt(s)" in line
    assert not (run_dir / "out" / "predictions.jsonl").exists()
    assert not (run_dir / "out" / "manifest.json").exists()

    server.script, server.requests = [(200, json.dumps(OK))], 0  # the server recovers: only the 2 missing are sent
    result = CliRunner().invoke(app, _answer_args(server.url, run_dir / "out"))
    assert result.exit_code == 0, result.output
    assert server.requests == 2
    assert (run_dir / "out" / "manifest.json").exists()
