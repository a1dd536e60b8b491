"""Bad inputs, missing models and unwritable outputs: exit code 2, one ``error:`` line, no traceback, nothing written.

One row per case (``CASES``); each builds its inputs in a fresh folder, runs the real CLI in-process and checks the
message names the file/line or model, and that the output folder holds no partial result.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpa_rag.cli.main import app
from dpa_rag.sample import sample_path

QUESTIONS = sample_path("questions.jsonl")
CORPUS = sample_path("corpus.jsonl")


def invoke(args: list[str]):
    return CliRunner().invoke(app, ["-q", *map(str, args)])


def error_lines(output: str) -> list[str]:
    # progress bars end with "\r" and no newline: split on both
    return [ln.strip() for ln in output.replace("\r", "\n").splitlines() if ln.strip().startswith("error:")]


def assert_clean_failure(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1, result.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _answer(questions: Path | str, out: Path, *extra: str) -> list[str]:
    return ["answer", "--questions", questions, "--backend", "fake", "--top-k", "0", "--out-dir", out, *extra]


@dataclass
class Case:
    name: str
    build: Callable[[Path], list[str]]  # tmp folder -> CLI arguments (output folder: tmp / "out")
    needles: tuple[str, ...]
    absent: tuple[str, ...] = field(default=("out",))  # paths under tmp that must hold no file afterwards


def _not_gzip(t: Path) -> list[str]:
    return _answer(_write(t / "q.jsonl.gz", "plain text\n"), t / "out")


def _truncated_gzip(t: Path) -> list[str]:
    data = gzip.compress(QUESTIONS.read_bytes())
    return _answer(_write(t / "q.jsonl.gz", data[: len(data) // 2]), t / "out")


def _not_utf8(t: Path) -> list[str]:
    good = '{"id": "a", "question": "x", "answers": ["y"]}\n'
    bad = b'{"id": "b", "question": "\xff", "answers": ["y"]}\n'
    return _answer(_write(t / "q.jsonl", good.encode() + bad), t / "out")


def _folder_as_input(t: Path) -> list[str]:
    (t / "qdir").mkdir()
    return _answer(t / "qdir", t / "out")


def _bad_json(t: Path) -> list[str]:
    return _answer(_write(t / "q.jsonl", '{"id": "a", "question": "x", "answers": ["y"]}\n{"id": "b",\n'), t / "out")


def _empty(t: Path) -> list[str]:
    return _answer(_write(t / "q.jsonl", "\n\n"), t / "out")


def _id_list(t: Path) -> list[str]:
    return _answer(_write(t / "q.jsonl", '{"id": ["a"], "question": "x", "answers": ["y"]}\n'), t / "out")


def _answers_string(t: Path) -> list[str]:
    return _answer(_write(t / "q.jsonl", '{"id": "a", "question": "x", "answers": "y"}\n'), t / "out")


def _answers_number(t: Path) -> list[str]:
    return _answer(_write(t / "q.jsonl", '{"id": "a", "question": "x", "answer": [1990]}\n'), t / "out")


def _duplicate_ids(t: Path) -> list[str]:
    rows = ['{"id": "a", "question": "x", "answers": ["y"]}', '{"id": "a", "question": "z", "answers": ["y"]}']
    return _answer(_write(t / "q.jsonl", "\n".join(rows) + "\n"), t / "out")


def _missing_model(t: Path) -> list[str]:
    return ["answer", "--questions", QUESTIONS, "--top-k", "0", "--backend", "hf", "--model", t / "no-such-model",
            "--out-dir", t / "out"]


def _offline_hub_model(t: Path) -> list[str]:
    return ["answer", "--questions", QUESTIONS, "--top-k", "0", "--backend", "hf", "--model", "nobody/no-such-model",
            "--out-dir", t / "out"]


def _folder_without_model(t: Path) -> list[str]:
    (t / "notamodel").mkdir()
    _write(t / "notamodel" / "README.md", "hello\n")
    return ["answer", "--questions", QUESTIONS, "--top-k", "0", "--backend", "hf", "--model", t / "notamodel",
            "--out-dir", t / "out"]


def _out_dir_is_file(t: Path) -> list[str]:
    _write(t / "afile", "x")
    return _answer(QUESTIONS, t / "afile")


def _out_dir_under_file(t: Path) -> list[str]:
    _write(t / "afile", "x")
    return _answer(QUESTIONS, t / "afile" / "sub")


def _yaml_object_tag(t: Path) -> list[str]:
    return ["answer", "--config", _write(t / "c.yaml", 'model: !!python/object/apply:os.system ["echo hi"]\n')]


def _unknown_key(t: Path) -> list[str]:
    return ["answer", "--config", _write(t / "c.yaml", f"questions: {QUESTIONS}\nout_dir: {t / 'out'}\nmodle: x\n")]


def _mine_bad_model(t: Path) -> list[str]:
    ret = {"id": "q1", "question": "who wrote hamlet", "answers": ["Shakespeare"],
           "ctxs": [{"id": "p1", "title": "Hamlet", "text": "Hamlet is a play by Shakespeare."}]}
    path = _write(t / "ret.jsonl", json.dumps(ret) + "\n")
    return ["mine", "--retrieval", path, "--backend", "hf", "--model", t / "no-such-model", "--out-dir", t / "out"]


def _index_dense_bad_model(t: Path) -> list[str]:
    return ["index", "--corpus", CORPUS, "--kind", "dense", "--encoder", t / "no-such-encoder", "--out-dir", t / "out"]


def _openai_refused(t: Path) -> list[str]:
    return ["answer", "--questions", QUESTIONS, "--limit", "1", "--top-k", "0", "--backend", "openai",
            "--base-url", "http://127.0.0.1:9/v1", "--model", "x", "--max-retries", "0", "--out-dir", t / "out"]


CASES = [
    Case("not-gzip", _not_gzip, ("q.jsonl.gz", "not a gzip file")),
    Case("truncated-gzip", _truncated_gzip, ("q.jsonl.gz:", "truncated gzip")),
    Case("not-utf8", _not_utf8, ("q.jsonl:2:", "not UTF-8")),
    Case("folder-as-input", _folder_as_input, ("qdir", "is a folder")),
    Case("bad-json", _bad_json, ("q.jsonl:2:", "invalid JSON")),
    Case("empty-input", _empty, ("q.jsonl", "no questions")),
    Case("id-list", _id_list, ("q.jsonl:1:", "'id' must be a string or an integer")),
    Case("answers-string", _answers_string, ("q.jsonl:1:", "must be a list of strings")),
    Case("answers-number", _answers_number, ("q.jsonl:1:", "item 0")),
    Case("duplicate-ids", _duplicate_ids, ("q.jsonl:2:", "line 1", "--dedupe-ids")),
    Case("missing-model", _missing_model, ("no-such-model", "no such model folder")),
    Case("offline-hub-model", _offline_hub_model, ("nobody/no-such-model", "HF_HUB_OFFLINE")),
    Case("folder-without-model", _folder_without_model, ("notamodel", "no config.json")),
    Case("out-dir-is-file", _out_dir_is_file, ("afile", "is a file"), absent=()),
    Case("out-dir-under-file", _out_dir_under_file, ("afile", "is a file"), absent=("afile/sub",)),
    Case("yaml-object-tag", _yaml_object_tag, ("c.yaml", "invalid YAML"), absent=()),
    Case("unknown-config-key", _unknown_key, ("c.yaml", "modle"), absent=()),
    Case("mine-bad-model", _mine_bad_model, ("no-such-model",)),
    Case("index-dense-bad-model", _index_dense_bad_model, ("no-such-encoder",)),
    Case("openai-refused", _openai_refused, ("http://127.0.0.1:9/v1", "Connection refused", "0 prompt(s)")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_error_line(case: Case, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke(case.build(run_dir))
    assert_clean_failure(result, *case.needles)
    for rel in case.absent:  # an empty folder may stay; no file may
        left = [p for p in (run_dir / rel).rglob("*") if p.is_file()] if (run_dir / rel).is_dir() else []
        assert not left and not (run_dir / rel).is_file(), f"{rel}: left behind {left}"


def test_dedupe_ids_renames_and_counts(run_dir: Path) -> None:
    args = _duplicate_ids(run_dir) + ["--dedupe-ids"]
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exit_code == 0, result.output
    ids = [json.loads(ln)["id"] for ln in (run_dir / "out" / "predictions.jsonl").read_text().splitlines()]
    assert ids == ["a", "a-2"]
    assert "renamed 1 repeated id" in result.output


def test_verbose_shows_the_traceback(run_dir: Path) -> None:
    result = CliRunner().invoke(app, ["--debug", *map(str, _empty(run_dir))])
    assert result.exit_code == 2
    assert "Traceback" in result.output
    assert len(error_lines(result.output)) == 1


def test_unexpected_exception_summary_then_traceback(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dpa_rag.rag.answer as answer_mod

    def boom(*args, **kwargs):
        raise RuntimeError("boom from a bug")

    monkeypatch.setattr(answer_mod, "answer_records", boom)
    result = invoke(_answer(QUESTIONS, run_dir / "out", "--limit", "1"))
    assert result.exit_code == 1
    first = result.output.replace("\r", "\n").strip().splitlines()
    errors = [ln for ln in first if ln.startswith("error:")]
    assert len(errors) == 1 and "RuntimeError: boom from a bug" in errors[0] and "dpa-rag env" in errors[0]
    assert result.output.index("error:") < result.output.index("Traceback")


def _finished_answer(out: Path) -> dict[str, bytes]:
    result = invoke(_answer(QUESTIONS, out, "--limit", "3"))
    assert result.exit_code == 0, result.output
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize("bad", ["bad-input", "bad-model"])
def test_failed_rerun_keeps_the_finished_run(run_dir: Path, bad: str) -> None:
    out = run_dir / "out"
    before = _finished_answer(out)
    assert {"manifest.json", "config.yaml", "predictions.jsonl"} <= set(before)
    if bad == "bad-input":
        args = _answer(_write(run_dir / "q.jsonl", '{"id": "a", "question": "x", "answers": "y"}\n'), out)
    else:
        args = ["answer", "--questions", QUESTIONS, "--top-k", "0", "--backend", "hf", "--model", run_dir / "nope",
                "--out-dir", out]
    assert_clean_failure(invoke(args))
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before


def test_mine_failed_rerun_keeps_the_finished_run(run_dir: Path) -> None:
    args = _mine_bad_model(run_dir)
    ok = [*args[: args.index("--backend")], "--backend", "fake", "--out-dir", run_dir / "out"]
    assert invoke(ok).exit_code == 0
    before = {p.name: p.read_bytes() for p in (run_dir / "out").iterdir()}
    assert_clean_failure(invoke(args), "no-such-model")
    assert {p.name: p.read_bytes() for p in (run_dir / "out").iterdir()} == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_dir(run_dir: Path) -> None:
    ro = run_dir / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_clean_failure(invoke(_answer(QUESTIONS, ro / "out")), "ro", "permission denied")
    finally:
        ro.chmod(0o755)


def test_outputs_respect_the_umask(run_dir: Path) -> None:
    old = os.umask(0o022)
    try:
        result = invoke(["index", "--corpus", CORPUS, "--kind", "bm25", "--out-dir", run_dir / "idx"])
        assert result.exit_code == 0, result.output
        modes = {p.relative_to(run_dir / "idx").as_posix(): p.stat().st_mode & 0o777
                 for p in (run_dir / "idx").rglob("*")}
    finally:
        os.umask(old)
    assert modes["passages.jsonl"] == 0o644 and modes["manifest.json"] == 0o644
    assert modes["bm25"] == 0o755


def test_recorder_is_lazy(run_dir: Path) -> None:
    from dpa_rag.io import write_json
    from dpa_rag.rag.answer import AnswerConfig
    from dpa_rag.stage import stage_recorder

    out = run_dir / "out"
    _finished_answer(out)
    manifest, config = (out / "manifest.json").read_bytes(), (out / "config.yaml").read_bytes()
    cfg = AnswerConfig(questions=QUESTIONS, out_dir=out, backend="fake", top_k=1)
    rec = stage_recorder("answer", cfg, out, [QUESTIONS])
    assert (out / "manifest.json").read_bytes() == manifest and (out / "config.yaml").read_bytes() == config
    write_json(out / "metrics.json", {})  # the first write starts the run
    assert not (out / "manifest.json").exists() and (out / "config.yaml").read_bytes() != config
    rec.finish(outputs=["metrics.json"])
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
