"""``dpa-rag run CONFIG --check``: the shipped configs pass; broken wiring fails naming the step and the path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dpa_rag.cli.main import app
from dpa_rag.config import load_config
from dpa_rag.pipeline import PipelineConfig, demo_config
from dpa_rag.pipeline.check import check_pipeline
from dpa_rag.sample import sample_path

REPO = Path(__file__).resolve().parents[2]
PAPER = ["nq", "triviaqa", "hotpotqa", "webqsp"]


def _paper_data(root: Path, name: str) -> None:
    """Empty stand-ins for the data files a paper config names (the check only needs them to exist)."""
    raw = yaml.safe_load((REPO / "configs" / f"paper_{name}.yaml").read_text())
    for rel in [raw["questions"], raw["eval_questions"], *raw["corpus"]]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).touch()


def _check(args: list[str]):
    return CliRunner().invoke(app, ["run", *args, "--check"])


@pytest.mark.parametrize("name", PAPER)
def test_paper_configs_pass_check(name, tmp_path, monkeypatch):
    _paper_data(tmp_path, name)
    monkeypatch.chdir(tmp_path)  # the configs' data paths are relative: "fill in the data paths"
    result = _check([str(REPO / "configs" / f"paper_{name}.yaml")])
    assert result.exit_code == 0, result.output
    assert "steps OK" in result.output
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_paper_config_recipe_and_aligned_reader():
    raw = yaml.safe_load((REPO / "configs" / "paper_nq.yaml").read_text())
    llm = raw["sections"]["train_llm"]
    assert llm["method"] == "full" and llm["adam_beta2"] == 0.95 and llm["gradient_checkpointing"] and llm["bf16"]
    launcher = raw["launcher"]
    assert launcher["kind"] == "accelerate" and launcher["config_file"] == "deepspeed_zero3"
    global_batch = llm["per_device_train_batch_size"] * llm["gradient_accumulation_steps"] * launcher["num_processes"]
    assert global_batch == 128
    assert raw["aligned_reader"]["model"].endswith("train-llm-sft/model")  # full fine-tuning writes model/


def test_cpu_config_passes_check(shared_data, monkeypatch):
    monkeypatch.chdir(REPO)  # nq_lim_cpu.yaml reads ../shared/data relative to the repo root
    result = _check(["configs/nq_lim_cpu.yaml"])
    assert result.exit_code == 0, result.output


def test_demo_config_passes_check(tmp_path):
    cfg = load_config(PipelineConfig, demo_config(), {
        "out_dir": tmp_path / "demo", "questions": sample_path("questions.jsonl"),
        "corpus": [sample_path("corpus.jsonl")],
    })
    report = check_pipeline(cfg)
    assert report.ok, report.problems
    # LoRA (the demo's method) + merge: the aligned reader reads merged/
    assert any(p.endswith("train-llm-sft/merged") for p in report.reads["answer-full"])


def _broken(tmp_path: Path, monkeypatch, **edit) -> Path:
    _paper_data(tmp_path, "nq")
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "configs" / "paper_nq.yaml").read_text())
    for key, value in edit.items():
        raw[key] = value
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_aligned_reader_on_a_folder_never_written_fails(tmp_path, monkeypatch):
    """The seed's bug: full fine-tuning writes model/, the answer steps read merged/."""
    path = _broken(tmp_path, monkeypatch, aligned_reader={
        "backend": "openai", "base_url": "http://localhost:8001/v1", "model": "runs/paper_nq/train-llm-sft/merged"})
    result = _check([str(path)])
    assert result.exit_code == 1
    assert ("step 'answer-aligned-reader': model = runs/paper_nq/train-llm-sft/merged, but step 'train-llm-sft' "
            "writes only checkpoints, data_report.json, loss.png, model, train_info.json, train_log.json, "
            "valid_predictions.jsonl, validation.json, validation.md, validation.png in "
            "runs/paper_nq/train-llm-sft") in result.output


def test_missing_data_file_and_disabled_writer_fail(tmp_path, monkeypatch):
    path = _broken(tmp_path, monkeypatch, questions="data/nq/nowhere.jsonl", aligned_reader={
        "backend": "openai", "base_url": "http://x/v1", "model": "runs/paper_nq/answer-full/predictions.jsonl"},
        train_llm=True)
    result = _check([str(path)])
    assert result.exit_code == 1
    assert "step 'split': questions = data/nq/nowhere.jsonl does not exist" in result.output
    assert "is written by step 'answer-full', which is not upstream of it" in result.output


