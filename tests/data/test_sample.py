"""The bundled demo sample: questions, corpus and the passage-kind sidecar are consistent with each other."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from dpa_rag.data.loaders import load_corpus, load_questions
from dpa_rag.eval.metrics import has_answer
from dpa_rag.sample import SAMPLE_DIR, sample_path

_KIND = re.compile(r"^(gold|distractor|misleading):(s\d{3})$")


@pytest.fixture(scope="module")
def questions():
    return load_questions(sample_path("questions.jsonl"))


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(sample_path("corpus.jsonl"), dedup=False)


@pytest.fixture(scope="module")
def kinds() -> dict[str, str]:
    return json.loads((SAMPLE_DIR / "passage_kinds.json").read_text(encoding="utf-8"))


def _lines(name: str) -> list[str]:
    return [ln for ln in sample_path(name).read_text(encoding="utf-8").splitlines() if ln.strip()]


def test_questions_shape(questions):
    assert len(questions) == 100
    assert len(_lines("questions.jsonl")) == 100
    ids = [q.id for q in questions]
    assert len(set(ids)) == len(ids)
    for q in questions:
        assert q.question.strip()
        assert q.answers, q.id
        assert all(a.strip() for a in q.answers), q.id


def test_every_passage_parses(corpus):
    raw = [json.loads(ln) for ln in _lines("corpus.jsonl")]
    assert len(corpus) == len(raw)
    assert [p.id for p in corpus] == [r["id"] for r in raw]
    assert len({p.id for p in corpus}) == len(corpus)
    assert len({(p.title, p.text) for p in corpus}) == len(corpus), "duplicate passages"
    for p in corpus:
        assert p.title.strip() and p.text.strip(), p.id


def test_passage_ids_match_sidecar(corpus, kinds):
    assert {p.id for p in corpus} == set(kinds)
    for pid, kind in kinds.items():
        assert kind == "filler" or _KIND.match(kind), (pid, kind)


def test_kind_counts(questions, kinds):
    qids = {q.id for q in questions}
    counts = Counter(kinds.values())
    gold = Counter(k.split(":")[1] for k in kinds.values() if k.startswith("gold:"))
    assert set(gold) == qids and set(gold.values()) == {1}, "exactly one gold passage per question"
    dist = Counter(k.split(":")[1] for k in kinds.values() if k.startswith("distractor:"))
    assert set(dist) == qids and set(dist.values()) <= {1, 2}, "one or two distractors per question"
    mis = Counter(k.split(":")[1] for k in kinds.values() if k.startswith("misleading:"))
    assert set(mis) <= qids and set(mis.values()) == {1}
    assert 30 <= len(mis) <= 50
    assert 20 <= counts["filler"] <= 40


def test_gold_passages_contain_an_answer(questions, corpus, kinds):
    by_id = {p.id: p for p in corpus}
    answers = {q.id: q.answers for q in questions}
    for pid, kind in kinds.items():
        if kind.startswith("gold:"):
            qid = kind.split(":")[1]
            assert has_answer(by_id[pid].text, answers[qid]), (pid, qid, answers[qid])


def test_distractors_and_misleading_do_not_contain_an_answer(questions, corpus, kinds):
    by_id = {p.id: p for p in corpus}
    answers = {q.id: q.answers for q in questions}
    for pid, kind in kinds.items():
        if kind.startswith(("distractor:", "misleading:")):
            qid = kind.split(":")[1]
            p = by_id[pid]
            assert not has_answer(p.text, answers[qid]), (pid, kind, answers[qid])
            assert not has_answer(p.title, answers[qid]), (pid, kind, answers[qid])


def test_word_counts(corpus):
    for p in corpus:
        n = len(p.text.split())
        assert 40 <= n <= 130, (p.id, n)


def test_order_is_shuffled(questions, kinds):
    # gold passages must not simply follow the question order
    gold_order = [k.split(":")[1] for k in kinds.values() if k.startswith("gold:")]
    assert gold_order != sorted(gold_order)


def test_demo_questions_interleave_both_splits_and_are_stable(tmp_path):
    import json

    from dpa_rag.sample import SPLITS, write_demo_questions

    path = write_demo_questions(tmp_path / "q.jsonl")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    counts = {c: sum(r["category"] == c for r in rows) for c in SPLITS}
    assert counts == {c: len(p.read_text(encoding="utf-8").splitlines()) for c, p in SPLITS.items()}
    assert [r["category"] for r in rows[:4]] == ["well-known", "invented", "well-known", "invented"]
    assert len({r["id"] for r in rows}) == len(rows)
    before = path.stat().st_mtime_ns
    write_demo_questions(path)  # same content: not rewritten, so a repeated demo keeps its manifests
    assert path.stat().st_mtime_ns == before
