"""build-reranker-data for the reranker-effect study: graded records carry ``rank_gains`` (the listwise target), the
relevance-label control relabels only the training split, and ``limit_train`` gives nested training subsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpa_rag.data.schema import Preference
from dpa_rag.io import write_jsonl
from dpa_rag.mining.labels import ALIGNED, NEUTRAL, UNALIGNED
from dpa_rag.mining.reranker_data import GAINS_KEY, RerankerDataConfig, build_train_record, relevance_labels
from dpa_rag.mining.reranker_data import run as build


def _pref(i: int) -> dict:
    """Question i: the reader gains most from a passage WITHOUT the answer string (a paraphrase it can use), and
    loses from one that contains it (a misleading mention) — the reader's labels and relevance disagree."""
    def probe(rank: int, text: str, gain: float, cat: str, has_answer: bool) -> dict:
        return {"rank": rank, "ctx": {"id": f"p{i}-{rank}", "title": f"T{i}", "text": text, "has_answer": has_answer},
                "loglik": -3.0 + gain, "gain": gain, "category": cat}

    return {"id": f"q{i}", "question": f"question {i}?", "answers": [f"gold{i}"], "closed_book": {"loglik": -3.0},
            "probes": [probe(1, f"mentions gold{i} misleadingly", -1.0, UNALIGNED, True),
                       probe(2, f"useful paraphrase {i}", 2.0, ALIGNED, False),
                       probe(3, f"neutral text {i}", 0.1, NEUTRAL, False)]}


def test_graded_record_carries_gains_in_rank_list_order() -> None:
    pref = Preference.model_validate(_pref(0))
    record, _ = build_train_record(pref, 1, 1, 3, pool="ranked")
    assert record is not None
    assert record[GAINS_KEY] == [2.0, 0.1, -1.0]  # best first, aligned with rank_list
    assert "useful paraphrase" in record["rank_list"][0] and "misleadingly" in record["rank_list"][-1]
    from dpa_rag.data.reranker_records import RerankerTrainRecord
    from dpa_rag.reranker.losses.listwise import GAINS_KEY as LOSS_KEY
    from dpa_rag.reranker.losses.listwise import ListwiseLoss

    assert LOSS_KEY == GAINS_KEY  # the builder writes what the loss reads
    loaded = RerankerTrainRecord.model_validate({**record, "classification": {"text": record["positive"][0],
                                                                              "label": 1}})
    assert ListwiseLoss.check_record(loaded) is None


def test_relevance_labels_follow_has_answer_and_need_it() -> None:
    pref = relevance_labels(Preference.model_validate(_pref(0)))
    assert [(p.gain, p.category) for p in pref.probes] == [(1.0, ALIGNED), (0.0, UNALIGNED), (0.0, UNALIGNED)]
    raw = _pref(1)
    del raw["probes"][0]["ctx"]["has_answer"]
    with pytest.raises(ValueError, match="has_answer"):
        relevance_labels(Preference.model_validate(raw))


def test_relevance_control_relabels_train_only_and_limit_train_nests(tmp_path: Path) -> None:
    prefs = tmp_path / "preferences.jsonl"
    write_jsonl(prefs, [_pref(i) for i in range(20)])

    def make(name: str, **kw: object) -> tuple[list[dict], dict, list[str]]:
        out = build(RerankerDataConfig(preferences=prefs, out_dir=tmp_path / name, train_fraction=0.6,
                                       valid_fraction=0.2, test_fraction=0.2, rank_list_size=3, **kw))
        train = [json.loads(x) for x in out.train.read_text().splitlines()]
        return train, json.loads(out.stats.read_text()), out.test_lists.read_text().splitlines()

    reader, reader_stats, reader_lists = make("reader")
    relevance, stats, lists = make("relevance", labels="relevance")
    assert reader_stats["labels"] == "reader" and stats["labels"] == "relevance"
    assert len(reader) == len(relevance) == 12
    assert all("useful paraphrase" in r["positive"][0] for r in reader)
    assert all("misleadingly" in r["positive"][0] and r[GAINS_KEY][0] == 1.0 for r in relevance)
    assert lists == reader_lists  # held-out lists keep the reader's gains: both are judged alike
    assert all(c["gain"] != 1.0 for line in lists for c in json.loads(line)["ctxs"])

    small, small_stats, small_lists = make("small", limit_train=5)
    assert small_stats["split_questions"]["train"] == 5 and small_stats["train_questions_offered"] == 12
    assert {r["id"] for r in small} < {r["id"] for r in reader}
    middle, _, _ = make("middle", limit_train=9)
    assert {r["id"] for r in small} < {r["id"] for r in middle}  # nested: a learning curve adds questions
    assert small_lists == reader_lists


def test_ordered_split_keeps_held_out_lists_as_more_questions_are_mined(tmp_path: Path) -> None:
    def make(n: int, **kw: object) -> tuple[dict, list[str]]:
        prefs = tmp_path / f"prefs{n}.jsonl"
        write_jsonl(prefs, [_pref(i) for i in range(n)])
        out = build(RerankerDataConfig(preferences=prefs, out_dir=tmp_path / f"d{n}-{len(kw)}", rank_list_size=3,
                                       valid_questions=4, test_questions=5, **kw))
        return json.loads(out.splits.read_text()), out.test_lists.read_text().splitlines()

    few, few_lists = make(12)
    more, more_lists = make(30)
    assert few["valid"] == more["valid"] == [f"q{i}" for i in range(4)]
    assert few["test"] == more["test"] == [f"q{i}" for i in range(4, 9)] and few_lists == more_lists
    assert few["train"] == more["train"][:3] == ["q9", "q10", "q11"] and few["ordered"] is True
    prefix, _ = make(30, limit_train=3)
    assert prefix["train"] == few["train"]  # a learning curve's small set is the big set's prefix
    with pytest.raises(ValueError, match="nothing is left to train on"):
        make(9)
    with pytest.raises(ValueError, match="both valid_questions and test_questions"):
        RerankerDataConfig(preferences=tmp_path / "prefs12.jsonl", valid_questions=3)
