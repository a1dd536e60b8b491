"""More of issue 13: outputs made through mkstemp/mkdtemp get the umask's modes (BM25 and dense indexes, merged
models); ``dedupe_ids`` is a config field that lands in config.yaml; a failed launched step is one ``error:`` line."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dpa_rag.cli.main import app
from dpa_rag.config import load_config
from dpa_rag.data.schema import Passage
from dpa_rag.pipeline import PipelineConfig, demo_config
from dpa_rag.pipeline.runner import Step
from dpa_rag.sample import sample_path

PASSAGES = [
    Passage(id="p1", title="Paris", text="paris is the capital city of france"),
    Passage(id="p2", title="Nile", text="the nile is a river in egypt"),
    Passage(id="p3", title="Moon", text="the moon and the sun"),
]


@pytest.fixture()
def umask():  # type: ignore[no-untyped-def]
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.stat().st_mode)
    return out


def _assert_modes(root: Path, mask: int) -> None:
    modes = _modes(root)
    assert len(modes) > 1
    for name, mode in modes.items():
        want = (0o777 if (root / name).is_dir() else 0o666) & ~mask
        assert mode == want, f"{root / name}: {oct(mode)}, want {oct(want)} under umask {oct(mask)}"


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_bm25_index_modes_follow_umask(tmp_path: Path, umask, mask: int) -> None:  # type: ignore[no-untyped-def]
    from dpa_rag.retrieval.bm25 import BM25Retriever

    umask(mask)
    out = BM25Retriever.build(PASSAGES, show_progress=False).save(tmp_path / "idx" / "bm25")
    _assert_modes(out, mask)


def test_dense_index_modes_follow_umask(tmp_path: Path, umask) -> None:  # type: ignore[no-untyped-def]
    import faiss
    import numpy as np

    from dpa_rag.retrieval.dense import DenseRetriever

    umask(0o022)
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(3, 4, dtype="float32"))
    out = DenseRetriever(index, PASSAGES, {"encoder": "none", "dim": 4}).save(tmp_path / "dense")
    assert {n for n in _modes(out)} >= {"index.faiss", "meta.json"}
    _assert_modes(out, 0o022)


def test_merged_model_modes_follow_umask(tmp_path: Path, tiny_llm_dir: Path, umask) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dpa_rag.llm.merge import merge_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    umask(0o022)
    out = merge_adapter(tmp_path / "adapter", tmp_path / "run" / "merged", base_model=str(tiny_llm_dir))
    _assert_modes(out, 0o022)


# ---------------------------------------------------------------- dedupe_ids as a config field


def _dup_questions(folder: Path) -> Path:
    path = folder / "dups.jsonl"
    path.write_text(
        '{"id": "a", "question": "who wrote hamlet", "answers": ["Shakespeare"]}\n'
        '{"id": "a", "question": "where is paris", "answers": ["France"]}\n',
        encoding="utf-8",
    )
    return path


def _augment_args(questions: Path, out: Path) -> list[str]:
    return ["-q", "augment", "--input", str(questions), "--backend", "fake", "--strategies", "rephrasing",
            "--out-dir", str(out), "--no-progress"]


def test_dedupe_ids_flag_lands_in_config_yaml(run_dir: Path) -> None:
    questions = _dup_questions(run_dir)
    res = CliRunner().invoke(app, [*_augment_args(questions, run_dir / "aug"), "--dedupe-ids"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((run_dir / "aug" / "config.yaml").read_text())["dedupe_ids"] is True
    ids = [json.loads(ln)["id"] for ln in (run_dir / "aug" / "augmented.jsonl").read_text().splitlines()]
    assert ids == ["a", "a-2"]
    # the finished folder's config.yaml replays the run, dedupe included
    res = CliRunner().invoke(app, ["-q", "augment", "--config", str(run_dir / "aug" / "config.yaml"),
                                   "--out-dir", str(run_dir / "again")])
    assert res.exit_code == 0, res.output
    assert (run_dir / "again" / "augmented.jsonl").read_bytes() == (run_dir / "aug" / "augmented.jsonl").read_bytes()


def test_dedupe_ids_off_by_default_and_no_flag_wins(run_dir: Path) -> None:
    questions = _dup_questions(run_dir)
    res = CliRunner().invoke(app, _augment_args(questions, run_dir / "aug"))
    assert res.exit_code == 2 and "--dedupe-ids" in res.output
    cfg = run_dir / "c.yaml"
    cfg.write_text("dedupe_ids: true\n")
    res = CliRunner().invoke(app, [*_augment_args(questions, run_dir / "aug"), "--config", str(cfg),
                                   "--no-dedupe-ids"])
    assert res.exit_code == 2 and "--dedupe-ids" in res.output


def test_dedupe_ids_is_result_neutral(run_dir: Path) -> None:
    """A finished run stays up to date when dedupe_ids is switched on (without it, repeats are an error, so it
    cannot change the result of any run that finished)."""
    from dpa_rag.augment.augment import AugmentConfig
    from dpa_rag.stage import manifest_matches

    out = run_dir / "aug"
    res = CliRunner().invoke(app, _augment_args(sample_path("questions.jsonl"), out) + ["--limit", "2"])
    assert res.exit_code == 0, res.output
    cfg = load_config(AugmentConfig, out / "config.yaml")
    assert cfg.dedupe_ids is False and manifest_matches(out, cfg)
    assert manifest_matches(out, cfg.model_copy(update={"dedupe_ids": True}))


@pytest.mark.parametrize("command", ["retrieve", "augment", "answer", "build-llm-data"])
def test_stages_with_the_field_get_a_switch(command: str) -> None:
    res = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert "--dedupe-ids" in res.output and "--no-dedupe-ids" in res.output


@pytest.mark.parametrize("command", ["mine", "rerank", "train-reranker"])
def test_stages_without_the_field_keep_the_flag(command: str) -> None:
    res = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert "--dedupe-ids" in res.output


def _demo(tmp_path: Path, **extra) -> PipelineConfig:  # type: ignore[no-untyped-def]
    return load_config(PipelineConfig, demo_config(), {
        "out_dir": tmp_path / "run", "questions": sample_path("questions.jsonl"),
        "corpus": [sample_path("corpus.jsonl")], **extra,
    })


def test_pipeline_dedupe_ids_reaches_the_stage_configs(tmp_path: Path) -> None:
    from dpa_rag.pipeline.dpa import build_steps

    steps = build_steps(_demo(tmp_path, dedupe_ids=True))
    folders = {s.name: tmp_path / s.name for s in steps}
    cfgs = {s.name: s.make_config(folders) for s in steps if s.enabled}
    with_field = {n for n, c in cfgs.items() if "dedupe_ids" in type(c).model_fields}
    assert {"split", "retrieve-train", "retrieve-eval", "augment", "llm-data", "answer-bm25"} <= with_field
    assert all(cfgs[n].dedupe_ids is True for n in with_field)
    plain = {s.name: s.make_config(folders) for s in build_steps(_demo(tmp_path)) if s.enabled}
    assert all(plain[n].dedupe_ids is False for n in with_field)


def test_run_dedupe_flag_sets_the_pipeline_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dpa_rag.pipeline as pipeline_mod
    from dpa_rag.data.loaders import _dedupe_enabled

    seen = {}

    def fake_run_pipeline(cfg, **kw):  # type: ignore[no-untyped-def]
        seen.update(field=cfg.dedupe_ids, context=_dedupe_enabled(None))
        return cfg.out_dir

    monkeypatch.setattr(pipeline_mod, "run_pipeline", fake_run_pipeline)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "run"), "questions": str(sample_path("questions.jsonl")),
                                   "corpus": [str(sample_path("corpus.jsonl"))]}))
    res = CliRunner().invoke(app, ["-q", "run", str(cfg), "--dedupe-ids"])
    assert res.exit_code == 0, res.output
    assert seen == {"field": True, "context": True}
    cfg.write_text(cfg.read_text() + "dedupe_ids: true\n")
    res = CliRunner().invoke(app, ["-q", "run", str(cfg)])
    assert res.exit_code == 0, res.output
    assert seen == {"field": True, "context": True}


# ---------------------------------------------------------------- a failing launched step in `dpa-rag run`


def _launched_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, subprocess_run) -> Path:  # type: ignore[no-untyped-def]
    """`dpa-rag run` whose only step is a launched train-reranker (the real run_pipeline, runner and launcher)."""
    import dpa_rag.pipeline.dpa as dpa_mod
    from dpa_rag.pipeline.launcher import launched
    from dpa_rag.reranker.config import TrainRerankerConfig

    def one_step(cfg):  # type: ignore[no-untyped-def]
        return [Step(
            name="train-reranker", deps=[],
            make_config=lambda f: TrainRerankerConfig(out_dir=str(f["train-reranker"]), max_steps=1),
            run=launched(cfg.launcher, "train-reranker", lambda c: pytest.fail("ran in-process"),
                         lambda c: c.out_dir),
        )]

    monkeypatch.setattr(dpa_mod, "build_steps", one_step)
    monkeypatch.setattr(subprocess, "run", subprocess_run)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({
        "out_dir": str(tmp_path / "run"), "questions": str(sample_path("questions.jsonl")),
        "corpus": [str(sample_path("corpus.jsonl"))], "launcher": {"kind": kind},
    }))
    return path


def _one_error_line(res) -> str:  # type: ignore[no-untyped-def]
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]


def test_failed_launched_step_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def exits_1(argv, check=False, **kw):  # type: ignore[no-untyped-def]
        calls.append(kw)
        return subprocess.CompletedProcess(argv, 1)

    cfg = _launched_pipeline(tmp_path, monkeypatch, "accelerate", exits_1)
    line = _one_error_line(CliRunner().invoke(app, ["-q", "run", str(cfg)]))
    assert "step 'train-reranker'" in line and "exited with code 1" in line and "launch.yaml" in line
    assert not (tmp_path / "run" / "train-reranker" / "manifest.json").exists()
    assert calls == [{}]  # no --dedupe-ids: the environment is inherited as is
    # with --dedupe-ids the launched process is told through the environment
    CliRunner().invoke(app, ["-q", "run", str(cfg), "--dedupe-ids"])
    assert calls[-1]["env"]["DPA_RAG_DEDUPE_IDS"] == "1"


def test_missing_launcher_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(argv, check=False, **kw):  # type: ignore[no-untyped-def]
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    cfg = _launched_pipeline(tmp_path, monkeypatch, "deepspeed", not_installed)
    line = _one_error_line(CliRunner().invoke(app, ["-q", "run", str(cfg)]))
    assert "launcher `deepspeed` not found" in line and "launcher.kind: none" in line


def test_stage_folder_output_private_files_get_umask_modes(tmp_path: Path, umask) -> None:  # type: ignore[no-untyped-def]
    """A folder output (a saved model) whose files a library wrote 0600 is fixed at finish; other modes are kept."""
    from dpa_rag.config import StageConfig
    from dpa_rag.stage import stage_recorder

    class Cfg(StageConfig):
        out_dir: Path

    umask(0o022)
    out = tmp_path / "stage"
    rec = stage_recorder("x", Cfg(out_dir=out), out, [])
    (out / "model" / "sub").mkdir(parents=True)
    (out / "model" / "sub").chmod(0o700)
    weights = out / "model" / "sub" / "weights.bin"
    weights.write_bytes(b"0")
    weights.chmod(0o600)
    script = out / "model" / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o750)
    rec.finish(outputs=["model"])
    assert stat.S_IMODE(weights.stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "model" / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE(script.stat().st_mode) == 0o750


def test_usage_errors_raised_in_a_command_body_stay_usage_errors():
    """typer bundles its own click: its BadParameter is still a usage error (exit 2 with typer's message)."""
    import typer

    from dpa_rag.cli.errors import error_boundary

    with pytest.raises(typer.BadParameter):
        with error_boundary("x"):
            raise typer.BadParameter("bad value")
