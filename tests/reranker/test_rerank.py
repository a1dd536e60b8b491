"""Reranker inference: scores equal a plain per-pair forward, output order and DPR format, the CLI command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpa_rag.data.loaders import load_retrieval
from dpa_rag.io import write_jsonl
from dpa_rag.reranker.model import load_reranker_model
from dpa_rag.reranker.rerank import Reranker

DOCS = [
    ("Paris", "paris is the capital city of france"),
    ("Nile", "the nile is a river in egypt"),
    ("Einstein", "einstein won the nobel prize in physics"),
    ("Paris", "paris is the capital city of france"),  # duplicate of rank 1: a tie
    ("Moon", "the moon"),
    ("Berlin", "berlin is the capital of germany and a city"),
]


@pytest.fixture(scope="module")
def model_dirs(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for head in ("single", "two-class"):
        d = tmp_path_factory.mktemp(head)
        torch.manual_seed(0)
        model, tok = load_reranker_model(str(tiny_bert_dir), head)  # type: ignore[arg-type]
        model.save_pretrained(d)
        tok.save_pretrained(d)
        out[head] = d
    return out


@pytest.fixture()
def retrieval_file(run_dir: Path) -> Path:
    rows = []
    for qi, q in enumerate(["what is the capital of france", "who won the nobel prize in physics"]):
        ctxs = [{"id": f"p{j}", "title": t, "text": x, "score": 100.0 - j, "has_answer": j == 0}
                for j, (t, x) in enumerate(DOCS)]
        rows.append({"id": f"q{qi}", "question": q, "answers": ["x"], "ctxs": ctxs})
    path = run_dir / "retrieval.jsonl"
    write_jsonl(path, rows)
    return path


def _plain_scores(path: Path, query: str, docs: list[str], two_class: bool) -> list[float]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    out = []
    with torch.no_grad():
        for d in docs:
            z = model(**tok(query, d, return_tensors="pt")).logits[0]
            out.append(float(torch.softmax(z, -1)[1]) if two_class else float(z[0]))
    return out


@pytest.mark.parametrize("head", ["single", "two-class"])
def test_scores_equal_plain_forward(model_dirs, head):
    docs = [f"Title: {t} Content: {x}" for t, x in DOCS]
    rr = Reranker(str(model_dirs[head]), device="cpu", dtype="fp32", batch_size=4)
    got = rr.score("what is the capital of france", docs)
    expected = _plain_scores(model_dirs[head], "what is the capital of france", docs, head == "two-class")
    assert got == pytest.approx(expected, abs=1e-5)
    if head == "two-class":
        assert all(0.0 <= s <= 1.0 for s in got)
        z1 = Reranker(str(model_dirs[head]), device="cpu", dtype="fp32", score="z1").score("q", docs[:2])
        assert z1 != pytest.approx(got[:2])


def test_rerank_order_and_format(model_dirs, retrieval_file):
    records = load_retrieval(retrieval_file)
    rr = Reranker(str(model_dirs["single"]), device="cpu", dtype="fp32", batch_size=3)
    out = rr.rerank(records, top_k=4)
    assert [r.id for r in out] == ["q0", "q1"]
    for rec, orig in zip(out, records, strict=True):
        assert len(rec.ctxs) == 4
        scores = [c.score for c in rec.ctxs]
        assert scores == sorted(scores, reverse=True)
        full = rr.score(orig.question, [c.render() for c in orig.ctxs])
        assert scores == pytest.approx(sorted(full, reverse=True)[:4], abs=1e-6)
        for c in rec.ctxs:
            extra = c.model_extra
            assert orig.ctxs[extra["retriever_rank"] - 1].id == c.id
            assert extra["retriever_score"] == 100.0 - (extra["retriever_rank"] - 1)
    # identical passages (ranks 1 and 4) tie exactly; the retriever order decides
    full_order = rr.rerank(records, top_k=None)
    for rec in full_order:
        ids = [c.id for c in rec.ctxs]
        by_id = {c.id: c.score for c in rec.ctxs}
        assert by_id["p0"] == by_id["p3"]
        assert ids.index("p0") < ids.index("p3")
        assert all(by_id[i] == by_id["p0"] for i in ids[ids.index("p0") : ids.index("p3")])
        ranks = [c.model_extra["retriever_rank"] for c in rec.ctxs]
        scores = [c.score for c in rec.ctxs]
        assert all(r1 < r2 for s1, s2, r1, r2 in zip(scores, scores[1:], ranks, ranks[1:], strict=False) if s1 == s2)


def test_rerank_command(model_dirs, retrieval_file, run_dir):
    from dpa_rag.cli.main import app

    out_dir = run_dir / "rr"
    args = ["rerank", "--input", str(retrieval_file), "--model", str(model_dirs["two-class"]),
            "--out-dir", str(out_dir), "--top-k", "3", "--device", "cpu", "--batch-size", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out_dir / "reranked.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q0", "q1"]
    for r in rows:
        assert set(r) >= {"id", "question", "answers", "ctxs"}
        assert len(r["ctxs"]) == 3
        assert {"id", "title", "text", "score", "has_answer", "retriever_score", "retriever_rank"} <= set(r["ctxs"][0])
    again = load_retrieval(out_dir / "reranked.jsonl")  # still a valid retrieval file
    assert len(again) == 2
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] == 2 * len(DOCS)


def test_bf16_mode_close_to_fp32(model_dirs):
    docs = [f"Title: {t} Content: {x}" for t, x in DOCS]
    fp32 = Reranker(str(model_dirs["single"]), device="cpu", dtype="fp32").score("capital of france", docs)
    bf16 = Reranker(str(model_dirs["single"]), device="cpu", dtype="bf16")
    assert bf16.model.dtype == torch.bfloat16
    assert bf16.score("capital of france", docs) == pytest.approx(fp32, abs=0.05)


def test_batch_size_defaults(model_dirs):
    from dpa_rag.reranker.rerank import CPU_BATCH_SIZE, predict_logits, resolve_batch_size

    assert resolve_batch_size(None, "cpu") == CPU_BATCH_SIZE == 16
    assert resolve_batch_size(None, "cuda:0") == 64 and resolve_batch_size(5, "cpu") == 5
    with pytest.raises(ValueError, match="batch_size"):
        resolve_batch_size(0, "cpu")
    assert Reranker(str(model_dirs["single"]), device="cpu", dtype="fp32").batch_size == CPU_BATCH_SIZE
    model, tok = load_reranker_model(str(model_dirs["single"]), "single")
    pairs = [("what is the capital of france", f"Title: {t} Content: {x}") for t, x in DOCS] * 7  # > 16 pairs
    pairs = [(q + " " * (i % 3), d) for i, (q, d) in enumerate(pairs)]  # distinct pairs (no dedupe)
    torch.testing.assert_close(predict_logits(model, tok, pairs), predict_logits(model, tok, pairs, batch_size=3),
                               atol=1e-5, rtol=1e-5)


def test_bad_dtype():
    from dpa_rag.reranker.rerank import resolve_dtype

    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", "cpu")


def test_evaluation_metrics_by_hand(model_dirs):
    from dpa_rag.data.reranker_records import RerankerPairRecord
    from dpa_rag.eval.ranking import ranking_metrics
    from dpa_rag.reranker.evaluation import PairEvaluator, classification_metrics

    m = classification_metrics([True, True, False, False], [True, False, True, False])
    assert m == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 0.5}
    assert classification_metrics([False, False], [True, False])["f1"] == 0.0  # P = R = 0: no division by zero
    r = ranking_metrics([[True, False, False], [True, True]], [[0.1, 0.9, 0.5], [2.0, 1.0]], ks=(1, 2), ndcg=True)
    assert r["mrr"] == pytest.approx((1 / 3 + 1) / 2)
    assert r["hit@1"] == pytest.approx(0.5) and r["hit@2"] == pytest.approx(0.5)
    assert r["ndcg@2"] == pytest.approx((0.0 + 1.0) / 2) and r["n_questions"] == 2.0

    def rec(q: str, ctx: str, cat: int) -> RerankerPairRecord:
        return RerankerPairRecord(question=q, reference=["x"], ctx=ctx, category=cat)

    records = [rec("q1", "paris", 1), rec("q1", "nile", 2), rec("q2", "moon", 2), rec("q3", "sun", 1)]
    rr = Reranker(str(model_dirs["two-class"]), device="cpu", dtype="fp32")
    out = PairEvaluator(records, batch_size=2, k_values=(1,))(rr.model, rr.tokenizer)
    assert out["n_pairs"] == 4 and out["n_questions"] == 1  # only q1 has >= 2 pairs with an aligned one
    assert {"precision", "recall", "f1", "accuracy", "mrr", "ndcg@1", "hit@1"} <= set(out)


def test_retrieval_metrics_orders():
    from dpa_rag.data.schema import Ctx, RetrievalRecord
    from dpa_rag.reranker.evaluation import answer_ranking_metrics

    recs = [RetrievalRecord(id="a", question="q", answers=[], ctxs=[Ctx(text="x", has_answer=False),
                                                                     Ctx(text="y", has_answer=True)]),
            RetrievalRecord(id="b", question="q2", answers=[], ctxs=[Ctx(text="z", has_answer=False)])]
    assert answer_ranking_metrics(recs) == {"mrr": 0.5, "hit@1": 0.0, "hit@3": 1.0, "n_questions": 1.0}
    assert answer_ranking_metrics(recs, [[0.0, 1.0], [0.0]])["mrr"] == 1.0
    assert answer_ranking_metrics(recs[1:]) == {"n_questions": 0.0}  # no answer-bearing passage: nothing to rank
