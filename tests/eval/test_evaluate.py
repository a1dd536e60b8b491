"""The ``evaluate`` stage and reports: metrics recomputed from the records, markdown/JSON/PNG outputs, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpa_rag.config import ConfigError
from dpa_rag.eval.evaluate import (
    EvaluateConfig,
    evaluate_predictions,
    load_predictions,
    parse_prediction_specs,
)
from dpa_rag.eval.evaluate import run as run_evaluate
from dpa_rag.eval.metrics import exact_match, f1, hit, hit_word
from dpa_rag.eval.report import bar_plot, markdown_table, write_report
from dpa_rag.io import DataError

SYSTEM_A = [
    {"id": "1", "answers": ["Pyotr Ilyich Tchaikovsky"], "prediction": "Tchaikovsky", "category": 1,
     "ctx_has_answer": [True, False]},
    {"id": "2", "answers": ["2007"], "prediction": "in 2007", "category": 2, "ctx_has_answer": [False, False]},
    {"id": "3", "answers": ["Paris", "City of Paris"], "prediction": "Paris", "category": 1,
     "ctx_has_answer": [False, True]},
    {"id": "4", "answers": ["north"], "prediction": "no", "category": 2, "ctx_has_answer": [False, False]},
]
SYSTEM_B = [
    {"id": "1", "answers": ["Pyotr Ilyich Tchaikovsky"], "prediction": "Pyotr Ilyich Tchaikovsky"},
    {"id": "2", "answers": ["2007"], "prediction": "2008"},
    {"id": "3", "answers": ["Paris"], "prediction": ""},
    {"id": "5", "answers": [], "prediction": "unlabelled"},
]


def write_preds(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def expected(records: list[dict]) -> dict[str, float]:
    labelled = [r for r in records if r["answers"]]
    n = len(labelled)
    out = {"n": float(n)}
    for key, fn in (("hits@1", hit), ("hit_word", hit_word), ("em", exact_match), ("f1", f1)):
        out[key] = 100 * sum(fn(r["prediction"], r["answers"]) for r in labelled) / n
    return out


def test_evaluate_predictions_recomputes_from_records():
    got = evaluate_predictions(SYSTEM_A)
    for key, value in expected(SYSTEM_A).items():
        assert got[key] == pytest.approx(value), key
    assert got["hits@1"] == pytest.approx(50.0)  # Tchaikovsky (partial name) and "no" (gold "north") miss
    assert got["answer_recall"] == pytest.approx(50.0)
    assert got["n_ctx"] == 2.0
    cat1 = [r for r in SYSTEM_A if r["category"] == 1]
    for key, value in expected(cat1).items():
        assert got[f"category/1/{key}"] == pytest.approx(value)
    assert got["category/2/n"] == 2.0


def test_evaluate_predictions_prefix_unlabelled_and_ignores_stored_scores():
    fake_scores = [dict(r, scores={"hit": 1, "f1": 1}) for r in SYSTEM_B]
    got = evaluate_predictions(fake_scores, prefix="nq_")
    assert got["nq_n"] == 3 and got["nq_n_unlabelled"] == 1
    for key, value in expected(SYSTEM_B).items():
        assert got[f"nq_{key}"] == pytest.approx(value)
    assert not any(k.startswith("nq_category") or k == "nq_answer_recall" for k in got)
    assert all(k.startswith("nq_") for k in got)


def test_hits_is_substring_even_when_word_differs():
    got = evaluate_predictions([{"answers": ["no"], "prediction": "north"}])
    assert got["hits@1"] == 100.0 and got["hit_word"] == 0.0 and got["em"] == 0.0


def test_parse_prediction_specs(tmp_path: Path):
    a = write_preds(tmp_path / "rag" / "predictions.jsonl", SYSTEM_A)
    b = write_preds(tmp_path / "b.jsonl", SYSTEM_B)
    assert parse_prediction_specs([str(a), str(b)]) == {"rag": a, "b": b}
    assert parse_prediction_specs([f"mine={a}", str(b)], names=["other"]) == {"mine": a, "other": b}
    assert list(parse_prediction_specs([str(a), str(a)])) == ["rag", "rag-2"]
    with pytest.raises(ConfigError, match="used twice"):
        parse_prediction_specs([f"x={a}", f"x={b}"])
    with pytest.raises(ConfigError, match="--name"):
        parse_prediction_specs([str(a)], names=["one", "two"])


def test_load_predictions_names_file_and_line(tmp_path: Path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(SYSTEM_A[0]) + "\n" + json.dumps({"answers": ["x"]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:2: expected a string 'prediction'"):
        load_predictions(path)
    path.write_text(json.dumps({"prediction": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:1: no gold answers"):
        load_predictions(path)


def test_run_evaluate_two_systems(tmp_path: Path):
    a = write_preds(tmp_path / "rag" / "predictions.jsonl", SYSTEM_A)
    b = write_preds(tmp_path / "dpa" / "predictions.jsonl", SYSTEM_B)
    cfg = EvaluateConfig(predictions=[str(a), str(b)], out_dir=tmp_path / "eval", title="NQ test")
    report = run_evaluate(cfg)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert list(metrics) == ["rag", "dpa"]
    for name, records in (("rag", SYSTEM_A), ("dpa", SYSTEM_B)):
        for key, value in expected(records).items():
            assert metrics[name][key] == pytest.approx(value)
    text = report.report.read_text()
    assert text.startswith("# NQ test\n")
    for name, records in (("rag", SYSTEM_A), ("dpa", SYSTEM_B)):
        exp = expected(records)
        cells = " | ".join(f"{exp[k]:.2f}" for k in ("hits@1", "hit_word", "em", "f1"))
        assert f"| {name} | {int(exp['n'])} | {cells} |" in text
    assert "## Category 1" in text and "## Category 2" in text
    assert "Not scored (no gold answer): dpa 1." in text
    assert str(a) in text
    png = tmp_path / "eval" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "eval" / "manifest.json").read_text())["counts"]["systems"] == 2


def test_write_report_extra_sections_and_table(tmp_path: Path):
    results = {"x": {"n": 2.0, "hits@1": 50.0, "f1": 12.345}}
    path = write_report(results, tmp_path, title="T", extra_sections=["## Notes\n\nhello"])
    text = path.read_text()
    assert "| System | n | Hits@1 | F1 |" in text and "| x | 2 | 50.00 | 12.35 |" in text
    assert text.rstrip().endswith("## Notes\n\nhello")
    assert json.loads((tmp_path / "metrics.json").read_text()) == results
    # a column is shown when any system has it; others show a dash
    table = markdown_table({"a": {"em": 1.0}, "b": {"em": 2.0, "f1": 3.0}})
    assert "| a | 1.00 | – |" in table and "| b | 2.00 | 3.00 |" in table
    assert bar_plot(results, tmp_path / "p.png").stat().st_size > 0


def test_cli_evaluate(tmp_path: Path):
    from dpa_rag.cli.main import app

    a = write_preds(tmp_path / "a.jsonl", SYSTEM_A)
    b = write_preds(tmp_path / "b.jsonl", SYSTEM_B)
    result = CliRunner().invoke(
        app,
        ["evaluate", "--predictions", str(a), "--predictions", f"dpa={b}", "--name", "vanilla",
         "--out-dir", str(tmp_path / "ev"), "--no-plot"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics) == {"vanilla", "dpa"}
    assert metrics["dpa"]["f1"] == pytest.approx(expected(SYSTEM_B)["f1"])
    assert not (tmp_path / "ev" / "metrics.png").exists()


def test_cli_evaluate_malformed_line_exits_2(tmp_path: Path):
    from dpa_rag.cli.main import app

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SYSTEM_A[0]) + "\n" + json.dumps(SYSTEM_A[1]) + "\n{oops\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["evaluate", "--predictions", str(bad), "--out-dir", str(tmp_path / "ev")])
    assert result.exit_code == 2
    assert f"{bad}:3" in result.output
    result = CliRunner().invoke(app, ["evaluate", "--out-dir", str(tmp_path / "ev")])
    assert result.exit_code == 2
