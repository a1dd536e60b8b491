"""``benchmarks/gpu_check.sh --dry-run`` runs every row on the CPU, so the GPU check cannot rot before a GPU is lent;
the row bookkeeping (budgets, timed-out rows, skip lines, the files rewritten after every row) is tested without
one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def _ctx(gpu_check, out: Path, shared: Path | None = None):
    return gpu_check.Ctx(gpu=False, out=out, reranker="minilm", llm="smollm2-135m", shared=shared or out / "none")


def test_rows_are_written_one_by_one_and_skips_say_why(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_HIDE", "trl")
    ctx = _ctx(gpu_check, tmp_path)
    seen_by_second: dict = {}

    def runner(name: str, budget: float) -> dict:
        if name == "bi_encoder":  # the first row is on disk before the second one starts
            seen_by_second.update(json.loads((tmp_path / "gpu_check.json").read_text())["rows"])
            return {"status": "timed out", "budget_s": budget}
        return {"ours fp32 pairs/s": 1.0}

    lines: list[str] = []
    result = {"mode": "test", "device": "cpu", "torch": "x", "cuda": None, "reproduce": "r"}
    gpu_check.run_rows(["cross_encoder", "bi_encoder", "train_reranker_accelerate", "lora_sft"], ctx,
                       {"bi_encoder": 7.0}, result, runner, lines.append)
    assert list(seen_by_second) == ["cross_encoder"] and seen_by_second["cross_encoder"]["status"] == "ok"
    written = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert written["bi_encoder"]["status"] == "timed out" and written["bi_encoder"]["budget_s"] == 7.0
    assert written["train_reranker_accelerate"]["status"] == "skipped"
    assert "dpa-rag not found" in written["train_reranker_accelerate"]["why"]
    assert written["lora_sft"] == {"status": "skipped", "why": written["lora_sft"]["why"]}
    assert "missing module(s) trl; install: pip install -e '.[train,models]'" in written["lora_sft"]["why"]
    assert [ln.split(":")[0] for ln in lines if ln.startswith("skip ")] == ["skip train_reranker_accelerate",
                                                                             "skip lora_sft"]
    assert "| bi_encoder: status | timed out |" in (tmp_path / "gpu_check.md").read_text()
    assert not list(tmp_path.glob(".gpu_check.*"))  # atomic rewrites leave no temporary files


def test_a_row_over_its_budget_is_killed_and_recorded(gpu_check, tmp_path):
    ctx = _ctx(gpu_check, tmp_path)
    row = gpu_check.run_child("generation", ctx, 0.5, ["--out", str(tmp_path), "--dry-run"])
    assert row["status"] == "timed out" and row["budget_s"] == 0.5


def test_script_skips_rows_without_their_data_or_library(tmp_path):
    env = {**ENV, "GPU_CHECK_HIDE": "trl"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--shared-data",
                           str(tmp_path / "no-shared"), "--rows", "train_reranker_accelerate,lora_sft"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    skips = [ln for ln in done.stdout.splitlines() if ln.startswith("skip ")]
    assert len(skips) == 2 and "no-shared/dpa-rag not found" in skips[0] and "missing module(s) trl" in skips[1]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["install"].startswith("pip install -e '.[train,models]'")
    assert {r["status"] for r in result["rows"].values()} == {"skipped"}


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path, shared_data):
    env = {**ENV, "GPU_CHECK_TIMEOUT": "1800", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path),
                           "--shared-data", str(shared_data)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"].startswith("dry-run")
    rows = result["rows"]
    assert list(rows) == ["cross_encoder", "bi_encoder", "generation", "train_reranker_accelerate", "lora_sft"]
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row)
    # like for like: the same checkpoint scored both ways gives the same scores
    assert rows["cross_encoder"]["max |ours - CrossEncoder| fp32"] < 1e-4
    assert rows["bi_encoder"]["max |ours - SentenceTransformer| fp32"] < 1e-4
    assert rows["train_reranker_accelerate"]["steps"] == 1
    assert len(rows["lora_sft"]["losses"]) == 1
    assert "| cross_encoder: ours fp32 pairs/s |" in (tmp_path / "gpu_check.md").read_text()