def test_unknown_section_key_names_the_step(tmp_path):
    cfg = load_config(PipelineConfig, demo_config(), {
        "out_dir": tmp_path / "demo", "questions": sample_path("questions.jsonl"),
        "corpus": [sample_path("corpus.jsonl")], "sections": {"rerank": {"top_kk": 3}},
    })
    report = check_pipeline(cfg)
    assert any(p.startswith("step 'rerank-") and "unknown key 'top_kk'" in p for p in report.problems)


def test_launcher_config_file_must_exist(tmp_path):
    cfg = load_config(PipelineConfig, demo_config(), {
        "out_dir": tmp_path / "demo", "questions": sample_path("questions.jsonl"),
        "corpus": [sample_path("corpus.jsonl")], "launcher": {"kind": "accelerate", "config_file": "nope"},
    })
    report = check_pipeline(cfg)
    assert any("no shipped accelerate config named 'nope'" in p for p in report.problems)


def _demo(tmp_path: Path, **edit) -> PipelineConfig:
    return load_config(PipelineConfig, demo_config(), {
        "out_dir": tmp_path / "demo", "questions": sample_path("questions.jsonl"),
        "corpus": [sample_path("corpus.jsonl")], **edit,
    })


def test_aligned_reader_on_the_reranker_folder_fails(tmp_path):
    """A reader pointed at what train-reranker writes (the folder exists only later: judged by the writing step)."""
    report = check_pipeline(_demo(tmp_path, aligned_reader={"model": str(tmp_path / "demo/train-reranker/model")}))
    assert (f"step 'answer-aligned-reader': model = {tmp_path}/demo/train-reranker/model is written by step "
            "'train-reranker' (an encoder or reranker), but model needs a reader (causal LM)") in report.problems


def test_models_of_the_wrong_kind_on_disk_fail(tmp_path, tiny_bert_dir, tiny_llm_dir):
    report = check_pipeline(_demo(tmp_path, reader={"model": str(tiny_bert_dir)},
                                  sections={"train_reranker": {"backbone": str(tiny_llm_dir)}}))
    assert (f"step 'mine': model = {tiny_bert_dir} is an encoder or reranker (config.json: BertModel), but model "
            "needs a reader (causal LM)") in report.problems
    assert (f"step 'train-reranker': backbone = {tiny_llm_dir} is a reader (causal LM) (config.json: "
            "LlamaForCausalLM), but backbone needs an encoder or reranker") in report.problems
    # the right kinds pass
    ok = check_pipeline(_demo(tmp_path, reader={"model": str(tiny_llm_dir)},
                              sections={"train_reranker": {"backbone": str(tiny_bert_dir)}}))
    assert not [p for p in ok.problems if "needs" in p], ok.problems


def test_folder_kind_reads_adapters_and_sentence_transformers(tmp_path):
    from dpa_rag.models import ENCODER_KIND as ENCODER
    from dpa_rag.models import LLM_KIND as LLM
    from dpa_rag.models import model_kind as folder_kind

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"task_type": "CAUSAL_LM"}')
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "modules.json").write_text("[]")
    (tmp_path / "ce").mkdir()
    (tmp_path / "ce" / "config.json").write_text('{"architectures": ["XLMRobertaForSequenceClassification"]}')
    assert folder_kind(tmp_path / "adapter")[0] == LLM
    assert folder_kind(tmp_path / "st")[0] == ENCODER
    assert folder_kind(tmp_path / "ce") == (ENCODER, "config.json: XLMRobertaForSequenceClassification")
    assert folder_kind(tmp_path) is None


def test_check_cli_fails_on_a_reranker_given_a_reader_folder(tmp_path, tiny_llm_dir):
    raw = yaml.safe_load(Path(demo_config()).read_text())
    raw.update({"out_dir": str(tmp_path / "demo"), "questions": str(sample_path("questions.jsonl")),
                "corpus": [str(sample_path("corpus.jsonl"))]})
    raw.setdefault("sections", {}).setdefault("train_reranker", {})["backbone"] = str(tiny_llm_dir)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = _check([str(path)])
    assert result.exit_code == 1, result.output
    assert "backbone needs an encoder or reranker" in " ".join(result.output.split())


@pytest.mark.parametrize("name", ["nq_loglik_cpu", "nq_pref_cpu"])
def test_nq_configs_pass_check(name, shared_data, monkeypatch):
    """The real-data configs (reranker-only ones included: their report reads the promotion gate's decisions)."""
    monkeypatch.chdir(REPO)  # their data paths are relative to the repo root (../shared/data)
    result = _check([str(REPO / "configs" / f"{name}.yaml")])
    assert result.exit_code == 0, result.output
    assert "steps OK" in result.output
