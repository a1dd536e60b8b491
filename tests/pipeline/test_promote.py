"""The promotion gate: a component worse than its baseline on held-out training-split questions stays out of the full
system under ``auto``; ``always``/``never`` do what they say; the pipeline wires ``answer-full`` from the decisions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpa_rag.io import write_json
from dpa_rag.pipeline import PipelineConfig
from dpa_rag.pipeline import promote as gate
from dpa_rag.pipeline.dpa import build_steps
from dpa_rag.sample import sample_path


def _validation(base: tuple[float, float], aligned: tuple[float, float], step: int = 8) -> dict:
    return {"n_questions": 20, "selected_step": step, "versus_base": {},
            "base": {"hits@1": base[0], "em": 0.0, "f1": base[1]},
            "selected": {"hits@1": aligned[0], "em": 10.0, "f1": aligned[1]}}


@pytest.mark.parametrize(("base", "aligned", "tolerance", "promoted"), [
    ((50.0, 20.0), (45.0, 40.0), 0.0, False),  # loses answers: F1 up, Hits@1 down
    ((50.0, 20.0), (45.0, 40.0), 5.0, True),  # ... within the tolerance
    ((50.0, 20.0), (55.0, 15.0), 0.0, False),  # lower F1
    ((50.0, 20.0), (50.0, 30.0), 0.0, True),  # better
])
def test_reader_decision(base, aligned, tolerance, promoted) -> None:
    d = gate.decide_reader(_validation(base, aligned), "auto", tolerance)
    assert d["promoted"] is promoted and d["reason"]
    assert d["base"]["hits@1"] == base[0] and d["aligned"]["f1"] == aligned[1]


def test_reader_that_forgets_closed_book_with_no_forgetting() -> None:
    v = _validation((50.0, 20.0), (55.0, 40.0))
    v["base"]["closed_book_hits@1"], v["selected"]["closed_book_hits@1"] = 30.0, 20.0
    assert gate.decide_reader(v, "auto")["promoted"] is True  # the full system answers with passages
    d = gate.decide_reader(v, "auto", no_forgetting=True)
    assert d["promoted"] is False and "closed-book Hits@1 20.0" in d["reason"]


def test_policies_and_missing_evidence() -> None:
    worse = _validation((50.0, 20.0), (10.0, 5.0))
    assert gate.decide_reader(worse, "always")["promoted"] is True
    assert gate.decide_reader(_validation((1.0, 1.0), (90.0, 90.0)), "never")["promoted"] is False
    unchecked = gate.decide_reader(None, "auto")
    assert unchecked["promoted"] is True and "unchecked" in unchecked["reason"]
    same = gate.decide_reader(_validation((50.0, 20.0), (50.0, 20.0), step=0), "auto")
    assert same["promoted"] is False and "starting weights" in same["reason"]
    ev = {"lists": "graded utility lists", "metric": "utility nDCG@3", "retriever": 0.8, "aligned": 0.7, "n_lists": 30}
    mrr = {"lists": "answer-ranking lists", "metric": "answer MRR", "retriever": 0.8, "aligned": 0.9, "n_lists": 90}
    assert gate.decide_reranker(ev, "auto")["promoted"] is False
    assert gate.decide_reranker({**ev, "aligned": 0.85}, "auto")["promoted"] is True
    worse_on_one = gate.decide_reranker([ev, mrr], "auto")
    assert worse_on_one["promoted"] is False and "utility nDCG@3 0.700" in worse_on_one["reason"]
    assert gate.decide_reranker([{**ev, "aligned": 0.8}, mrr], "auto")["promoted"] is True  # equal is not worse
    tiny = gate.decide_reranker([{**ev, "n_lists": 5}, mrr], "auto")  # 5 lists do not outvote 90
    assert tiny["promoted"] is True and "too few lists" in tiny["reason"]
    assert gate.decide_reranker(ev, "always")["promoted"] is True
    assert gate.decide_reranker(None, "auto")["promoted"] is True


def test_run_reads_the_step_files(tmp_path: Path) -> None:
    write_json(tmp_path / "sft" / "validation.json", _validation((50.0, 20.0), (40.0, 30.0)))
    write_json(tmp_path / "rr" / "utility_metrics.json", {
        "retriever order": {"ndcg@3": 0.70, "n_questions": 9}, "aligned reranker": {"ndcg@3": 0.75, "n_questions": 9}})
    out = gate.run(gate.PromoteConfig(reader_validation=tmp_path / "sft" / "validation.json",
                                      reranker_dir=tmp_path / "rr", out_dir=tmp_path / "promote"))
    decisions = json.loads(out.promotion.read_text())
    assert decisions["reader"]["promoted"] is False and decisions["reranker"]["promoted"] is True
    md = out.markdown.read_text()
    assert "| self-aligned reader | **no** | auto |" in md and "| aligned reranker | yes | auto |" in md
    # without graded lists: the answer-ranking MRR, with the retriever fusion the answer step uses
    write_json(tmp_path / "rr2" / "retrieval_metrics.json", {
        "retriever order": {"mrr": 0.8, "n_questions": 12}, "reranker": {"mrr": 0.6, "n_questions": 12},
        "reranker + retriever fusion (alpha=0.3, chosen on these questions)": {"mrr": 0.82, "n_questions": 12}})
    out = gate.run(gate.PromoteConfig(reranker_dir=tmp_path / "rr2", out_dir=tmp_path / "promote2"))
    d = json.loads(out.promotion.read_text())["reranker"]
    assert d["promoted"] is True and d["evidence"][0]["aligned"] == 0.82 and "fusion" in d["evidence"][0]["metric"]


def _pipeline(tmp_path: Path, **extra) -> PipelineConfig:
    return PipelineConfig.model_validate({
        "out_dir": str(tmp_path / "run"), "questions": str(sample_path("questions.jsonl")),
        "corpus": [str(sample_path("corpus.jsonl"))], "reader": {"backend": "fake", "model": "base-reader"},
        **extra})


@pytest.mark.parametrize(("reader", "reranker"), [(True, True), (False, True), (True, False), (False, False)])
def test_full_system_uses_only_promoted_parts(tmp_path: Path, reader: bool, reranker: bool) -> None:
    cfg = _pipeline(tmp_path)
    steps = {s.name: s for s in build_steps(cfg)}
    folders = {name: cfg.out_dir / name for name in steps}
    assert set(steps["answer-full"].deps) >= {"promote"} and steps["promote"].enabled
    decisions = {"reader": {"promoted": reader}, "reranker": {"promoted": reranker}}
    write_json(folders["promote"] / "promotion.json", decisions)
    full = steps["answer-full"].make_config(folders)
    assert full.retrieval.parent.name == ("rerank-eval" if reranker else "retrieve-eval")
    assert ("train-llm-sft" in full.model) is reader
    if not reader:
        assert full.model == "base-reader" and full.backend == "fake"
    # the rows that measure each trained component stay as they are
    assert "train-llm-sft" in steps["answer-aligned-reader"].make_config(folders).model
    assert steps["answer-reranker"].make_config(folders).retrieval.parent.name == "rerank-eval"


def test_pipeline_wires_the_gate_and_validation(tmp_path: Path) -> None:
    cfg = _pipeline(tmp_path, promote={"reader": "never"})
    steps = {s.name: s for s in build_steps(cfg)}
    folders = {name: cfg.out_dir / name for name in steps}
    p = steps["promote"].make_config(folders)
    assert (p.reader, p.reranker) == ("never", "auto")
    assert p.reader_validation == folders["train-llm-sft"] / "validation.json"
    data = steps["llm-data"].make_config(folders)
    assert data.valid_fraction == 0.2 and (data.template, data.chat) == ("qa", True)
    sft = steps["train-llm-sft"].make_config(folders)
    assert sft.valid == folders["llm-data"] / "valid.jsonl"
    assert (sft.valid_top_k, sft.valid_template, sft.valid_max_new_tokens) == (cfg.top_k, "qa", 32)
    off = _pipeline(tmp_path, sections={"llm_data": {"valid_fraction": 0.0}}, reranker=False)
    steps = {s.name: s for s in build_steps(off)}
    assert steps["train-llm-sft"].make_config(folders).valid is None
    assert steps["promote"].make_config(folders).reranker_dir is None


@pytest.mark.parametrize("bad", ["sometimes", {"reader": "never", "rerankr": "auto"}, {"reader": "maybe"}])
def test_a_bad_promote_setting_is_one_clear_error(tmp_path: Path, bad) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="expected one of auto, always, never, or a mapping"):
        _pipeline(tmp_path, promote=bad)
    assert _pipeline(tmp_path, promote={"reranker": "never"}).promote_policy("reader") == "auto"
