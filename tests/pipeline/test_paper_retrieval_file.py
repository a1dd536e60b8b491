"""Bring your own retrieval: the pipeline starts from a DPR-style (or FlashRAG) retrieval file, no index built."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpa_rag.config import ConfigError, load_config
from dpa_rag.data.loaders import load_corpus, load_questions
from dpa_rag.pipeline import PipelineConfig, run_pipeline, step_names
from dpa_rag.pipeline.check import check_pipeline
from dpa_rag.pipeline.import_retrieval import import_retrieval
from dpa_rag.sample import sample_path


def _dpr_file(path: Path, n: int = 20, k: int = 6, flashrag: bool = False) -> Path:
    """A top-k file in the DPR layout without ``has_answer`` (or FlashRAG's), from the bundled sample."""
    questions = load_questions(sample_path("questions.jsonl"))[:n]
    passages = load_corpus(sample_path("corpus.jsonl"))
    with path.open("w", encoding="utf-8") as fh:
        for i, q in enumerate(questions):
            docs = [passages[(i * 7 + j) % len(passages)] for j in range(k)]
            if flashrag:
                rec = {"id": q.id, "question": q.question, "golden_answers": q.answers,
                       "retrieval_result": [{"id": p.id, "contents": f'"{p.title}"\n{p.text}'} for p in docs]}
            else:
                rec = {"question": q.question, "answers": q.answers,
                       "ctxs": [{"id": p.id, "title": p.title, "text": p.text, "score": float(k - j)}
                                for j, p in enumerate(docs)]}
            fh.write(json.dumps(rec) + "\n")
    return path


def test_pipeline_from_a_retrieval_file_reaches_the_report(tmp_path):
    retrieval = _dpr_file(tmp_path / "dpr_top6.jsonl")
    cfg = load_config(PipelineConfig, None, {
        "out_dir": str(tmp_path / "run"), "retrieval_file": str(retrieval), "eval_fraction": 0.4,
        "retrieve_top_k": 5, "top_k": 2, "reader": {"backend": "fake", "batch_size": 8},
        "augmentation": False, "reranker": False, "train_llm": False,
        "sections": {"mine": {"ranks": [1, 3, 5]}},
    })
    names = step_names(cfg)
    assert "index" not in names and "retrieve-train" in names and "answer-file" in names
    assert check_pipeline(cfg).ok
    report = run_pipeline(cfg)
    assert report.name == "report.md" and report.exists()
    assert "given file" in report.read_text()
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert set(metrics) == {"closed_book", "retriever"}
    train = [json.loads(line) for line in (cfg.out_dir / "retrieve-train" / "retrieval.jsonl").open()]
    assert len(train) == 12 and all(len(r["ctxs"]) == 5 for r in train)
    assert all(isinstance(c["has_answer"], bool) for r in train for c in r["ctxs"])  # computed: the file had none
    assert not (cfg.out_dir / "index").exists()


def test_flashrag_layout_and_separate_eval_file(tmp_path):
    train = _dpr_file(tmp_path / "train.jsonl", n=10, flashrag=True)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"id": q.id, "question": q.question, "answers": q.answers}) + "\n"
                                 for q in load_questions(sample_path("questions.jsonl"))[:3]))
    records = import_retrieval(train, questions, top_k=4)
    assert [len(r.ctxs) for r in records] == [4, 4, 4]
    assert records[0].ctxs[0].title and "\n" not in records[0].ctxs[0].text
    cfg = load_config(PipelineConfig, None, {
        "out_dir": str(tmp_path / "run"), "retrieval_file": str(train), "eval_retrieval_file": str(train),
        "reader": {"backend": "fake"}, "augmentation": False, "reranker": False, "train_llm": False,
    })
    assert check_pipeline(cfg).ok


def test_missing_questions_and_corpus_rules(tmp_path):
    retrieval = _dpr_file(tmp_path / "r.jsonl", n=3)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "a question nobody retrieved", "answers": ["x"]}) + "\n")
    from dpa_rag.io import DataError

    with pytest.raises(DataError, match="no retrieval record for 1 of 1 questions"):
        import_retrieval(retrieval, other, top_k=5)
    with pytest.raises(ConfigError, match="give `questions`"):
        load_config(PipelineConfig, None, {"out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="give `corpus`"):
        load_config(PipelineConfig, None, {"retrieval_file": str(retrieval), "compare_retrievers": ["bm25"]})
