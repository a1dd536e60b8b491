"""``benchmarks/gpu_check.sh --dry-run`` runs every row on the CPU, so the GPU check cannot rot before a GPU is
lent."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path, shared_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"].startswith("dry-run")
    for row in ("rerank", "generation", "train_reranker_accelerate", "lora_sft"):
        assert "error" not in result[row], result[row]
    assert result["train_reranker_accelerate"]["steps"] == 1
    assert len(result["lora_sft"]["losses"]) == 1
    assert "| rerank: ours fp32 pairs/s |" in (tmp_path / "gpu_check.md").read_text()
