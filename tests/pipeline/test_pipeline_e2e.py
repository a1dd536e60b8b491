"""End-to-end `dpa-rag run` on the bundled sample with small fake/tiny models: every step runs, a second run skips
everything, and a run killed during mining resumes to the same final metrics as an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dpa_rag.cli.main import app
from dpa_rag.config import ConfigError, load_config
from dpa_rag.pipeline import PipelineConfig, run_pipeline, step_names
from dpa_rag.sample import sample_path


def _config(out_dir: Path, bert: Path, llm: Path, **extra) -> PipelineConfig:
    data = {
        "out_dir": str(out_dir),
        "questions": str(sample_path("questions.jsonl")),
        "corpus": [str(sample_path("corpus.jsonl"))],
        "train_limit": 24,
        "eval_limit": 8,
        "retriever": "bm25",
        "compare_retrievers": ["dense"],
        "retrieve_top_k": 8,
        "top_k": 2,
        "reader": {"backend": "fake", "model": str(llm), "batch_size": 8},  # the reader trained by train-llm
        # random tiny models: the gate's `auto` decisions are noise here (tests/pipeline/test_promote.py covers them);
        # every trained part is wired and served
        "promote": "always",
        "sections": {
            "index": {"encoder": str(bert)},
            "mine": {"ranks": [1, 3, 8]},
            "augment": {"strategies": ["rephrasing", "constraint"]},
            "filter": {"encoder": str(bert), "similarity_threshold": -1.0},
            "train_reranker": {"backbone": str(bert), "max_steps": 2, "max_length": 64, "warmup_relevance": False},
            "rerank": {"max_length": 64},
            "train_llm": {"max_steps": 1, "max_length": 2048, "logging_steps": 1},
        },
        **extra,
    }
    return load_config(PipelineConfig, None, data)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_bert_dir, tiny_llm_dir):
    out = tmp_path_factory.mktemp("pipe") / "run"
    cfg = _config(out, tiny_bert_dir, tiny_llm_dir)
    report = run_pipeline(cfg)
    return cfg, report


def test_every_step_ran_and_report_written(pipeline_run):
    cfg, report = pipeline_run
    assert report.name == "report.md" and report.exists()
    text = report.read_text()
    for system in ("closed_book", "retriever", "reranker", "aligned_reader", "full", "dense"):
        assert f"| {system} (" in text
    assert "How alignment shifts" in text
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert all(m["n"] == 8 for m in metrics.values())
    for name in step_names(cfg):
        manifest = json.loads((cfg.out_dir / name / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["run_id"]
    assert (report.parent / "systems.png").exists() and (report.parent / "outcomes.png").exists()
    # the promotion gate ran on the held-out validation of the reader and the reranker's held-out lists
    decisions = json.loads((cfg.out_dir / "promote" / "promotion.json").read_text())
    assert set(decisions) == {"reader", "reranker"} and "Promotion gate" in text
    validation = json.loads((cfg.out_dir / "train-llm-sft" / "validation.json").read_text())
    assert validation["n_questions"] > 0 and validation["steps"][0]["step"] == 0
    assert "held-out validation" in text


def test_rerun_skips_everything(pipeline_run):
    cfg, report = pipeline_run
    seen = []
    run_pipeline(cfg, on_step=seen.append)
    assert {r.status for r in seen if r.status != "disabled"} == {"skipped"}
    # a speed-only option (the reader's batch size) does not invalidate anything
    faster = cfg.model_copy(update={"reader": cfg.reader.model_copy(update={"batch_size": 3})})
    seen = []
    run_pipeline(faster, on_step=seen.append)
    assert {r.status for r in seen if r.status != "disabled"} == {"skipped"}


def test_changed_option_reruns_downstream_only(pipeline_run, tiny_bert_dir, tiny_llm_dir):
    cfg, _ = pipeline_run
    cfg2 = _config(cfg.out_dir, tiny_bert_dir, tiny_llm_dir)
    cfg2.sections["answer"] = {"rerank_depth": 50}  # (its decoding options would re-run train-llm's validation)
    seen = []
    run_pipeline(cfg2, on_step=seen.append)
    ran = [r.name for r in seen if r.status == "ran"]
    assert ran == [n for n in step_names(cfg2) if n.startswith("answer-")] + ["report"]


def test_killed_mining_resumes_to_same_metrics(tmp_path, tiny_bert_dir, tiny_llm_dir, monkeypatch):
    from dpa_rag.generation import fake

    light = {"augmentation": False, "train_llm": False}
    ref = run_pipeline(_config(tmp_path / "ref", tiny_bert_dir, tiny_llm_dir, **light))
    cfg = _config(tmp_path / "run", tiny_bert_dir, tiny_llm_dir, **light)
    original = fake.FakeGenerator.generate
    calls = {"n": 0}

    def dying(self, prompts, params):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is killed during mining
        return original(self, prompts, params)

    monkeypatch.setattr(fake.FakeGenerator, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    assert (cfg.out_dir / "mine" / "preferences.jsonl").exists()  # partial work kept
    assert not (cfg.out_dir / "mine" / "manifest.json").exists()
    monkeypatch.setattr(fake.FakeGenerator, "generate", original)
    report = run_pipeline(cfg)
    assert json.loads((report.parent / "metrics.json").read_text()) == json.loads(
        (ref.parent / "metrics.json").read_text()
    )
    for f in ("mine/preferences.jsonl", "rerank-eval/reranked.jsonl"):
        assert (cfg.out_dir / f).read_text() == (ref.parent.parent / f).read_text()


def test_pipeline_config_errors(tmp_path, tiny_bert_dir, tiny_llm_dir):
    with pytest.raises(ConfigError, match="unknown section"):
        _config(tmp_path, tiny_bert_dir, tiny_llm_dir, sections={"minee": {}})
    cfg = _config(tmp_path / "r", tiny_bert_dir, tiny_llm_dir)
    cfg.sections["mine"] = {"bogus": 1}
    with pytest.raises(ConfigError, match="sections.mine: unknown key 'bogus'"):
        run_pipeline(cfg, until="mine")
    cfg.sections["mine"] = {"retrieval": "x.jsonl"}
    with pytest.raises(ConfigError, match="set by the pipeline"):
        run_pipeline(cfg, until="mine")
    cfg.sections["mine"] = {}
    cfg.sections["train_llm"] = {"model": "other"}  # the reader's own model is what gets aligned
    with pytest.raises(ConfigError, match=r"sections.train_llm\+train_llm_prealign: model is set by the pipeline"):
        run_pipeline(cfg)


def test_ablation_switches_remove_steps(tmp_path, tiny_bert_dir, tiny_llm_dir):
    cfg = _config(tmp_path, tiny_bert_dir, tiny_llm_dir, augmentation=False, train_llm=False)
    names = step_names(cfg)
    assert "augment" not in names and "train-llm-sft" not in names and "answer-full" not in names
    assert "train-reranker" in names and "answer-reranker" in names
    cfg = _config(tmp_path, tiny_bert_dir, tiny_llm_dir, reranker=False, prealign=False)
    names = step_names(cfg)
    assert "train-reranker" not in names and "train-llm-prealign" not in names and "train-llm-sft" in names


def test_skip_systems(tmp_path, tiny_bert_dir, tiny_llm_dir):
    from dpa_rag.pipeline.dpa import system_steps

    cfg = _config(tmp_path, tiny_bert_dir, tiny_llm_dir, skip_systems=["aligned_reader", "closed_book_aligned"])
    names = step_names(cfg)
    assert "answer-aligned-reader" not in names and "answer-closed-book-aligned" not in names
    assert {"answer-full", "answer-reranker", "answer-bm25", "answer-dense", "train-llm-sft"} <= set(names)
    assert set(system_steps(cfg)) == {"closed_book", "retriever", "reranker", "full", "dense"}
    with pytest.raises(ConfigError, match="skip_systems"):
        _config(tmp_path, tiny_bert_dir, tiny_llm_dir, skip_systems=["retriever"])


def test_cli_run_list_steps(tmp_path, tiny_bert_dir, tiny_llm_dir):
    cfg = _config(tmp_path / "r", tiny_bert_dir, tiny_llm_dir)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    res = CliRunner().invoke(app, ["run", str(path), "--list-steps"])
    assert res.exit_code == 0, res.output
    assert res.output.split() == step_names(cfg)
    bad = tmp_path / "bad.yaml"
    bad.write_text("questions: q.jsonl\ncorpus: [c.jsonl]\nretreiver: bm25\n")
    res = CliRunner().invoke(app, ["run", str(bad)])
    assert res.exit_code == 2 and "unknown key 'retreiver'" in res.output


def test_until_and_disabled_steps(tmp_path, tiny_bert_dir, tiny_llm_dir):
    cfg = _config(tmp_path / "r", tiny_bert_dir, tiny_llm_dir, augmentation=False)
    with pytest.raises(ValueError, match="disabled"):
        run_pipeline(cfg, until="augment")
    assert run_pipeline(cfg, until="split") == cfg.out_dir
    assert (cfg.out_dir / "split" / "manifest.json").exists() and not (cfg.out_dir / "index").exists()
    # only reranker/LLM training read rewrites: with both off, augmentation does not run
    names = step_names(_config(tmp_path, tiny_bert_dir, tiny_llm_dir, reranker=False, train_llm=False))
    assert "augment" not in names and "filter" not in names


def test_graded_loglik_pipeline_with_bi_encoder_and_top1_systems(tmp_path, tiny_bert_dir, tiny_llm_dir):
    """mine with the likelihood rule → ranked reranker data + held-out lists → bi-encoder reranker with the utility
    report → answers at top-k and top-1 → the report shows the utility table and the @1 systems."""
    cfg = _config(tmp_path / "run", tiny_bert_dir, tiny_llm_dir, augmentation=False, train_llm=False,
                  extra_top_k=[1])
    sections = {**cfg.sections, "mine": {"label_rule": "loglik", "probe_top": 4, "agreement_questions": 4},
                "train_reranker": {"backbone": str(tiny_bert_dir), "kind": "bi-encoder", "epochs": 1,
                                   "max_length": 64, "metric_for_best_model": "utility_ndcg_at_3"}}
    cfg = cfg.model_copy(update={"sections": sections})
    report = run_pipeline(cfg)
    text = report.read_text()
    for system in ("retriever@1", "reranker@1", "dense@1", "reranker", "retriever"):
        assert f"| {system} (" in text, system
    assert "top-1 + base reader" in text
    assert "Reranker utility ranking" in text and "oracle (largest gain first)" in text
    assert "Paired comparison against the retrievers" in text and "| reranker@1 | retriever@1 |" in text
    summary = json.loads((report.parent / "summary.json").read_text())
    assert {(r["system"], r["baseline"]) for r in summary["paired"]} >= {("reranker", "retriever"),
                                                                         ("reranker@1", "dense@1")}
    data_stats = json.loads((cfg.out_dir / "reranker-data" / "stats.json").read_text())
    assert data_stats["pool"] == "ranked" and data_stats["train"]["kept"] > 0
    assert json.loads((cfg.out_dir / "train-reranker" / "train_log.json").read_text())["kind"] == "bi-encoder"
    top1 = cfg.out_dir / "answer-reranker-top1" / "predictions.jsonl"
    preds = [json.loads(x) for x in top1.read_text().splitlines()]
    assert preds and all(len(p["ctx_ids"]) == 1 for p in preds)


def test_moved_run_folder_resumes_and_serves(pipeline_run, tmp_path, monkeypatch):
    """A finished run copied elsewhere (and its original out of the way) resumes with nothing recomputed, `--from`
    re-runs only from there, and `dpa-rag serve --run` serves it from another working directory."""
    pytest.importorskip("fastapi")
    import httpx

    from dpa_rag.serve import ServeConfig, ServerThread, build_app, make_plan

    cfg, _ = pipeline_run
    cfg = load_config(PipelineConfig, cfg.out_dir / "pipeline.yaml")  # as last run (earlier tests change options)
    moved = tmp_path / "elsewhere" / "copied-run"
    shutil.copytree(cfg.out_dir, moved, symlinks=True)  # copy2: modification times kept
    hidden = cfg.out_dir.with_name(cfg.out_dir.name + "-away")
    cfg.out_dir.rename(hidden)  # nothing may still read the original folder
    try:
        work = tmp_path / "somewhere-else"
        work.mkdir()
        monkeypatch.chdir(work)
        seen = []
        copy = cfg.model_copy(update={"out_dir": moved})
        run_pipeline(copy, on_step=seen.append)
        assert {r.status for r in seen if r.status != "disabled"} == {"skipped"}
        seen = []
        run_pipeline(copy, from_step="answer-full", on_step=seen.append)
        ran = [r.name for r in seen if r.status == "ran"]
        assert ran[0] == "answer-full" and "train-reranker" not in ran and "report" in ran
        seen = []
        run_pipeline(copy, on_step=seen.append)  # the re-run steps (new paths) and the old ones (old paths) match
        assert {r.status for r in seen if r.status != "disabled"} == {"skipped"}

        plan = make_plan(ServeConfig(run=moved, backend="fake"))
        assert plan.index_dir == moved / "index"
        assert Path(plan.reranker["model_path"]) == moved / "train-reranker" / "model"
        assert Path(plan.aligned_reader.model).is_relative_to(moved)
        assert Path(plan.base_reader.cache_dir) == moved / "cache" == Path(plan.aligned_reader.cache_dir)
        with ServerThread(build_app(ServeConfig(run=moved, backend="fake"))) as url:
            body = httpx.post(f"{url}/answer", json={"question": "what is the capital of france"}).json()
            assert body["reranked"] is True and len(body["passages"]) == cfg.top_k
            assert str(tmp_path) not in httpx.get(f"{url}/health").text
        assert not (work / "runs").exists() and list(work.iterdir()) == []
    finally:
        hidden.rename(cfg.out_dir)
