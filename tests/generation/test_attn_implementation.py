"""``attn_implementation`` of the reader (hf backend) and of train-llm: names, LLaMA-Factory's ``--flash_attn``
values, what reaches ``from_pretrained``, and one clear error line for flash_attention_2 without flash-attn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from dpa_rag import models
from dpa_rag.cli.main import app
from dpa_rag.config import load_config
from dpa_rag.generation.base import GeneratorOptions
from dpa_rag.llm.config import TrainLLMConfig
from dpa_rag.sample import sample_path


@pytest.fixture
def no_flash_attn(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))


@pytest.mark.parametrize(
    ("given", "expected"),
    [("auto", "auto"), ("sdpa", "sdpa"), ("eager", "eager"), ("flash_attention_2", "flash_attention_2"),
     ("fa2", "flash_attention_2"), ("FA2", "flash_attention_2"), ("disabled", "eager"), (True, "flash_attention_2"),
     ("False", "auto"), ("no", "auto"), ("off", "eager")],
)
def test_names_and_llama_factory_values(given, expected):
    assert GeneratorOptions(attn_implementation=given).attn_implementation == expected
    assert TrainLLMConfig(data=["x.jsonl"], attn_implementation=given).attn_implementation == expected


def test_unknown_name_is_rejected():
    with pytest.raises(ValidationError, match="attn_implementation"):
        GeneratorOptions(attn_implementation="flash3000")


def test_attn_kwargs(no_flash_attn):
    assert models.attn_kwargs("auto") == {}
    assert models.attn_kwargs("sdpa") == {"attn_implementation": "sdpa"}
    with pytest.raises(models.ModelError, match="needs the flash-attn package"):
        models.attn_kwargs("flash_attention_2")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_reader_loads_with_the_kernel_asked_for(tiny_llm_dir: Path, attn: str):
    from dpa_rag.generation.hf import HFGenerator

    gen = HFGenerator(str(tiny_llm_dir), dtype="float32", device="cpu", attn_implementation=attn)
    assert gen.model.config._attn_implementation == attn
    assert f":attn-{attn}" in gen.model_id
    auto = HFGenerator(str(tiny_llm_dir), dtype="float32", device="cpu")
    assert ":attn-" not in auto.model_id  # auto keeps the cache ids of earlier runs


def test_factory_passes_it_to_hf_only(monkeypatch):
    from dpa_rag.generation import factory, hf, vllm_backend

    seen = {}
    monkeypatch.setattr(hf, "HFGenerator", lambda *a, **kw: seen.setdefault("hf", kw))
    monkeypatch.setattr(vllm_backend, "VLLMGenerator", lambda *a, **kw: seen.setdefault("vllm", kw))
    factory.build_backend(GeneratorOptions(backend="hf", attn_implementation="eager"))
    factory.build_backend(GeneratorOptions(backend="vllm", attn_implementation="eager"))
    assert seen["hf"]["attn_implementation"] == "eager"
    assert "attn_implementation" not in seen["vllm"]


def test_train_llm_passes_it_to_from_pretrained(monkeypatch, tiny_llm_dir: Path):
    import transformers

    from dpa_rag.llm.train import build_model

    class Seen(Exception):
        pass

    def capture(name, **kwargs):
        raise Seen(kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", capture)
    for attn, expected in (("sdpa", "sdpa"), ("auto", None)):
        cfg = TrainLLMConfig(data=["x.jsonl"], model=str(tiny_llm_dir), device="cpu", attn_implementation=attn)
        with pytest.raises(Seen) as seen:
            build_model(cfg, device="cpu")
        assert seen.value.args[0].get("attn_implementation") == expected


def test_authors_flash_attn_flag_on_train_llm(tmp_path):
    from dpa_rag.cli.builder import bare_switches

    cfg = load_config(TrainLLMConfig, None, {"data": ["x.jsonl"], "attn_implementation": "fa2"})
    assert cfg.attn_implementation == "flash_attention_2"
    assert bare_switches(["--flash_attn", "--lr", "1e-4"], {"--flash_attn": "fa2"})[0] == "--flash_attn=fa2"


def _error_lines(output: str) -> list[str]:
    return [ln.strip() for ln in output.splitlines() if ln.strip().startswith("error:")]


@pytest.mark.parametrize("flag", [["--attn-implementation", "flash_attention_2"], ["--flash_attn", "fa2"]])
def test_flash_attention_without_the_package_is_one_error_line(no_flash_attn, tmp_path, tiny_llm_dir, flag):
    out = tmp_path / "answer"
    res = CliRunner().invoke(app, ["-q", "answer", "--questions", str(sample_path("questions.jsonl")), "--model",
                                   str(tiny_llm_dir), "--top-k", "0", "--out-dir", str(out), *flag])
    assert res.exit_code == 2, res.output
    assert len(_error_lines(res.output)) == 1 and "flash-attn" in _error_lines(res.output)[0], res.output
    assert "Traceback" not in res.output
    assert not out.exists()


def test_train_llm_bare_flash_attn_without_the_package(no_flash_attn, tmp_path, tiny_llm_dir):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "q", "input": "", "output": "a"}\n')
    out = tmp_path / "llm"
    res = CliRunner().invoke(app, ["-q", "train-llm", "--data", str(data), "--model", str(tiny_llm_dir),
                                   "--device", "cpu", "--out-dir", str(out), "--flash_attn"])
    assert res.exit_code == 2, res.output
    assert len(_error_lines(res.output)) == 1 and "flash-attn" in _error_lines(res.output)[0], res.output
    assert not out.exists()
