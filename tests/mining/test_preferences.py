"""The typed preference records (``data.schema.Preference``/``Probe``/``ClosedBook``) and passages given to prompts
as objects: mined files round-trip byte for byte, bad lines are named, prompt text is unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import pytest

from dpa_rag.data.schema import Category, ClosedBook, Ctx, Passage, Preference, Probe
from dpa_rag.generation.fake import FakeGenerator
from dpa_rag.io import DataError, write_jsonl
from dpa_rag.mining.common import load_preferences, relabel
from dpa_rag.mining.labels import CATEGORIES, categorize
from dpa_rag.mining.mine import MineConfig, run
from dpa_rag.mining.prompts import judge_prompt, qa_prompt
from dpa_rag.prompts import load_template

NAMES = ["Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo"]


def _retrieval(path: Path, n: int = 6) -> Path:
    rows = []
    for i in range(n):
        gold, wrong = NAMES[i % len(NAMES)], NAMES[(i + 1) % len(NAMES)]
        ctxs = [{"id": f"p{i}{j}", "title": f"Doc {i} {j}" if j else "",  # rank 1 has no title
                 "text": f"{gold if j % 2 == i % 2 else wrong} is the city, note {j}.", "score": 10.0 - j,
                 "has_answer": j % 2 == i % 2, "extra_key": "not kept"} for j in range(4)]
        rows.append({"id": f"q{i}", "question": f"what is city number {i}", "answers": [gold, f"{gold} city"],
                     "ctxs": ctxs, **({"origin_id": "q0"} if i == 5 else {})})
    write_jsonl(path, rows)
    return path


def _reader(text: str) -> str:
    """Closed-book right for even question numbers; with a passage: its first city name."""
    if "Passages:" in text:
        return next(w.strip(".,") for w in text.split("Passages:")[1].split() if w.strip(".,") in NAMES)
    i = int(text.split("city number ")[1].split()[0])
    return NAMES[i % len(NAMES)] if i % 2 == 0 else "unknown"


def _mine(tmp: Path, name: str, **kw: object) -> Path:
    cfg = MineConfig(retrieval=_retrieval(tmp / "ret.jsonl"), out_dir=tmp / name, backend="fake",
                     cache_dir=tmp / f"cache-{name}", ranks=[1, 2, 3, 4], progress=False, **kw)
    run(cfg, backend=None if kw.get("label_rule") == "loglik" else FakeGenerator(fn=_reader))
    return Path(cfg.out_dir) / "preferences.jsonl"


@pytest.mark.parametrize("kw", [{"label_rule": "hit"}, {"label_rule": "f1-delta"},
                                {"label_rule": "loglik", "agreement_questions": 3}])
def test_mined_file_round_trips_byte_for_byte(tmp_path: Path, kw: dict) -> None:
    path = _mine(tmp_path, "mine", **kw)
    prefs = load_preferences(path.parent)
    assert all(isinstance(p, Preference) for p in prefs) and len(prefs) == 6
    assert prefs[5].origin_id == "q0" and prefs[0].origin_id is None
    assert all("extra_key" not in p.ctx.model_dump() for pref in prefs for p in pref.probes)
    again = tmp_path / "again.jsonl"
    write_jsonl(again, prefs)
    assert again.read_bytes() == path.read_bytes()
    assert [json.dumps(p.dump(), ensure_ascii=False) for p in prefs] == path.read_text(encoding="utf-8").splitlines()
    if kw["label_rule"] == "loglik":
        assert all(p.graded for p in prefs)
        # every question is answered closed-book; only the agreement questions' probes are answered too
        assert all(p.closed_book.answer is not None for p in prefs)
        assert prefs[0].probes[0].answer is not None and prefs[4].probes[0].answer is None
        first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
        assert list(first["closed_book"]) == ["loglik", "answer", "hit", "f1", "raw"]
        assert list(first["probes"][0]) == ["rank", "ctx", "loglik", "gain", "category", "answer", "hit", "f1",
                                            "hit_category"]
    else:
        assert not any(p.graded for p in prefs)
        first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
        assert list(first) == ["id", "question", "answers", "closed_book", "probes"]
        assert list(first["probes"][0]) == ["rank", "ctx", "answer", "hit", "f1", "category"]
        assert list(first["probes"][0]["ctx"]) == ["id", "title", "text", "score", "has_answer"]
        for pref in prefs:  # categorize reads the typed records like the stored dicts
            for probe, raw in zip(pref.probes, json.loads(pref.model_dump_json())["probes"], strict=True):
                assert categorize(pref.closed_book, probe, kw["label_rule"]) == probe.category
                assert categorize(pref.closed_book.model_dump(exclude_none=True), raw, kw["label_rule"]) \
                    == probe.category


def test_relabel_returns_typed_copies(tmp_path: Path) -> None:
    prefs = load_preferences(_mine(tmp_path, "mine", label_rule="hit"))
    before = [p.model_copy(deep=True) for p in prefs]
    relabelled = relabel(prefs, "f1-delta")
    assert prefs == before  # the inputs are untouched
    assert all(isinstance(p, Preference) for p in relabelled)
    for p in relabelled:
        assert all(pr.category == categorize(p.closed_book, pr, "f1-delta") for pr in p.probes)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = {"id": "q1", "question": "q?", "answers": ["a"], "closed_book": {"answer": "a", "hit": 1, "f1": 1.0},
        "probes": [{"rank": 1, "ctx": {"id": "p", "title": "", "text": "a"}, "answer": "a", "hit": 1, "f1": 1.0,
                    "category": "both_correct"}]}


@pytest.mark.parametrize(("bad", "match"), [
    ({**GOOD, "probes": [{**GOOD["probes"][0], "category": 1}]}, r"p\.jsonl:2: not a preference record: "
                                                                 r"probes\.0\.category: Input should be 'aligned'"),
    ({k: v for k, v in GOOD.items() if k != "probes"}, r"p\.jsonl:2: not a preference record: probes: Field required"),
    ({**GOOD, "probes": [{**GOOD["probes"][0], "ctx": {"title": "t"}}]}, r"p\.jsonl:2: .*probes\.0\.ctx\.text"),
    ({**GOOD, "probes": [{**GOOD["probes"][0], "rank": 0}]}, r"p\.jsonl:2: .*probes\.0\.rank"),
    ({**GOOD, "answers": "a"}, r"p\.jsonl:2: .*answers: Input should be a valid list"),
    (GOOD, r"p\.jsonl:2: duplicate question id 'q1'"),
])
def test_bad_preference_lines_are_named(tmp_path: Path, bad: dict, match: str) -> None:
    path = _write(tmp_path / "p.jsonl", [json.dumps(GOOD), json.dumps(bad)])
    with pytest.raises(DataError, match=match):
        load_preferences(path)


def test_empty_and_missing_preference_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no preference records"):
        load_preferences(_write(tmp_path / "p.jsonl", []))
    with pytest.raises(FileNotFoundError, match="dpa-rag mine"):
        load_preferences(tmp_path / "nope")


def test_record_types() -> None:
    assert get_args(Category) == CATEGORIES
    pref = Preference.model_validate({**GOOD, "id": 7, "note": "kept"})
    assert pref.id == "7" and pref.model_extra == {"note": "kept"}
    assert pref.dump()["note"] == "kept" and "origin_id" not in pref.dump()
    probe = Probe(rank=3, ctx=Ctx(id="p", title="T", text="x"), loglik=-1.0, gain=0.25, category="neutral")
    assert list(probe.model_dump(exclude_none=True)) == ["rank", "ctx", "loglik", "gain", "category"]
    assert probe.render() == "Title: T Content: x"
    assert ClosedBook(loglik=float("-inf")).model_dump(exclude_none=True) == {"loglik": float("-inf")}
    with pytest.raises(ValueError, match="category"):
        Probe(rank=1, ctx=Ctx(text="x"), category="helpful")


# ---------------------------------------------------------------- passages go to the prompts as objects

TITLED = Ctx(id="p1", title=" Hamlet ", text="A tragedy by William Shakespeare. ")
UNTITLED = Passage(id="p2", title="", text="No title here.")
SYSTEM = ("Answer the question with a short phrase (a few words), using the passages or your own knowledge. "
          "Do not explain.")


def test_qa_prompt_text_with_and_without_title_is_unchanged() -> None:
    expected = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Passages:\n[1] Hamlet: A tragedy by William Shakespeare.\n"
                                            "[2] No title here.\n\nQuestion: who wrote hamlet\nAnswer:"}]
    assert qa_prompt("who wrote hamlet ", [TITLED, UNTITLED]) == expected
    # the rendered strings the stages passed before give the same text
    assert qa_prompt("who wrote hamlet", [TITLED.render(), UNTITLED.render()]) == expected
    assert qa_prompt("who wrote hamlet", [UNTITLED])[1]["content"] == (
        "Passages:\n[1] No title here.\n\nQuestion: who wrote hamlet\nAnswer:")
    assert load_template("dpa").user_message("who?", [TITLED, UNTITLED]) == (
        "Given the following information:\n[1] Title: Hamlet Content: A tragedy by William Shakespeare.\n"
        "[2] No title here.\n\nAnswer the question briefly, with a short phrase, based on the given information or "
        "your own knowledge. Do not mention where the answer comes from.\nQuestion: who?\nAnswer:")


def test_judge_prompt_text_with_and_without_title_is_unchanged() -> None:
    # the judgement task has its own system prompt (judging a passage is not answering the question)
    judge_system = ("Judge whether a passage is useful for answering the question: Positive if it helps you answer "
                    "correctly, Negative if it misleads you.")
    expected = [{"role": "system", "content": judge_system},
                {"role": "user", "content": "Passages:\n[1] Title: Hamlet Content: A tragedy by William Shakespeare.\n"
                                            "[2] No title here.\n\nQuestion: who wrote hamlet\n\nIs passage [2] "
                                            "positive knowledge (it helps you answer the question correctly) or "
                                            "negative knowledge (it misleads you) for this question? Answer with "
                                            "Positive or Negative."}]
    assert judge_prompt("who wrote hamlet", [TITLED, UNTITLED], 2) == expected
    assert judge_prompt("who wrote hamlet", [TITLED.render(), UNTITLED.render()], 2) == expected
