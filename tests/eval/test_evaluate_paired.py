"""Paired comparison in ``dpa-rag evaluate``: bootstrap differences per metric, aligned by id, errors naming files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpa_rag.config import ConfigError
from dpa_rag.eval import paired_bootstrap, paired_markdown, paired_table
from dpa_rag.eval.evaluate import EvaluateConfig
from dpa_rag.eval.evaluate import run as run_evaluate
from dpa_rag.io import DataError

GOLDS = {f"q{i}": [f"answer {i}"] for i in range(10)}


def preds(right: set[int], ids: list[int] | None = None, partial: set[int] = frozenset()) -> list[dict]:
    """One record per id: the gold answer where ``right``, half of it (F1 > 0, no hit) where ``partial``."""
    out = []
    for i in ids if ids is not None else range(10):
        gold = GOLDS[f"q{i}"][0]
        pred = gold if i in right else (f"{i}" if i in partial else "nothing")
        out.append({"id": f"q{i}", "question": f"question {i}", "answers": GOLDS[f"q{i}"], "prediction": pred})
    return out


BASE = preds({0, 1, 2, 3})  # right on 4 of 10
BETTER = preds(set(range(10)))  # right everywhere, in particular everywhere BASE is wrong


def write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def cli(args: list[str]):
    from dpa_rag.cli.main import app

    return CliRunner().invoke(app, ["evaluate", *args])


def test_paired_table_rows_in_points():
    rows = paired_table({"bm25": BASE, "dpa": BETTER, "same": BASE}, ["bm25"], n_resamples=2000)
    assert [(r["system"], r["baseline"], r["metric"]) for r in rows] == [
        ("dpa", "bm25", "hits@1"), ("dpa", "bm25", "em"), ("dpa", "bm25", "f1"),
        ("same", "bm25", "hits@1"), ("same", "bm25", "em"), ("same", "bm25", "f1"),
    ]
    dpa, same = rows[0], rows[3]
    assert dpa["diff"] == pytest.approx(60.0) and dpa["lo"] > 0 and dpa["hi"] <= 100.0 and dpa["n"] == 10
    assert same["diff"] == 0.0 and same["lo"] <= 0.0 <= same["hi"] and same["p_value"] == 1.0
    # the row is the bootstrap of the per-question 0/1 scores ×100, same seed
    ref = paired_bootstrap([100.0 * (i < 4) for i in range(10)], [100.0] * 10, n_resamples=2000)
    assert (dpa["lo"], dpa["hi"]) == pytest.approx((ref["lo"], ref["hi"]))


def test_paired_table_aligns_by_id_and_skips_unlabelled():
    shuffled = list(reversed(BETTER))
    assert paired_table({"a": BASE, "b": shuffled}, ["a"], n_resamples=500) == paired_table(
        {"a": BASE, "b": BETTER}, ["a"], n_resamples=500
    )
    unlabelled = [dict(r, answers=[]) if r["id"] == "q9" else r for r in BETTER]
    rows = paired_table({"a": BASE, "b": unlabelled}, ["a"], n_resamples=200)
    assert rows[0]["n"] == 9 and rows[0]["diff"] == pytest.approx(100 * 5 / 9)
    # F1 moves where hits do not: partial answers get F1 0.5 (one of two tokens), no hit
    partial = preds({0, 1, 2, 3}, partial={4, 5})
    by_metric = {r["metric"]: r for r in paired_table({"a": BASE, "p": partial}, ["a"], n_resamples=200)}
    assert by_metric["f1"]["diff"] == pytest.approx(100 * (2 * 2 / 3) / 10) and by_metric["hits@1"]["diff"] == 0.0


def test_paired_table_errors():
    with pytest.raises(ValueError, match="unknown baseline"):
        paired_table({"a": BASE}, ["b"])
    with pytest.raises(ValueError, match="unknown paired metric"):
        paired_table({"a": BASE, "b": BASE}, ["a"], metrics=["bleu"])
    with pytest.raises(DataError, match=r"b\.jsonl: cannot pair with a\.jsonl: 1 question id\(s\) of a\.jsonl are "
                                        r"missing \(e\.g\. 'q9'\)"):
        paired_table({"a": BASE, "b": BETTER[:9]}, ["a"], sources={"a": "a.jsonl", "b": "b.jsonl"})
    extra = [*BETTER, {"id": "q99", "answers": ["x"], "prediction": "x"}]
    with pytest.raises(DataError, match=r"system 'b': cannot pair with system 'a': 1 question id\(s\) are not in"):
        paired_table({"a": BASE, "b": extra}, ["a"])
    with pytest.raises(DataError, match="record 2 has no 'id'"):
        paired_table({"a": BASE, "b": [BETTER[0], {"answers": ["x"], "prediction": "x"}]}, ["a"])
    with pytest.raises(DataError, match="'q0' occurs twice"):
        paired_table({"a": BASE, "b": [*BETTER, BETTER[0]]}, ["a"])


def test_paired_markdown():
    rows = paired_table({"bm25": BASE, "dpa": BETTER, "same": BASE}, ["bm25"], n_resamples=2000)
    text = paired_markdown(rows)
    lines = text.splitlines()
    assert lines[0] == "| System | vs baseline | n | Δ Hits@1 [95% CI] | Δ EM [95% CI] | Δ F1 [95% CI] |"
    assert lines[1] == "|---|---|---:|---:|---:|---:|"
    lo, hi = rows[0]["lo"], rows[0]["hi"]
    assert lines[2].startswith(f"| dpa | bm25 | 10 | +60.00 [+{lo:.2f}, +{hi:.2f}]* |")
    assert lines[3] == "| same | bm25 | 10 | +0.00 [+0.00, +0.00] | +0.00 [+0.00, +0.00] | +0.00 [+0.00, +0.00] |"
    assert paired_markdown([]) == ""


def test_run_evaluate_writes_paired_block_and_table(tmp_path: Path):
    a = write(tmp_path / "bm25" / "predictions.jsonl", BASE)
    b = write(tmp_path / "dpa" / "predictions.jsonl", list(reversed(BETTER)))
    c = write(tmp_path / "dense" / "predictions.jsonl", BASE)
    cfg = EvaluateConfig(predictions=[str(a), str(b), str(c)], baseline=["bm25", "dense"], out_dir=tmp_path / "ev",
                         plot=False, bootstrap_resamples=1000, bootstrap_seed=7)
    report = run_evaluate(cfg)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(metrics) == ["bm25", "dpa", "dense", "paired"]
    paired = metrics["paired"]
    assert (paired["confidence"], paired["n_resamples"], paired["seed"]) == (0.95, 1000, 7)
    pairs = [(r["system"], r["baseline"]) for r in paired["rows"] if r["metric"] == "hits@1"]
    assert pairs == [("dpa", "bm25"), ("dense", "bm25"), ("bm25", "dense"), ("dpa", "dense")]
    expected = paired_table({"bm25": BASE, "dpa": BETTER, "dense": BASE}, ["bm25", "dense"], n_resamples=1000, seed=7)
    assert paired["rows"] == json.loads(json.dumps(expected))
    text = report.report.read_text()
    assert "## Paired differences (system vs baseline)" in text
    assert "95% paired bootstrap percentile interval (1000 resamples of the questions, seed 7)" in text
    assert paired_markdown(expected) in text
    assert text.index("## Paired differences") < text.index("## Inputs")


def test_cli_evaluate_baseline(tmp_path: Path):
    a = write(tmp_path / "a.jsonl", BASE)
    b = write(tmp_path / "b.jsonl", BETTER)
    result = cli(["--predictions", f"bm25={a}", "--predictions", f"dpa={b}", "--baseline", "bm25",
                  "--bootstrap-resamples", "500", "--out-dir", str(tmp_path / "ev"), "--no-plot"])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "ev" / "metrics.json").read_text())["paired"]["rows"]
    assert {r["metric"]: r["diff"] for r in rows} == pytest.approx({"hits@1": 60.0, "em": 60.0, "f1": 60.0})
    assert all(r["lo"] > 0 for r in rows)
    assert "| dpa | bm25 | 10 | +60.00 [" in (tmp_path / "ev" / "report.md").read_text()


def test_cli_evaluate_paired_errors_exit_2(tmp_path: Path):
    a = write(tmp_path / "a.jsonl", BASE)
    b = write(tmp_path / "b.jsonl", preds(set(range(10)), ids=[0, 1, 2, 3, 4, 5, 6, 7, 8]))
    result = cli(["--predictions", f"bm25={a}", "--predictions", f"dpa={b}", "--baseline", "bm25",
                  "--out-dir", str(tmp_path / "ev"), "--no-plot"])
    assert result.exit_code == 2
    assert f"{b}: cannot pair with {a}: 1 question id(s) of {a} are missing" in result.output
    assert "'q9'" in result.output
    result = cli(["--predictions", f"bm25={a}", "--predictions", f"dpa={b}", "--baseline", "dense",
                  "--out-dir", str(tmp_path / "ev2"), "--no-plot"])
    assert result.exit_code == 2 and "dense" in result.output


def test_run_evaluate_config_errors(tmp_path: Path):
    a = write(tmp_path / "a.jsonl", BASE)
    with pytest.raises(ConfigError, match="not one of the systems: a"):
        run_evaluate(EvaluateConfig(predictions=[str(a)], baseline=["x"], out_dir=tmp_path / "ev"))
    with pytest.raises(ConfigError, match="at least two systems"):
        run_evaluate(EvaluateConfig(predictions=[str(a)], baseline=["a"], out_dir=tmp_path / "ev"))
    with pytest.raises(ConfigError, match="named 'paired'"):
        run_evaluate(EvaluateConfig(predictions=[f"paired={a}", str(a)], baseline=["a"], out_dir=tmp_path / "ev"))
