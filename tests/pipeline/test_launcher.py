"""The pipeline's ``launcher`` section: training steps as ``accelerate launch`` subprocesses, same manifests/resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpa_rag.config import load_config
from dpa_rag.pipeline import PipelineConfig, demo_config
from dpa_rag.pipeline.dpa import build_steps
from dpa_rag.pipeline.launcher import LauncherConfig, launch_command, launched
from dpa_rag.pipeline.runner import Step, run_steps
from dpa_rag.reranker.config import TrainRerankerConfig
from dpa_rag.sample import sample_path
from dpa_rag.stage import stage_recorder


def _demo(tmp_path: Path, launcher: dict | None = None) -> PipelineConfig:
    extra = {"launcher": launcher} if launcher else {}
    return load_config(PipelineConfig, demo_config(), {
        "out_dir": tmp_path / "run", "questions": sample_path("questions.jsonl"),
        "corpus": [sample_path("corpus.jsonl")], **extra,
    })


def test_accelerate_command_line(tmp_path):
    from dpa_rag.llm.recipes import accelerate_config_path

    lc = LauncherConfig(kind="accelerate", config_file="deepspeed_zero3", num_processes=8,
                        extra_args=["--main_process_port", "29501"])
    argv = launch_command(lc, "train-llm", tmp_path / "launch.yaml")
    assert argv == [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(accelerate_config_path("deepspeed_zero3")),
        "--num_processes", "8", "--main_process_port", "29501",
        "-m", "dpa_rag.cli.main", "train-llm", "--config", str(tmp_path / "launch.yaml"),
    ]
    bare = launch_command(LauncherConfig(kind="accelerate", num_processes=2), "train-reranker", Path("x.yaml"))
    assert bare[3:6] == ["--multi_gpu", "--num_processes", "2"]  # no config file: only --multi_gpu starts 2
    one = launch_command(LauncherConfig(kind="accelerate", num_processes=1), "train-reranker", Path("x.yaml"))
    assert "--multi_gpu" not in one
    ds = launch_command(LauncherConfig(kind="deepspeed", num_processes=2), "train-reranker", Path("x.yaml"))
    assert ds == ["deepspeed", "--num_gpus", "2", "--module", "dpa_rag.cli.main", "train-reranker", "--config",
                  "x.yaml"]


def test_launcher_none_leaves_steps_in_process(tmp_path):
    def run(cfg):
        return cfg

    assert launched(LauncherConfig(), "train-reranker", run, lambda c: c.out_dir) is run
    lc = LauncherConfig(kind="accelerate", steps=["train-llm"])
    assert launched(lc, "train-reranker", run, lambda c: c.out_dir) is run  # not in `steps`
    assert launched(lc, "mine", run, lambda c: c.out_dir) is run  # never launched
    plain = {s.name: s.run for s in build_steps(_demo(tmp_path))}
    assert plain["train-reranker"].__name__ == "run" and plain["train-llm-sft"].__name__ == "run"


def test_pipeline_training_steps_run_as_accelerate_subprocesses(tmp_path, monkeypatch):
    cfg = _demo(tmp_path, {"kind": "accelerate", "config_file": "multi_gpu", "num_processes": 2})
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda argv, check=False: calls.append(argv) or
                        subprocess.CompletedProcess(argv, 0))
    steps = {s.name: s for s in build_steps(cfg)}
    folders = {name: cfg.out_dir / name for name in steps}
    for name, command in (("train-reranker", "train-reranker"), ("train-llm-prealign", "train-llm"),
                          ("train-llm-sft", "train-llm")):
        stage_cfg = steps[name].make_config(folders)
        assert steps[name].run(stage_cfg) == cfg.out_dir / name
        argv = calls[-1]
        launch_yaml = cfg.out_dir / name / "launch.yaml"
        assert argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
        assert argv[argv.index("--num_processes") + 1] == "2"
        assert argv[-5:] == ["-m", "dpa_rag.cli.main", command, "--config", str(launch_yaml)]
        # the subprocess gets the very config the pipeline built (same manifest hash)
        reloaded = type(stage_cfg).model_validate(yaml.safe_load(launch_yaml.read_text()))
        assert reloaded == stage_cfg
    assert len(calls) == 3


def test_failed_launch_names_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda argv, check=False: subprocess.CompletedProcess(argv, 3))
    run = launched(LauncherConfig(kind="accelerate"), "train-reranker", lambda c: None, lambda c: c.out_dir)
    with pytest.raises(RuntimeError, match="step 'train-reranker': .* exited with code 3"):
        run(TrainRerankerConfig(out_dir=str(tmp_path / "rr")))


def test_launched_step_keeps_resume_rules(tmp_path, monkeypatch):
    """The subprocess writes the stage manifest; a second run_steps skips the launched step."""
    calls: list[list[str]] = []
    real_run = subprocess.run

    def fake_launch(argv, check=False, **kw):  # stands in for `accelerate launch ... --config launch.yaml`
        if argv[0] == "git":  # the manifest's git SHA
            return real_run(argv, check=check, **kw)
        calls.append(argv)
        cfg = TrainRerankerConfig.model_validate(yaml.safe_load(Path(argv[-1]).read_text()))
        rec = stage_recorder("train-reranker", cfg, cfg.out_dir, [])
        (Path(cfg.out_dir) / "model").mkdir(parents=True, exist_ok=True)
        rec.finish(outputs=["model"])
        return subprocess.CompletedProcess(argv, 0)

    monkeypatch.setattr(subprocess, "run", fake_launch)
    lc = LauncherConfig(kind="accelerate", num_processes=2)
    step = Step(
        name="train-reranker", deps=[],
        make_config=lambda f: TrainRerankerConfig(out_dir=str(f["train-reranker"]), max_steps=1),
        run=launched(lc, "train-reranker", lambda c: pytest.fail("ran in-process"), lambda c: c.out_dir),
    )
    first = run_steps([step], tmp_path)
    second = run_steps([step], tmp_path)
    assert [r.status for r in first] == ["ran"] and [r.status for r in second] == ["skipped"]
    assert len(calls) == 1
