"""``train-reranker`` resumes by itself: SIGKILL between checkpoints, then a plain re-run ends with the same weights
as an uninterrupted run (tiny cross-encoder, CPU, fixed seed)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpa_rag.checkpoints import RESUME_FILE
from dpa_rag.config import save_config
from dpa_rag.reranker.config import TrainRerankerConfig
from dpa_rag.reranker.train import run as train_reranker
from test_jobs import ENV, rerun_resumes, signal_at
from toys import authors_train_records, write_rows

_CHILD = """
import time
from pathlib import Path
from transformers import TrainerCallback
import dpa_rag.reranker.train as train
from dpa_rag.config import load_config
from dpa_rag.reranker.config import TrainRerankerConfig

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            Path({marker!r}).write_text("ready")
            time.sleep(600)

log_to_logging = train._log_to_logging

def slowed(trainer):
    log_to_logging(trainer)
    trainer.add_callback(Slow())

train._log_to_logging = slowed
train.run(load_config(TrainRerankerConfig, {config!r}, {{}}))
"""


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_sigkill_during_train_reranker_then_rerun_equals_uninterrupted(
    run_dir: Path, tiny_bert_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = write_rows(run_dir / "train.jsonl", authors_train_records(8))
    opts = {"train": str(train), "backbone": str(tiny_bert_dir), "kind": "cross-encoder", "max_steps": 6,
            "batch_size": 2, "lr": 1e-3, "max_length": 64, "eval_strategy": "steps", "eval_steps": 2,
            "device": "cpu", "warmup_relevance": False}
    clean = train_reranker(TrainRerankerConfig(out_dir=str(run_dir / "clean"), **opts))
    cfg = TrainRerankerConfig(out_dir=str(run_dir / "killed"), **opts)
    config, marker = save_config(cfg, run_dir / "killed.yaml"), run_dir / "ready"
    code = _CHILD.format(marker=str(marker), config=str(config))
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    signal_at(proc, marker, "step 3", signal.SIGKILL, timeout=300, wait=30)
    assert proc.returncode == -signal.SIGKILL
    resumed = rerun_resumes(run_dir / "killed", 2, lambda: train_reranker(cfg), caplog)
    wa, wb = _weights(clean.model), _weights(resumed.model)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    # finished: its kept checkpoints are not resumed from by a forced re-run
    assert not list((run_dir / "killed" / "checkpoints").glob(f"*/{RESUME_FILE}"))
