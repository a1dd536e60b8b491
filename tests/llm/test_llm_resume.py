"""``train-llm`` resumes by itself: SIGKILL between checkpoints or SIGTERM mid-run, then a plain re-run ends with the
same weights and the same held-out validation (``--valid``, its kept weights included) as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_llm_validation import _cfg, _inputs

from dpa_rag.checkpoints import RESUME_FILE, checkpoint_state
from dpa_rag.config import save_config
from dpa_rag.jobs import PREEMPTED_EXIT
from dpa_rag.llm import run
from dpa_rag.llm.train import _inputs as _inputs_of
from test_jobs import ENV, rerun_resumes, signal_at

# the CLI in a child process, slowed down at step `at` (a marker file says it got there)
_CHILD = """
import sys, time
from pathlib import Path
from transformers import TrainerCallback
import dpa_rag.llm.train as train

class Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == {at}:
            Path({marker!r}).write_text("ready")
            time.sleep({sleep})

build = train.build_trainer

def slowed(cfg):
    trainer, report = build(cfg)
    trainer.add_callback(Slow())
    return trainer, report

train.build_trainer = slowed
sys.argv = ["dpa-rag", "train-llm", "--config", {config!r}]
from dpa_rag.cli.main import main
main()
"""


def _child(tmp: Path, cfg, at: int, sleep: float) -> tuple[subprocess.Popen, Path]:
    config = save_config(cfg, tmp / f"{cfg.out_dir.name}.yaml")
    marker = tmp / f"{cfg.out_dir.name}.ready"
    code = _CHILD.format(at=at, marker=str(marker), sleep=sleep, config=str(config))
    proc = subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, marker


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _same_result(a, b) -> None:
    wa, wb = _weights(a.adapter), _weights(b.adapter)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert json.loads(a.validation.read_text()) == json.loads(b.validation.read_text())


def test_sigkill_between_checkpoints_then_rerun_equals_uninterrupted(
    run_dir: Path, tiny_llm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a reader made worse: validation keeps step 0's weights, so the in-memory copy must survive the kill
    data, valid = _inputs(run_dir, wrong=True)
    opts = {"learning_rate": 1e-2, "max_steps": 6, "eval_steps": 2, "save_steps": 2, "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.0}
    clean = run(_cfg(tiny_llm_dir, data, valid, run_dir / "clean", **opts))
    cfg = _cfg(tiny_llm_dir, data, valid, run_dir / "killed", **opts)
    proc, marker = _child(run_dir, cfg, at=3, sleep=600)
    signal_at(proc, marker, "step 3", signal.SIGKILL, timeout=300, wait=30)
    assert proc.returncode == -signal.SIGKILL
    resumed = rerun_resumes(run_dir / "killed", 2, lambda: run(cfg), caplog)
    _same_result(resumed, clean)
    result = json.loads(resumed.validation.read_text())
    assert [r["step"] for r in result["steps"]] == [0, 2, 4, 6] and result["selected_step"] == 0
    assert not (run_dir / "killed" / "checkpoints").exists()  # deleted once the weights are saved


def test_checkpoint_of_another_config_is_never_used(run_dir: Path, tiny_llm_dir: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    data, _ = _inputs(run_dir)
    opts = {"max_steps": 2, "save_steps": 1, "keep_checkpoints": True, "lora_r": 4, "lora_alpha": 8}
    first = _cfg(tiny_llm_dir, data, None, run_dir / "out", learning_rate=1e-2, **opts)
    run(first)
    ckpt = run_dir / "out" / "checkpoints" / "checkpoint-2"
    assert not (ckpt / RESUME_FILE).exists()  # a finished run's kept checkpoints are not resumed from
    # as a run killed after this checkpoint leaves it: complete, marked with its config and inputs
    (ckpt / RESUME_FILE).write_text(json.dumps(checkpoint_state(first, _inputs_of(first)), sort_keys=True))
    with caplog.at_level("INFO", logger="dpa_rag"):
        out = run(_cfg(tiny_llm_dir, data, None, run_dir / "out", learning_rate=5e-3, **opts))
    assert "resuming from" not in caplog.text and "another config or input" in caplog.text
    log = json.loads(out.train_log.read_text())
    assert [e["step"] for e in log if "loss" in e][0] == 1  # trained from step 1, not resumed at 2


def test_sigterm_during_train_llm_saves_a_checkpoint_and_resumes(run_dir: Path, tiny_llm_dir: Path) -> None:
    data, valid = _inputs(run_dir)
    opts = {"learning_rate": 1e-2, "max_steps": 5, "eval_steps": 2, "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.0}  # no save_steps: the only checkpoint is the one SIGTERM asks for
    clean = run(_cfg(tiny_llm_dir, data, valid, run_dir / "clean", **opts))
    cfg = _cfg(tiny_llm_dir, data, valid, run_dir / "stopped", **opts)
    proc, marker = _child(run_dir, cfg, at=2, sleep=3)
    signal_at(proc, marker, "step 2", signal.SIGTERM, timeout=300, wait=300)
    text = proc.stdout.read()  # type: ignore[union-attr]
    assert proc.returncode == PREEMPTED_EXIT, text[-3000:]
    stopped = [line for line in text.splitlines() if line.startswith("stopped:")]
    ckpt = run_dir / "stopped" / "checkpoints" / "checkpoint-3"
    assert len(stopped) == 1 and "SIGTERM" in stopped[0] and f"checkpoint {ckpt} is saved" in stopped[0]
    assert "train-llm --config" in stopped[0] and "to resume" in stopped[0]
    assert (ckpt / RESUME_FILE).exists() and not (run_dir / "stopped" / "adapter").exists()
    _same_result(run(cfg), clean)
