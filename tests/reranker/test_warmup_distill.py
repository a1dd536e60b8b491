"""Distilled relevance warm-up (method.md §13): a cross-encoder learns a bi-encoder's / BM25's order, no labels."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpa_rag.data.reranker_records import RerankerTrainRecord
from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.io import write_jsonl

PASSAGES = [
    "paris is the capital city of france",
    "berlin is the capital city of germany",
    "rome is the capital city of italy",
    "the nile is a river",
    "einstein won the nobel prize in physics",
    "shakespeare wrote a song",
    "the moon is not the sun",
    "tokyo is a city in japan",
]
QUESTIONS = [
    "what is the capital of france",
    "who won the nobel prize in physics",
    "which river is the nile",
    "what city is in japan",
]


def _retrieval_rows(questions: list[str], shift: int = 0) -> list[dict]:
    rows = []
    for i, q in enumerate(questions):
        docs = PASSAGES[(i + shift) % 3:] + PASSAGES[: (i + shift) % 3]  # every list holds all passages, rotated
        ctxs = [{"id": f"{i}-{j}", "title": "", "text": d, "score": float(-j), "has_answer": False}
                for j, d in enumerate(docs)]
        rows.append({"id": f"q{i}", "question": q, "answers": ["x"], "ctxs": ctxs})
    return rows


def _train_record(query: str) -> RerankerTrainRecord:
    return RerankerTrainRecord(query=query, classification={"text": PASSAGES[0], "label": 1},
                               rank_list=PASSAGES[:3], positive=PASSAGES[:1], negative=PASSAGES[1:2])


@pytest.fixture(scope="module")
def embedding_dir(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT saved as a sentence-transformers folder (mean pooling): an embedding backbone."""
    from dpa_rag.reranker.biencoder import load_biencoder

    out = tmp_path_factory.mktemp("tiny-st") / "model"
    load_biencoder(str(tiny_bert_dir)).save(out)
    return out


def test_kl_loss_equals_hand_computed():
    from dpa_rag.reranker.warmup import distill_kl_loss

    student = torch.tensor([1.0, 0.0, -1.0, 0.5, 0.5])
    teacher = torch.tensor([0.3, 0.1, 0.2, 0.9, 0.8])
    t = 0.1

    def kl(s: list[float], te: list[float]) -> float:
        zs = sum(math.exp(x) for x in s)
        zt = sum(math.exp(x / t) for x in te)
        p = [math.exp(x / t) / zt for x in te]
        q = [math.exp(x) / zs for x in s]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    expected = (kl([1.0, 0.0, -1.0], [0.3, 0.1, 0.2]) + kl([0.5, 0.5], [0.9, 0.8])) / 2
    assert distill_kl_loss(student, teacher, [3, 2], t).item() == pytest.approx(expected, rel=1e-5)
    # a student already at the teacher's distribution has zero loss
    same = torch.tensor([0.3, 0.1, 0.2]) / t + 7.0
    assert distill_kl_loss(same, torch.tensor([0.3, 0.1, 0.2]), [3], t).item() == pytest.approx(0.0, abs=1e-6)


def test_auto_target_resolves_by_backbone(tiny_bert_dir, embedding_dir, tmp_path):
    from dpa_rag.reranker.biencoder import is_embedding_model, load_biencoder
    from dpa_rag.reranker.warmup import resolve_warmup_target

    assert is_embedding_model(embedding_dir)
    assert resolve_warmup_target("auto", str(embedding_dir)) == "bi-encoder"
    plain_st = tmp_path / "plain-st"  # a sentence-transformers folder without the bi-encoder reranker's file
    load_biencoder(str(tiny_bert_dir)).st.save(str(plain_st))
    assert resolve_warmup_target("auto", str(plain_st)) == "bi-encoder"
    assert resolve_warmup_target("auto", str(tiny_bert_dir)) == "has-answer"
    assert resolve_warmup_target("auto", str(tiny_bert_dir), teacher=str(embedding_dir)) == "bi-encoder"
    assert resolve_warmup_target("bm25", str(embedding_dir)) == "bm25"
    with pytest.raises(ValueError, match="warm-up target"):
        resolve_warmup_target("labels", str(tiny_bert_dir))


def test_held_out_questions_are_excluded():
    from dpa_rag.reranker.warmup import select_distill_questions

    retrieval = [RetrievalRecord(**r) for r in _retrieval_rows(QUESTIONS + ["What is the capital of France?"])]
    train = [_train_record(QUESTIONS[0]), _train_record("a question without retrieval")]
    # QUESTIONS[0]: a training query (kept even though eval has it); QUESTIONS[1]: held out (eval, not trained on)
    evals = [RetrievalRecord(**r) for r in _retrieval_rows([QUESTIONS[0], QUESTIONS[1]])]
    kept, counts = select_distill_questions(retrieval, train, evals)
    assert [r.question for r in kept] == [QUESTIONS[0], QUESTIONS[2], QUESTIONS[3]]
    assert counts == {"questions": 5, "held_out_excluded": 1, "repeated": 1, "short_lists": 0,
                      "training_queries": 1, "kept": 3}
    kept, counts = select_distill_questions(retrieval, train, None)  # no eval file: every question once
    assert len(kept) == 4 and counts["held_out_excluded"] == 0


