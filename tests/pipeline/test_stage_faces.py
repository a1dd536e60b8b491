"""Every stage module has the same face (``Config``, ``run(cfg) -> Outputs``, ``Outputs``), the pipeline wires stages
through it (no literal output file names in ``pipeline/``), and the shared option groups have one spelling."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest

from dpa_rag.config import ConfigError, StageConfig, load_config
from dpa_rag.stage import StageOutputs

STAGES = [
    "dpa_rag.pipeline.split",
    "dpa_rag.retrieval.index",
    "dpa_rag.retrieval.retrieve",
    "dpa_rag.pipeline.import_retrieval",
    "dpa_rag.mining.mine",
    "dpa_rag.augment.augment",
    "dpa_rag.augment.filter",
    "dpa_rag.mining.reranker_data",
    "dpa_rag.reranker.train",
    "dpa_rag.reranker.rerank",
    "dpa_rag.mining.llm_data",
    "dpa_rag.llm.train",
    "dpa_rag.pipeline.promote",
    "dpa_rag.rag.answer",
    "dpa_rag.pipeline.report",
    "dpa_rag.eval.evaluate",
]
PIPELINE = Path(__file__).resolve().parents[2] / "src" / "dpa_rag" / "pipeline"


@pytest.mark.parametrize("name", STAGES)
def test_stage_module_face(name: str, tmp_path: Path) -> None:
    mod = importlib.import_module(name)
    assert issubclass(mod.Config, StageConfig)
    assert issubclass(mod.Outputs, StageOutputs) and dataclasses.is_dataclass(mod.Outputs)
    fields = {f.name for f in dataclasses.fields(mod.Outputs)}
    assert fields == {"out_dir", *mod.Outputs.FILES}, "every named file is a path field, and nothing else"
    hints = typing.get_type_hints(mod.run)
    assert hints["cfg"] is mod.Config and hints["return"] is mod.Outputs
    out = mod.Outputs.at(tmp_path)
    assert out.out_dir == tmp_path and out.files() == {k: tmp_path / v for k, v in mod.Outputs.FILES.items()}
    assert Path(out.main) == tmp_path / next(iter(mod.Outputs.FILES.values()))  # os.fspath: the main output
    for const in re.findall(r"\b[A-Z][A-Z_]+\b", " ".join(mod.__all__)):  # file-name constants are exported
        assert hasattr(mod, const), f"{name}.__all__ names a missing {const}"


def test_steps_run_the_stage_modules(tmp_path: Path) -> None:
    """Each step of a full pipeline runs its stage module's ``run`` with that module's ``Config``."""
    from dpa_rag.pipeline.config import PipelineConfig
    from dpa_rag.pipeline.dpa import build_steps

    (tmp_path / "q.jsonl").write_text('{"id": "1", "question": "q?", "answers": ["a"]}\n')
    cfg = PipelineConfig(out_dir=tmp_path / "run", questions=tmp_path / "q.jsonl", corpus=[tmp_path / "q.jsonl"],
                         compare_retrievers=["dense"], extra_top_k=[1])
    runs = {importlib.import_module(n).run: importlib.import_module(n) for n in STAGES}
    folders = {s.name: tmp_path / "run" / s.name for s in build_steps(cfg)}
    for step in build_steps(cfg):
        assert step.run in runs, f"step {step.name} does not run a stage module's run()"
        assert isinstance(step.make_config(folders), runs[step.run].Config)
        assert step.outputs == runs[step.run].Outputs.written


def _literal_file_names(path: Path) -> list[str]:
    """String constants that look like output file names, outside module-level ``NAME = "..."`` constants."""
    tree = ast.parse(path.read_text())
    allowed = {id(node.value) for node in tree.body if isinstance(node, ast.Assign) and isinstance(node.value,
               ast.Constant) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)}
    pattern = re.compile(r"^[\w./-]+\.(jsonl|json|md|png|yaml|yml|faiss|txt|gz)$")
    return [f"{path.name}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and pattern.match(n.value)
            and id(n) not in allowed]


def test_no_literal_output_file_names_in_pipeline() -> None:
    found = [hit for f in sorted(PIPELINE.glob("*.py")) for hit in _literal_file_names(f)]
    assert not found, "use the stage modules' Outputs / file-name constants:\n" + "\n".join(found)


def test_the_literal_file_name_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('RETRIEVAL = "retrieval.jsonl"\n\ndef f(d):\n    return d / "reranked.jsonl"\n')
    assert _literal_file_names(bad) == ["bad.py:4: 'reranked.jsonl'"]


@pytest.mark.parametrize("given,expected", [("fp32", "float32"), ("bf16", "bfloat16"), ("FP16", "float16"),
                                            ("torch.bfloat16", "bfloat16"), ("auto", "auto")])
def test_one_dtype_spelling(given: str, expected: str) -> None:
    from dpa_rag.augment.filter import FilterConfig
    from dpa_rag.rag.answer import AnswerConfig
    from dpa_rag.reranker.config import RerankConfig
    from dpa_rag.retrieval.index import IndexConfig

    assert RerankConfig(input="x", model="m", dtype=given).dtype == expected
    assert AnswerConfig(questions="q", out_dir="o", dtype=given).dtype == expected
    assert IndexConfig(corpus=["c"], dtype=given).dtype == expected
    assert "dtype" not in FilterConfig.model_fields  # its scoring models have no dtype option: none is offered
    with pytest.raises(ConfigError, match="dtype"):
        load_config(RerankConfig, overrides={"input": "x", "model": "m", "dtype": "int8"})


def test_shared_options_declared_once() -> None:
    """device/dtype/batch_size come from the Runtime group; model defaults from dpa_rag.models."""
    from dpa_rag.config import DeviceOption, Runtime
    from dpa_rag.generation.base import GeneratorOptions
    from dpa_rag.llm.config import TrainLLMConfig
    from dpa_rag.models import DEFAULT_ENCODER, DEFAULT_READER
    from dpa_rag.reranker.config import RerankConfig, TrainRerankerConfig

    assert issubclass(GeneratorOptions, Runtime) and issubclass(RerankConfig, Runtime)
    assert issubclass(TrainRerankerConfig, DeviceOption) and issubclass(TrainLLMConfig, DeviceOption)
    assert GeneratorOptions().model == TrainLLMConfig(data=["x"]).model == DEFAULT_READER
    assert TrainRerankerConfig().backbone == DEFAULT_ENCODER
    src = Path(__file__).resolve().parents[2] / "src" / "dpa_rag"
    literal = [str(p.relative_to(src)) for p in src.rglob("*.py") if p.name != "models.py"
               and re.search(r'Field\(\s*"(smollm2-135m|minilm)"', p.read_text())]
    assert not literal, f"model defaults written out instead of DEFAULT_READER/DEFAULT_ENCODER: {literal}"


def test_pipeline_generator_sections_are_typed(tmp_path: Path) -> None:
    from dpa_rag.pipeline.config import PipelineConfig

    q = tmp_path / "q.jsonl"
    cfg = PipelineConfig(questions=q, corpus=[q], reader={"backend": "fake", "batch_size": 4, "dtype": "bf16"})
    assert cfg.reader.batch_size == 4 and cfg.reader.dtype == "bfloat16"
    assert cfg.generator("reader") == {"backend": "fake", "batch_size": 4, "dtype": "bfloat16"}  # only what is set
    assert cfg.generator("rewriter") is None
    with pytest.raises(ValueError, match="reader.template"):
        PipelineConfig(questions=q, corpus=[q], reader={"template": "dpa"})
    with pytest.raises(ConfigError) as err:  # the CLI's message lists the section's own keys
        load_config(PipelineConfig, overrides={"questions": q, "corpus": [q], "reader": {"template": "dpa"}})
    assert "unknown key 'reader.template' (known keys: api_key_env, attn_implementation, backend," in str(err.value)
    assert "compare_retrievers" not in str(err.value)


def test_saved_pipeline_yaml_builds_the_same_steps(tmp_path: Path) -> None:
    """pipeline.yaml keeps only what the generator sections set: re-running from it wires the same stage configs
    (augment keeps its own temperature, every stage the run's cache folder)."""
    from dpa_rag.config import save_config
    from dpa_rag.pipeline.config import PipelineConfig
    from dpa_rag.pipeline.dpa import build_steps

    q = tmp_path / "q.jsonl"
    q.write_text('{"id": "1", "question": "q?", "answers": ["a"]}\n')
    cfg = PipelineConfig(out_dir=tmp_path / "run", questions=q, corpus=[q],
                         reader={"backend": "fake", "batch_size": 4})
    again = load_config(PipelineConfig, save_config(cfg, tmp_path / "pipeline.yaml"))
    assert again.generator("reader") == {"backend": "fake", "batch_size": 4}

    def configs(c: PipelineConfig) -> dict[str, dict]:
        steps = build_steps(c)
        folders = {s.name: c.out_dir / s.name for s in steps}
        return {s.name: s.make_config(folders).model_dump(mode="json") for s in steps}

    before, after = configs(cfg), configs(again)
    assert before == after
    assert before["augment"]["temperature"] == 0.7
    assert before["augment"]["cache_dir"] == str(tmp_path / "run" / "cache")
    assert "report" in before["report"]["steps"]
