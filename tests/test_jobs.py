"""One writer per folder and preemption (dpa_rag/jobs.py): two `dpa-rag run` on one folder, a stale lock, SIGTERM
during `mine` (exit code, message, resume to the same output as an uninterrupted run)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dpa_rag.jobs import LOCK_FILE, PREEMPTED_EXIT, FolderBusy, folder_lock
from dpa_rag.sample import sample_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def _wait_for(path: Path, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"child exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")  # type: ignore[union-attr]
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"child never reached {what}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def signal_at(proc: subprocess.Popen, marker: Path, what: str, sig: int, timeout: float = 120,
              wait: float = 120) -> None:
    """Wait until the child writes ``marker`` (it reached ``what``), send it ``sig`` and wait for it to end; the child
    never outlives the call."""
    try:
        _wait_for(marker, proc, what, timeout=timeout)
        proc.send_signal(sig)
        proc.wait(wait)
    finally:
        _stop(proc)


def rerun_resumes(out_dir: Path, step: int, rerun: Callable[[], Any], caplog: pytest.LogCaptureFixture) -> Any:
    """After a kill: the stage left ``checkpoint-<step>`` marked resumable and no manifest; ``rerun()`` says it resumes
    from it. Returns what ``rerun`` returned."""
    from dpa_rag.checkpoints import RESUME_FILE

    ckpt = out_dir / "checkpoints" / f"checkpoint-{step}"
    assert (ckpt / RESUME_FILE).exists() and not (out_dir / "manifest.json").exists()
    with caplog.at_level("INFO", logger="dpa_rag"):
        result = rerun()
    assert f"resuming from {ckpt} (step {step}, same config and inputs)" in caplog.text
    return result


# ---------------------------------------------------------------- one writer per folder

_HOLD_RUN = """
import sys, time
from pathlib import Path
import dpa_rag.pipeline as pipeline

def stalls(*args, **kwargs):
    Path({marker!r}).write_text("ready")
    time.sleep(600)

pipeline.run_steps = stalls
sys.argv = ["dpa-rag", "run", {config!r}]
from dpa_rag.cli.main import main
main()
"""


def _pipeline_yaml(tmp_path: Path, out: Path) -> Path:
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(json.dumps({
        "out_dir": str(out), "questions": str(sample_path("questions.jsonl")),
        "corpus": [str(sample_path("corpus.jsonl"))], "reader": {"backend": "fake", "model": "smollm2-135m"},
    }))
    return cfg


def test_second_run_on_one_folder_fails_naming_the_holder(tmp_path: Path) -> None:
    out, marker = tmp_path / "run", tmp_path / "ready"
    config = _pipeline_yaml(tmp_path, out)
    first = subprocess.Popen([sys.executable, "-c", _HOLD_RUN.format(marker=str(marker), config=str(config))],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(marker, first, "its steps")
        second = subprocess.run([sys.executable, "-m", "dpa_rag.cli.main", "run", str(config)], env=ENV,
                                capture_output=True, text=True, timeout=120)
    finally:
        _stop(first)
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 2, second.stderr[-2000:]
    assert len(errors) == 1
    assert f"PID {first.pid} on {socket.gethostname()}" in errors[0]
    assert "another dpa-rag process is writing here" in errors[0] and "started 20" in errors[0]


def test_stale_lock_is_taken_over_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    info = {"pid": dead.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+0000"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(info))
    with caplog.at_level("WARNING", logger="dpa_rag.jobs"), folder_lock(tmp_path):
        held = json.loads((tmp_path / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
    assert f"taking over a stale lock (PID {dead.pid}" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end


def test_live_lock_from_another_host_is_respected_and_nesting_is_allowed(tmp_path: Path) -> None:
    info = {"pid": os.getpid(), "host": "other-node", "started": "2026-01-01T00:00:00+0000"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(info))
    with pytest.raises(FolderBusy, match="on other-node"):
        with folder_lock(tmp_path):
            pass
    (tmp_path / LOCK_FILE).unlink()
    with folder_lock(tmp_path), folder_lock(tmp_path):  # the pipeline's lock, then a stage's: same process
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


# ---------------------------------------------------------------- SIGTERM during mine

_MINE = """
import sys, time
from pathlib import Path
from dpa_rag.generation.fake import FakeGenerator

original = FakeGenerator.generate

def slow(self, prompts, params):
    out = original(self, prompts, params)
    if {marker!r} and self.batches >= 2:
        Path({marker!r}).write_text("ready")
        time.sleep(0.3)
    return out

FakeGenerator.generate = slow
sys.argv = ["dpa-rag", "mine", *{args!r}]
from dpa_rag.cli.main import main
main()
"""


def _mine(args: list[str], marker: str = "") -> subprocess.Popen:
    code = _MINE.format(marker=marker, args=args)
    return subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _mine_args(retrieval: Path, out: Path) -> list[str]:
    return ["--retrieval", str(retrieval), "--out-dir", str(out), "--backend", "fake", "--model", "fake",
            "--ranks", "1", "--chunk-size", "2", "--batch-size", "2", "--no-use-cache", "--no-progress"]


@pytest.fixture()
def mine_input(tmp_path: Path) -> Path:
    from dpa_rag.io import write_jsonl

    rows = [{"id": f"q{i}", "question": f"question {i}?", "answers": [f"answer {i}"],
             "ctxs": [{"id": f"p{i}", "title": "t", "text": f"passage about answer {i}", "score": 1.0}]}
            for i in range(12)]
    path = tmp_path / "retrieval.jsonl"
    write_jsonl(path, rows)
    return path


def test_sigterm_during_mine_stops_saves_and_resumes(tmp_path: Path, mine_input: Path) -> None:
    clean = _mine(_mine_args(mine_input, tmp_path / "clean"))
    assert clean.wait(120) == 0, clean.stdout.read()[-3000:]  # type: ignore[union-attr]
    out, marker = tmp_path / "stopped", tmp_path / "ready"
    proc = _mine(_mine_args(mine_input, out), marker=str(marker))
    signal_at(proc, marker, "its second batch", signal.SIGTERM)
    text = proc.stdout.read()  # type: ignore[union-attr]
    assert proc.returncode == PREEMPTED_EXIT, text[-3000:]
    stopped = [line for line in text.splitlines() if line.startswith("stopped:")]
    assert len(stopped) == 1 and "SIGTERM" in stopped[0]
    assert f"--out-dir {out}" in stopped[0] and "to resume" in stopped[0]
    kept = (out / "preferences.jsonl").read_text().splitlines()
    assert 0 < len(kept) < 12 and not (out / "manifest.json").exists()
    assert not (out / LOCK_FILE).exists()
    again = _mine(_mine_args(mine_input, out))
    assert again.wait(120) == 0, again.stdout.read()[-3000:]  # type: ignore[union-attr]
    assert (out / "preferences.jsonl").read_bytes() == (tmp_path / "clean" / "preferences.jsonl").read_bytes()
