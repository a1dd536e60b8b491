"""Every sub-command answers --help, and the command list matches the pipeline."""

from __future__ import annotations

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from dpa_rag.cli.main import app

EXPECTED = {
    "env",
    "index",
    "retrieve",
    "mine",
    "build-reranker-data",
    "build-llm-data",
    "augment",
    "filter",
    "train-reranker",
    "rerank",
    "train-llm",
    "answer",
    "evaluate",
    "run",
    "demo",
}


def _commands() -> dict:
    return get_command(app).commands  # type: ignore[attr-defined]


def test_all_commands_registered():
    assert EXPECTED <= set(_commands())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_help(name):
    if name not in _commands():
        pytest.fail(f"command {name} is not registered")
    res = CliRunner().invoke(app, [name, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output
    cmd = _commands()[name]
    for param in cmd.params:
        if param.param_type_name == "option" and param.name not in ("help",):
            assert param.help, f"{name} --{param.name} has no help text"


def test_env_runs():
    res = CliRunner().invoke(app, ["env"])
    assert res.exit_code == 0
    assert "torch" in res.output and "transformers" in res.output


def _rendered_help(name: str) -> str:
    res = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert res.exit_code == 0, res.output
    return " ".join(res.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("train-llm", ["LoRA rank (a continued --init-adapter keeps its own). [default: 16]",
                       "Peak learning rate. [default: 0.0002]", "Epochs. [default: 3.0]",
                       "[default: smollm2-135m]", "Output folder. [default: runs/llm-<stage>]",
                       "bf16 mixed precision. [default: on for CUDA with bf16, else off]", "[required]"]),
        ("train-reranker", ["[default: minilm]", "Training epochs. [default: 10.0]",
                            "[default: ['point', 'pair', 'contrastive']]"]),
        ("index", ["[default: minilm]"]),
        ("answer", ["[default: smollm2-135m]"]),
        ("evaluate", ["[required]"]),
    ],
)
def test_help_shows_defaults(name, expected):
    """Rich help must not swallow ``[default: …]`` as a markup tag (it did for every scalar default)."""
    text = _rendered_help(name)
    for needle in expected:
        assert needle in text, f"{name} --help lacks {needle!r}"
    assert "\\[" not in text  # escapes are not shown
    assert "PydanticUndefined" not in text  # a required option has no default to show


def test_train_reranker_help_names_both_kinds_and_their_loaders():
    """The default backbone (MiniLM) trains a bi-encoder: the help must not call the command a cross-encoder's."""
    text = _rendered_help("train-reranker")
    assert "Align a cross-encoder" not in text
    for needle in ("cross-encoder", "bi-encoder", "sentence_transformers.CrossEncoder",
                   "sentence_transformers.SentenceTransformer", "dpa_rag.reranker.Reranker", "Default backbone",
                   "minilm", "--kind auto trains a bi-encoder", "BAAI/bge-reranker-large"):
        assert needle in text, needle
