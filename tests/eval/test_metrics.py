"""Answer and ranking metrics (method.md §2.1), including the authors' 80 scored answer/gold pairs."""

from __future__ import annotations

import json
import math

import pytest

from dpa_rag.eval.metrics import (
    exact_match,
    f1,
    has_answer,
    hit,
    hit_at_k,
    hit_word,
    mrr,
    ndcg_at_k,
    normalize_answer,
    recall_at_k,
    score_answer,
)


def test_normalize_drops_case_punctuation_articles_and_spaces():
    assert normalize_answer("  The  Beatles! ") == "beatles"
    assert normalize_answer("A router, an apple.") == "router apple"
    # articles only as whole words
    assert normalize_answer("Theatre Anatomy") == "theatre anatomy"
    assert normalize_answer("") == ""


def test_tchaikovsky_partial_name_is_no_hit_but_half_f1():
    golds = ["Pyotr Ilyich Tchaikovsky"]
    assert hit("Tchaikovsky", golds) == 0
    assert f1("Tchaikovsky", golds) == pytest.approx(0.5)
    assert hit("Pyotr Ilyich Tchaikovsky.", golds) == 1


def test_sentence_containing_gold_year_hits_with_low_f1():
    pred = "The first time LeBron James went to the finals was in 2007."
    # normalised: first time lebron james went to finals was in 2007 -> 10 tokens, 1 overlap
    assert hit(pred, ["2007"]) == 1
    assert exact_match(pred, ["2007"]) == 0
    assert f1(pred, ["2007"]) == pytest.approx(2 * (1 / 10) * 1 / (1 / 10 + 1))
    assert f1(pred, ["2007"]) == pytest.approx(0.18, abs=0.005)


def test_articles_and_punctuation_do_not_matter():
    assert exact_match("the Eiffel Tower.", ["Eiffel tower"]) == 1
    assert f1("An apple", ["apple"]) == 1.0
    assert hit("U.S.A", ["usa"]) == 1


def test_empty_prediction_and_no_overlap_score_zero():
    assert hit("", ["Paris"]) == 0
    assert f1("", ["Paris"]) == 0.0
    assert exact_match("", ["Paris"]) == 0
    assert f1("London", ["Paris"]) == 0.0
    # a gold that normalises to nothing never matches (and never divides by zero)
    assert hit("anything", ["the"]) == 0
    assert f1("the", ["a"]) == 0.0
    assert f1("Paris", []) == 0.0


def test_multiple_golds_take_the_max():
    golds = ["Joe Pizzulo", "Leeza Miller", "Joe Pizzulo and Leeza Miller"]
    assert f1("Leeza Miller", golds) == 1.0
    assert f1("Joe Smith", golds) == pytest.approx(0.5)  # best is "Joe Pizzulo": P=R=1/2
    assert hit("sung by Leeza Miller", golds) == 1


def test_hit_is_substring_hit_word_is_whole_words():
    assert hit("north", ["no"]) == 1
    assert hit_word("north", ["no"]) == 0
    assert hit_word("no, never", ["no"]) == 1
    assert has_answer("Title: X Content: went north", ["no"]) is False
    assert has_answer("Title: X Content: said no to it", ["no"]) is True


def test_score_answer_bundles_all_metrics():
    s = score_answer("Tchaikovsky", ["Pyotr Ilyich Tchaikovsky", "Tchaikovsky"])
    assert s == {"hit": 1.0, "hit_word": 1.0, "em": 1.0, "f1": 1.0}
    s = score_answer("in 2007", ["2007"])
    assert s["hit"] == 1.0 and s["em"] == 0.0 and 0 < s["f1"] < 1


def _same_at_file_precision(ours: float, theirs: int | float) -> bool:
    """Equal after rounding ours to the decimals the file shows (an integer in the file must match exactly)."""
    if isinstance(theirs, int):
        return ours == theirs
    digits = len(repr(theirs).split(".")[1])
    return round(ours, digits) == theirs


@pytest.mark.parametrize("name", ["example_valid_dataset.jsonl", "example_test_dataset.jsonl"])
def test_reproduces_every_scored_pair_in_the_authors_files(shared_data, name):
    path = shared_data / "dpa-rag" / name
    pairs = 0
    mismatches = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            rec = json.loads(line)
            for side in ("before", "after"):
                scored = rec[side]
                ours_hit = hit(scored["answer"], rec["reference"])
                ours_f1 = f1(scored["answer"], rec["reference"])
                if ours_hit != scored["em"] or not _same_at_file_precision(ours_f1, scored["f1"]):
                    mismatches.append((lineno, side, scored, ours_hit, ours_f1))
                pairs += 1
    assert pairs == 40
    assert mismatches == []


def test_ranking_metrics_hand_cases():
    rel = [0, 1, 0, 1]
    assert recall_at_k(rel, 1) == 0.0
    assert recall_at_k(rel, 2) == 0.5
    assert recall_at_k(rel, 4) == 1.0
    assert recall_at_k(rel, 2, n_relevant=4) == 0.25
    assert recall_at_k([0, 0], 2) == 0.0
    assert hit_at_k(rel, 1) == 0.0 and hit_at_k(rel, 2) == 1.0
    assert mrr(rel) == 0.5
    assert mrr([0, 0, 1]) == pytest.approx(1 / 3)
    assert mrr([0, 0, 1], k=2) == 0.0
    assert mrr([]) == 0.0
    # nDCG: gains 1 at ranks 2 and 4 vs ideal at ranks 1 and 2
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(rel, 4) == pytest.approx(dcg / idcg)
    assert ndcg_at_k([1, 0, 0], 3) == 1.0
    assert ndcg_at_k([0, 0], 2) == 0.0
    assert ndcg_at_k([0, 2, 1], 3) == pytest.approx((2 / math.log2(3) + 1 / 2) / (2 + 1 / math.log2(3)))


def test_passage_has_answer_prefers_the_stored_flag() -> None:
    from dpa_rag.data.schema import Ctx
    from dpa_rag.eval.metrics import passage_has_answer

    holds = Ctx(id="a", title="Paris", text="the capital of france is paris")
    assert passage_has_answer(holds, ["Paris"]) is True
    assert passage_has_answer(holds, ["Lyon"]) is False
    assert passage_has_answer(holds.model_copy(update={"has_answer": False}), ["Paris"]) is False  # stored wins
    assert passage_has_answer(holds.model_copy(update={"has_answer": True}), ["Lyon"]) is True
