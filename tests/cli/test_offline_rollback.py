"""No network: a missing hub id fails in seconds with one ``error:`` line; a failed stage leaves its output folder as
it found it (``index`` and ``answer``), resume state excepted. "No network" is simulated by monkeypatching, never by
connecting to anything outside this machine."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpa_rag import models, stage
from dpa_rag.cli.main import app
from dpa_rag.sample import sample_path

QUESTIONS = sample_path("questions.jsonl")
CORPUS = sample_path("corpus.jsonl")


def invoke(args: list) -> object:
    return CliRunner().invoke(app, ["-q", *map(str, args)])


def assert_clean_failure(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [ln.strip() for ln in result.output.replace("\r", "\n").splitlines() if ln.strip().startswith("error:")]
    assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[0], lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def online(monkeypatch):
    """As if HF_HUB_OFFLINE were not set (the test suite sets it), restored afterwards."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    probe = models.hub_reachable
    probe.cache_clear()
    yield constants
    probe.cache_clear()


class _Conn:
    def close(self) -> None:
        pass


def test_hub_probe_uses_the_configured_endpoint_or_proxy(online, monkeypatch):
    import socket

    calls = []

    def connect(address, timeout):
        calls.append((address, timeout))
        return _Conn()

    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(online, "ENDPOINT", "https://hub.internal:8443")
    monkeypatch.setenv(models.HUB_TIMEOUT_ENV, "1.5")
    assert models.hub_reachable() is True
    assert models.hub_reachable() is True  # checked once
    assert calls == [(("hub.internal", 8443), 1.5)]

    models.hub_reachable.cache_clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert models.hub_reachable() is True
    assert calls[-1][0] == ("proxy.internal", 3128)


def test_hub_probe_failure_and_opt_out(online, monkeypatch):
    import socket

    def refuse(address, timeout):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert models.hub_reachable() is False
    models.hub_reachable.cache_clear()
    monkeypatch.setenv(models.HUB_TIMEOUT_ENV, "0")
    assert models.hub_reachable() is True


def test_missing_hub_id_without_network_fails_fast(online, monkeypatch, tmp_path):
    import os

    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    out = tmp_path / "new" / "index"
    t = time.perf_counter()
    result = invoke(["index", "--corpus", CORPUS, "--kind", "dense", "--encoder", "nosuch-org/nosuch-model",
                     "--out-dir", out])
    assert time.perf_counter() - t < 10
    assert_clean_failure(result, "nosuch-org/nosuch-model", "not reachable")
    assert not (tmp_path / "new").exists()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and online.HF_HUB_OFFLINE  # cached models now load without retries


def test_index_model_failure_leaves_a_finished_index_as_it_was(tmp_path, monkeypatch):
    from dpa_rag.models import ModelError
    from dpa_rag.retrieval import dense

    out = tmp_path / "index"
    assert invoke(["index", "--corpus", CORPUS, "--kind", "bm25", "--out-dir", out]).exit_code == 0
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    assert "manifest.json" in before and "config.yaml" in before

    def fail(*args, **kwargs):
        raise ModelError("--encoder 'x': cannot load")

    monkeypatch.setattr(dense.DenseRetriever, "build", fail)
    assert_clean_failure(invoke(["index", "--corpus", CORPUS, "--kind", "both", "--out-dir", out]), "cannot load")
    assert _tree(out) == before


def test_index_failing_while_writing_removes_only_what_it_wrote(tmp_path, monkeypatch):
    from dpa_rag.retrieval import bm25

    def fail(self, directory):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "half.json").write_text("{")
        raise ValueError("disk trouble")

    monkeypatch.setattr(bm25.BM25Retriever, "save", fail)
    fresh = tmp_path / "a" / "b" / "index"
    assert_clean_failure(invoke(["index", "--corpus", CORPUS, "--kind", "bm25", "--out-dir", fresh]), "disk trouble")
    assert not (tmp_path / "a").exists()

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert_clean_failure(invoke(["index", "--corpus", CORPUS, "--kind", "bm25", "--out-dir", kept]), "disk trouble")
    assert _tree(kept) == {"notes.txt": b"mine"}
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_answer_failing_after_its_first_write_is_undone(tmp_path, monkeypatch):
    from dpa_rag.rag import answer

    monkeypatch.setenv("DPA_RAG_CACHE", str(tmp_path / "cache"))

    def fail(predictions):
        raise ValueError("metrics broke")

    monkeypatch.setattr(answer, "evaluate_predictions", fail)
    args = ["answer", "--questions", QUESTIONS, "--backend", "fake", "--top-k", "0"]
    fresh = tmp_path / "runs" / "answer"
    assert_clean_failure(invoke([*args, "--out-dir", fresh]), "metrics broke")
    assert not (tmp_path / "runs").exists()

    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert_clean_failure(invoke([*args, "--out-dir", kept]), "metrics broke")
    assert _tree(kept) == {"notes.txt": b"mine"}


def _finished_stage(tmp_path, **files: str):
    """A toy stage config and a folder a finished run of it left (``files`` plus a complete manifest)."""
    from dpa_rag.config import StageConfig

    class Cfg(StageConfig):
        x: int = 1

    out = tmp_path / "stage"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    (out / "manifest.json").write_text('{"status": "complete"}')
    return Cfg(), out


def test_discard_keeps_resume_state_and_restores_the_manifest(tmp_path):
    cfg, out = _finished_stage(tmp_path, **{"old.jsonl": "old\n", "config.yaml": "x: 0\n"})
    rec = stage.stage_recorder("toy", cfg, out, [])
    rec.start()  # drops the manifest, writes the new config
    assert not (out / "manifest.json").exists()
    (out / "new.jsonl").write_text("new\n")
    (out / "sub").mkdir()
    (out / "sub" / "deep.bin").write_bytes(b"x")
    (out / "work.partial.jsonl").write_text("{}\n")
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "step-1" / "w.bin").write_bytes(b"w")
    assert stage.discard_unfinished(since=rec._seq - 1) == [out]
    assert sorted(_tree(out)) == ["checkpoints/step-1/w.bin", "config.yaml", "manifest.json", "old.jsonl",
                                  "work.partial.jsonl"]
    assert (out / "config.yaml").read_text() == "x: 0\n"
    assert (out / "manifest.json").read_text() == '{"status": "complete"}'
    assert stage.discard_unfinished(since=rec._seq - 1) == []  # once


def test_discard_keeps_the_manifest_away_when_an_old_output_changed(tmp_path):
    cfg, out = _finished_stage(tmp_path, **{"out.jsonl": "old\n"})
    mark = stage.recorder_mark()
    rec = stage.stage_recorder("toy", cfg, out, [])
    rec.start()
    (out / "out.jsonl").write_text("new, longer\n")
    stage.discard_unfinished(since=mark)
    assert not (out / "manifest.json").exists()  # the old manifest would vouch for an output it did not record
    assert (out / "out.jsonl").exists()  # never removes a file that was there before


def test_finished_stage_is_not_discarded(tmp_path):
    from dpa_rag.config import StageConfig

    class Cfg(StageConfig):
        x: int = 1

    mark = stage.recorder_mark()
    rec = stage.stage_recorder("toy", Cfg(), tmp_path / "done", [])
    (tmp_path / "done" / "out.txt").write_text("x")
    rec.finish(outputs=["out.txt"])
    assert stage.discard_unfinished(since=mark) == []
    assert (tmp_path / "done" / "out.txt").exists()
