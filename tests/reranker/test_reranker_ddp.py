"""Multi-process reranker training: 2 CPU processes (torchrun, gloo) against one process with the same global batch.

The 2-process runs are this file run as a script under ``python -m torch.distributed.run --standalone
--nproc_per_node 2`` (what ``accelerate launch`` runs underneath): each process calls ``reranker.train.run`` for three
configs in turn and reports, per rank, every file it wrote and the weights it logged per step.

The data are 4 records and the global batch is 4 (2 per process x 2 processes; 4 in the single process), so every
step of both runs sees all 4 records: the averaged gradient does not depend on how the sampler splits them.
Dropout is off (a backbone saved with dropout probabilities 0, ``fast_dropout`` false).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dpa_rag.reranker.losses.registry import LOSS_NAMES

HERE = Path(__file__).resolve()
LOSSES = list(LOSS_NAMES)


def _records(n: int = 4) -> list[dict]:
    from toys import authors_train_records  # not at the top: the torchrun workers run this file as a script

    return authors_train_records(n)


def _valid(n: int = 4) -> list[dict]:
    from toys import authors_valid_pairs

    return authors_valid_pairs(n)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    from toys import write_rows

    return write_rows(path, rows)


@pytest.fixture(scope="module")
def nodrop_backbone(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dropout-free copy of the tiny BERT."""
    import shutil

    backbone = tmp_path_factory.mktemp("nodrop") / "tiny-bert-nodrop"
    shutil.copytree(tiny_bert_dir, backbone)
    cfg = json.loads((backbone / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (backbone / "config.json").write_text(json.dumps(cfg))
    return backbone


def _launch_env() -> dict[str, str]:
    """This environment without a launcher's variables, with the tested package first on the path."""
    import dpa_rag

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(key, None)
    src = str(Path(dpa_rag.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="module")
def setup(nodrop_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The data files and the 2-process runs' reports."""
    root = tmp_path_factory.mktemp("ddp")
    backbone = nodrop_backbone
    train = _write_jsonl(root / "train.jsonl", _records(4))
    valid = _write_jsonl(root / "valid.jsonl", _valid())
    common = {"train": str(train), "backbone": str(backbone), "kind": "cross-encoder", "device": "cpu",
              "max_steps": 2, "epochs": 5, "max_length": 48, "lr": 1e-3, "fast_dropout": False,
              "forward_chunk_size": 3, "seed": 7, "save_total_limit": 5}
    runs = {
        "equal": {**common, "weighting": "equal", "valid": str(valid)},
        "mgda-ub": {**common, "weighting": "mgda-ub"},
        "mgda": {**common, "weighting": "mgda"},
    }
    ddp = {name: {**kw, "out_dir": str(root / "ddp" / name), "batch_size": 2} for name, kw in runs.items()}
    single = {name: {**kw, "out_dir": str(root / "single" / name), "batch_size": 4} for name, kw in runs.items()}
    spec = root / "spec.json"
    report = root / "report"
    report.mkdir()
    spec.write_text(json.dumps({"runs": ddp, "report": str(report)}))
    env = _launch_env()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(HERE),
         "--ddp-worker", str(spec)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"2-process run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"ddp": ddp, "single": single, "ranks": ranks, "root": root}


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_train_and_only_rank0_writes(setup: dict[str, Any]) -> None:
    rank0, rank1 = setup["ranks"]
    for name, cfg in setup["ddp"].items():
        out = Path(cfg["out_dir"])
        assert rank0["runs"][name]["world"] == 2 and rank1["runs"][name]["world"] == 2
        assert [s["step"] for s in rank0["runs"][name]["steps"]] == [1, 2]
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["counts"]["steps"] == 2
        log = json.loads((out / "train_log.json").read_text())
        assert log["processes"] == 2 and log["global_step"] == 2
        assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "README.md").is_file()
        assert rank0["returned"][name] == rank1["returned"][name] == str(out)
    # every write of the stage (model/, checkpoints, metrics, card, train_log, config.yaml, manifest) is rank 0's
    assert rank1["writes"] == []
    root = setup["ddp"]["equal"]["out_dir"]
    written = [Path(p).relative_to(root).as_posix() for p in rank0["writes"] if p.startswith(root + os.sep)]
    assert {"model", "model/README.md", "train_log.json", "valid_metrics.json", "test_metrics.json",
            "manifest.json", "config.yaml"} <= set(written)
    assert written.count("model") == 1 and written.count("manifest.json") == 1
    assert any(p.startswith("checkpoints/checkpoint-") for p in written)  # the Trainer's, rank 0 only as well
    # evaluation ran on rank 0 and every process saw its metrics: the same best checkpoint everywhere
    assert rank0["runs"]["equal"]["best"] == rank1["runs"]["equal"]["best"] is not None
    assert rank0["runs"]["equal"]["eval"] == rank1["runs"]["equal"]["eval"] and rank0["runs"]["equal"]["eval"]


@pytest.mark.slow
def test_equal_weighting_matches_one_process_with_the_same_global_batch(setup: dict[str, Any]) -> None:
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import run as train_reranker

    one = train_reranker(TrainRerankerConfig(**setup["single"]["equal"]))
    ddp = Path(setup["ddp"]["equal"]["out_dir"])
    a, b = _weights(ddp / "model"), _weights(one.model)
    assert _max_diff(a, b) < 1e-5
    log_one = json.loads(one.train_log.read_text())
    log_ddp = json.loads((ddp / "train_log.json").read_text())
    assert Path(log_ddp["best_model_checkpoint"]).name == Path(log_one["best_model_checkpoint"]).name
    steps = log_one["steps"]
    assert steps[0]["losses"] != pytest.approx(steps[1]["losses"], abs=1e-4)  # it trained: the check can fail
    # the Trainer's logged loss is the mean over the processes: the global batch's loss
    loss_one = [h["loss"] for h in log_one["log_history"] if "loss" in h]
    loss_ddp = [h["loss"] for h in log_ddp["log_history"] if "loss" in h]
    assert loss_ddp == pytest.approx(loss_one, abs=1e-5)


@pytest.mark.slow
def test_mgda_weights_are_the_same_on_every_process(setup: dict[str, Any]) -> None:
    """The Gram matrix is summed over the processes: identical weights everywhere (not per-rank ones)."""
    rank0, rank1 = setup["ranks"]
    for name in ("mgda", "mgda-ub"):
        w0 = [s["weights"] for s in rank0["runs"][name]["steps"]]
        w1 = [s["weights"] for s in rank1["runs"][name]["steps"]]
        # the same summed matrix, the same solver: equal up to the all-reduce's float summation order (~1e-11)
        assert len(w0) == len(w1) and all(a == pytest.approx(b, abs=1e-8) for a, b in zip(w0, w1, strict=True)), name
        l0 = [s["losses"] for s in rank0["runs"][name]["steps"]]
        l1 = [s["losses"] for s in rank1["runs"][name]["steps"]]
        assert l0[0] != pytest.approx(l1[0], abs=1e-6)  # the processes did see different records
        assert all(sum(w.values()) == pytest.approx(1.0) for w in w0)
    log = json.loads((Path(setup["ddp"]["mgda"]["out_dir"]) / "train_log.json").read_text())
    assert "summed over 2 processes" in log["weighting"]["gram"]


@pytest.mark.slow
def test_mgda_ub_weights_match_one_process_with_the_same_global_batch(setup: dict[str, Any]) -> None:
    """For mgda-ub the summed Gram matrix is the global batch's (up to a constant factor): one process's weights."""
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import run as train_reranker

    one = train_reranker(TrainRerankerConfig(**setup["single"]["mgda-ub"]))
    steps_one = json.loads(one.train_log.read_text())["steps"]
    steps_ddp = setup["ranks"][0]["runs"]["mgda-ub"]["steps"]
    assert steps_ddp[0]["weights"] == pytest.approx(steps_one[0]["weights"], abs=1e-6)
    assert steps_ddp[1]["weights"] == pytest.approx(steps_one[1]["weights"], abs=1e-4)
    assert _max_diff(_weights(Path(setup["ddp"]["mgda-ub"]["out_dir"]) / "model"), _weights(one.model)) < 1e-4


def _documented_command() -> str:
    """The multi-process command of docs/reranker.md (the bash block that starts with ``accelerate launch``)."""
    import re

    docs = (HERE.parents[2] / "docs" / "reranker.md").read_text(encoding="utf-8")
    found = re.search(r"```bash\n(accelerate launch .*?)```", docs, flags=re.S)
    assert found, "docs/reranker.md has no accelerate launch command"
    return found.group(1).replace("\\\n", " ")


@pytest.mark.slow
def test_documented_accelerate_command_starts_two_processes(nodrop_backbone: Path, tmp_path: Path) -> None:
    """The documented ``accelerate launch`` command, with 2 processes, on the CPU: 2 processes train."""
    import shlex

    train = _write_jsonl(tmp_path / "train.jsonl", _records(4))
    valid = _write_jsonl(tmp_path / "valid.jsonl", _valid())
    out = tmp_path / "out"
    fill = {"train.jsonl": str(train), "valid.jsonl": str(valid), "runs/reranker": str(out),
            "BAAI/bge-reranker-large": str(nodrop_backbone)}
    words = shlex.split(_documented_command())
    assert words[:2] == ["accelerate", "launch"] and words[words.index("--num_processes") + 1] == "8"
    words[words.index("--num_processes") + 1] = "2"
    words = [fill.get(w, w) for w in words] + ["--max-steps", "2", "--max-length", "48"]  # the step limit
    script = Path(sys.executable).with_name("accelerate")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += words[1:] if script.exists() else words[2:]
    proc = subprocess.run(launcher, env=_launch_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    log = json.loads((out / "train_log.json").read_text())
    assert log["processes"] == 2 and log["global_step"] == 2
    assert "only this one" not in proc.stderr  # no one-process warning


def test_one_process_of_several_warns_once(tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    """``accelerate launch --cpu --num_processes 2`` starts one process with MASTER_PORT set: one warning line."""
    import logging

    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.processes import single_process_warning
    from dpa_rag.reranker.train import run as train_reranker

    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert single_process_warning() is None  # accelerate launch with one process: nothing to say
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")  # what its one-process launcher sets for --num_processes 2
    train = _write_jsonl(tmp_path / "train.jsonl", _records(2))
    with caplog.at_level(logging.WARNING):
        out = train_reranker(TrainRerankerConfig(train=str(train), backbone=str(tiny_bert_dir), device="cpu",
                                                 out_dir=str(tmp_path / "o"), max_steps=1, max_length=48))
    lines = [r.getMessage() for r in caplog.records if "only this one" in r.getMessage()]
    assert len(lines) == 1 and "--multi_gpu --num_processes N" in lines[0] and "torchrun" in lines[0]
    assert json.loads(out.train_log.read_text())["processes"] == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun and accelerate's multi-process launchers set it
    assert single_process_warning() is None


def test_mgda_under_zero3_fails_up_front(tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import run as train_reranker
    from dpa_rag.reranker.trainer import check_weighting_supported, deepspeed_zero3_enabled
    from dpa_rag.reranker.weighting import build_weighting

    assert not deepspeed_zero3_enabled()
    train = _write_jsonl(tmp_path / "train.jsonl", _records(2))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    assert deepspeed_zero3_enabled()
    with pytest.raises(ValueError, match="mgda-ub.*equal"):
        train_reranker(TrainRerankerConfig(train=str(train), backbone=str(tiny_bert_dir), out_dir=str(tmp_path / "o"),
                                           weighting="mgda", device="cpu", max_steps=1))
    assert not (tmp_path / "o" / "model").exists()
    check_weighting_supported(build_weighting("mgda"), 1)  # one loss: no per-loss gradients, fine
    check_weighting_supported(build_weighting("mgda-ub"), 3)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert not deepspeed_zero3_enabled()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    assert deepspeed_zero3_enabled()


def test_encode_pairs_reads_the_config_through_a_wrapper(tiny_bert_dir: Path) -> None:
    """Chunked forwards read ``model.config``: a data-parallel wrapper has none (the DDP bug of issue 15)."""
    from dpa_rag.data.reranker_records import RerankerTrainRecord
    from dpa_rag.reranker.data import FusedCollator
    from dpa_rag.reranker.model import encode_pairs, load_reranker_model, unwrap_model

    model, tok = load_reranker_model(str(tiny_bert_dir))
    model.eval()
    batch = FusedCollator(tok, LOSSES, 48)([RerankerTrainRecord.model_validate(r) for r in _records(2)])
    wrapped = torch.nn.DataParallel(model)  # no GPUs: runs the module as is, but has no ``config``
    assert unwrap_model(wrapped) is model
    with torch.no_grad():
        ref = encode_pairs(model, batch, chunk_size=3)
        out = encode_pairs(wrapped, batch, chunk_size=3)
    assert torch.allclose(ref.logits, out.logits, atol=1e-6)


# ---- the worker: run as a script by torch.distributed.run ----


def _worker(spec_path: str) -> None:
    import logging

    from transformers import PreTrainedModel

    import dpa_rag.reranker.train as tr
    import dpa_rag.stage as stage
    from dpa_rag.reranker.config import TrainRerankerConfig

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    writes: list[str] = []

    def spy(fn: Any) -> Any:
        def wrapped(path: Any, *a: Any, **k: Any) -> Any:
            writes.append(str(path))
            return fn(path, *a, **k)

        return wrapped

    tr.write_json = spy(tr.write_json)
    tr.write_text = spy(tr.write_text)
    stage.write_json = spy(stage.write_json)
    stage.save_config = lambda cfg, path, _f=stage.save_config: (writes.append(str(path)), _f(cfg, path))[1]
    save_pretrained = PreTrainedModel.save_pretrained

    def save_spy(self: Any, save_directory: Any, *a: Any, **k: Any) -> Any:
        writes.append(str(save_directory))
        return save_pretrained(self, save_directory, *a, **k)

    PreTrainedModel.save_pretrained = save_spy
    runs: dict[str, Any] = {}
    current: dict[str, str] = {}

    class SpyTrainer(tr.RerankerTrainer):
        def train(self, *a: Any, **k: Any) -> Any:
            result = super().train(*a, **k)
            runs[current["name"]] = {
                "steps": self.step_history, "world": self.accelerator.num_processes,
                "best": Path(self.state.best_model_checkpoint).name if self.state.best_model_checkpoint else None,
                "eval": [{k: v for k, v in h.items() if k != "eval_runtime"} for h in self.state.log_history
                         if "eval_f1" in h],
            }
            return result

    tr.RerankerTrainer = SpyTrainer
    returned = {}
    for name, kwargs in spec["runs"].items():
        current["name"] = name
        returned[name] = str(tr.run(TrainRerankerConfig(**kwargs)).out_dir)
    Path(spec["report"], f"rank{rank}.json").write_text(json.dumps({"writes": writes, "runs": runs,
                                                                     "returned": returned}))


if __name__ == "__main__" and "--ddp-worker" in sys.argv:
    _worker(sys.argv[sys.argv.index("--ddp-worker") + 1])