def test_list_selection_keeps_teacher_top_half():
    from dpa_rag.reranker.warmup import build_distill_examples

    rec = RetrievalRecord(**_retrieval_rows(QUESTIONS[:1])[0])
    scores = [[float(j % 5) for j in range(len(rec.ctxs))]]  # teacher's best: indices 4, 3 (ties: list order)
    ex = build_distill_examples([rec], scores, list_size=4, seed=0)[0]
    assert len(ex.passages) == 4 and len(ex.teacher) == 4
    assert rec.ctxs[4].render() in ex.passages and rec.ctxs[3].render() in ex.passages
    full = build_distill_examples([rec], scores, list_size=8)[0]
    assert full.passages == [c.render() for c in rec.ctxs] and full.teacher == scores[0]


def _agreement(model, tok, examples) -> tuple[float, float]:
    """Mean Spearman correlation with the teacher, and the fraction of passage pairs the teacher orders (distinct
    scores) that the model orders the same way, over the lists."""
    from scipy.stats import spearmanr

    from dpa_rag.reranker.model import inference_scores
    from dpa_rag.reranker.rerank import predict_logits

    rhos, agree, pairs = [], 0, 0
    for ex in examples:
        s = inference_scores(predict_logits(model, tok, [(ex.query, p) for p in ex.passages], 16, 64)).tolist()
        rhos.append(spearmanr(s, ex.teacher).statistic)
        for i in range(len(s)):
            for j in range(len(s)):
                if ex.teacher[i] > ex.teacher[j] + 1e-9:
                    pairs += 1
                    agree += s[i] > s[j]
    return sum(rhos) / len(rhos), agree / pairs


@pytest.mark.parametrize("target", ["bm25", "bi-encoder"])
def test_warmup_increases_agreement_with_teacher(tiny_bert_dir, embedding_dir, run_dir, target):
    from dpa_rag.reranker import warmup as wu
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.model import load_reranker_model
    from dpa_rag.reranker.train import _relevance_warmup

    torch.manual_seed(0)
    path = run_dir / "warm.jsonl"
    write_jsonl(path, _retrieval_rows(QUESTIONS))
    records = [RetrievalRecord(**r) for r in _retrieval_rows(QUESTIONS)]
    if target == "bm25":
        scores = wu.bm25_teacher_scores(records)
    else:
        scores = wu.bi_encoder_teacher_scores(str(embedding_dir), records, 64)
    examples = wu.build_distill_examples(records, scores, list_size=8)
    model, tok = load_reranker_model(str(tiny_bert_dir))
    rho0, pairs0 = _agreement(model, tok, examples)
    cfg = TrainRerankerConfig(
        backbone=str(embedding_dir) if target == "bi-encoder" else str(tiny_bert_dir), warmup_target=target,
        warmup_retrieval=str(path), warmup_lr=2e-3, warmup_epochs=40, batch_size=2, max_length=64,
        fast_dropout=False, out_dir=str(run_dir / "out"),
        warmup_temperature=0.01 if target == "bi-encoder" else None,  # the random tiny encoder's cosines are close
    )
    stats = _relevance_warmup(cfg, model, tok, [_train_record(QUESTIONS[0])], run_dir / "out", use_cpu=True)
    rho1, pairs1 = _agreement(model, tok, examples)
    assert stats["target"] == target and stats["examples"] == 4 and stats["steps"] == 80
    assert stats["questions"]["kept"] == 4 and stats["questions"]["training_queries"] == 1
    assert stats["temperature"] == (0.01 if target == "bi-encoder" else 1.0)
    assert stats["last_loss"] < stats["first_loss"]
    assert rho1 > rho0 + 0.2 and pairs1 > pairs0 + 0.1, (rho0, rho1, pairs0, pairs1)


def test_train_reranker_distills_on_embedding_backbone(embedding_dir, run_dir):
    """kind cross-encoder on an embedding backbone: auto warm-up = bi-encoder distillation, held-out excluded, and the
    ranking report keeps its "after relevance warm-up" row."""
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import run as train_reranker

    train_file = run_dir / "train.jsonl"
    write_jsonl(train_file, [_train_record(q).model_dump() for q in QUESTIONS[:2]])
    warm = run_dir / "warm.jsonl"
    write_jsonl(warm, _retrieval_rows(QUESTIONS + ["where is tokyo"]))
    evalr = run_dir / "evalr.jsonl"
    rows = _retrieval_rows([QUESTIONS[0], QUESTIONS[2], "where is tokyo"], shift=1)
    for r in rows:
        r["ctxs"][1]["has_answer"] = True
    write_jsonl(evalr, rows)
    out = train_reranker(TrainRerankerConfig(
        train=str(train_file), out_dir=str(run_dir / "rr"), backbone=str(embedding_dir), kind="cross-encoder",
        max_steps=1, max_length=64, warmup_retrieval=str(warm), eval_retrieval=str(evalr), weighting="equal",
        batch_size=2,
    ))
    log = json.loads(out.train_log.read_text())
    w = log["warmup"]
    assert log["kind"] == "cross-encoder" and w["target"] == "bi-encoder" and w["teacher"] == str(embedding_dir)
    # QUESTIONS[2] and "where is tokyo" are held out (eval, not training queries); QUESTIONS[0,1,3] are used
    assert w["questions"]["held_out_excluded"] == 2 and w["questions"]["kept"] == 3 and w["examples"] == 3
    assert w["temperature"] == 0.05 and w["list_size"] == 8
    report = json.loads(out.retrieval_metrics.read_text())
    assert list(report)[:4] == ["retriever order", "backbone (untrained)", "after relevance warm-up", "reranker"]
    assert report["retriever order"]["n_questions"] == 2
    assert "Relevance warm-up" in (out.model / "README.md").read_text()
