"""Reranker and LLM data builders: group rules, graded rank lists, splits, the authors' formats, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from dpa_rag.data.reranker_records import load_reranker_pairs, load_reranker_train
from dpa_rag.data.schema import Preference
from dpa_rag.io import write_jsonl
from dpa_rag.mining.labels import ALIGNED, BOTH_CORRECT, BOTH_WRONG, UNALIGNED
from dpa_rag.mining.llm_data import LLMDataConfig, prealign_example
from dpa_rag.mining.llm_data import run as run_llm
from dpa_rag.mining.reranker_data import (
    RerankerDataConfig,
    assign_classification,
    build_train_record,
    check_group_sizes,
    graded_order,
    render_probe,
    spread,
)
from dpa_rag.mining.reranker_data import run as run_reranker


def probe(rank: int, category: str, f1: float, text: str | None = None, title: str = "T") -> dict[str, Any]:
    text = text or f"passage at rank {rank}"
    return {"rank": rank, "ctx": {"id": f"p{rank}-{text[:8]}", "title": title, "text": text}, "answer": "x",
            "hit": int(f1 == 1.0), "f1": f1, "category": category}


def pref(qid: str, probes: list[dict[str, Any]], cb_f1: float = 0.5, question: str | None = None) -> Preference:
    return Preference.model_validate(
        {"id": qid, "question": question or f"question {qid}", "answers": [f"gold {qid}", "alias"],
         "closed_book": {"answer": "cb", "hit": int(cb_f1 == 1.0), "f1": cb_f1}, "probes": probes})


def mixed_pref(qid: str) -> Preference:
    """Before F1 0.5; two aligned (F1 1.0 at rank 50, 0.8 at rank 1), one both-wrong, two unaligned."""
    return pref(qid, [
        probe(1, ALIGNED, 0.8, f"{qid} aligned small gain"),
        probe(25, UNALIGNED, 0.0, f"{qid} unaligned big loss"),
        probe(50, ALIGNED, 1.0, f"{qid} aligned big gain"),
        probe(75, BOTH_WRONG, 0.5, f"{qid} both wrong"),
        probe(100, UNALIGNED, 0.25, f"{qid} unaligned small loss"),
    ])


# ---------------------------------------------------------------- group rules


@pytest.mark.parametrize(("args", "name"), [((0, 2, 4), "n_positive"), ((2, 0, 4), "n_negative"),
                                            ((2, 2, 1), "rank_list_size")])
def test_group_sizes_are_validated(args: tuple[int, int, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        check_group_sizes(*args)
    with pytest.raises(ValueError, match=name):
        build_train_record(mixed_pref("q"), *args)
    with pytest.raises(ValidationError):
        RerankerDataConfig(preferences=Path("p.jsonl"), **dict(zip(("n_positive", "n_negative", "rank_list_size"),
                                                                    args, strict=True)))


def test_graded_order_and_spread() -> None:
    p = pref("q", [
        probe(100, UNALIGNED, 0.4, "u small loss"), probe(3, BOTH_WRONG, 0.5, "bw 3"),
        probe(2, UNALIGNED, 0.0, "u big loss"), probe(7, BOTH_CORRECT, 0.5, "bc 7"),
        probe(9, ALIGNED, 0.6, "a small"), probe(1, BOTH_WRONG, 0.5, "bw 1"), probe(4, ALIGNED, 1.0, "a big"),
    ])
    assert [x.ctx.text for x in graded_order(p)] == [
        "a big", "a small", "bc 7", "bw 1", "bw 3", "u small loss", "u big loss"]
    assert spread(list(range(7)), 4) == [0, 2, 4, 6]
    assert spread(list(range(4)), 4) == [0, 1, 2, 3]
    assert spread(["a", "b"], 4) == ["a", "a", "b", "b"]
    with pytest.raises(ValueError):
        spread([], 2)


def test_train_record_groups() -> None:
    rec, info = build_train_record(mixed_pref("q"), 2, 2, 4)
    assert rec is not None and info["conflicts"] == 0
    assert rec["positive"] == ["Title: T Content: q aligned big gain", "Title: T Content: q aligned small gain"]
    assert rec["negative"] == ["Title: T Content: q unaligned big loss", "Title: T Content: q unaligned small loss"]
    # 5 graded passages, 4 spanning them: best and worst kept, order = preference
    assert rec["rank_list"][0] == rec["positive"][0] and rec["rank_list"][-1] == rec["negative"][0]
    assert len(set(rec["rank_list"])) == 4
    assert not info["padded_positive"] and not info["padded_rank_list"]
    # larger groups are filled from the question's own pool, never from elsewhere
    rec3, info3 = build_train_record(mixed_pref("q"), 3, 1, 6)
    assert rec3 is not None and info3["padded_positive"] and info3["padded_rank_list"]
    assert set(rec3["positive"]) == set(rec["positive"]) and len(rec3["positive"]) == 3
    own = {render_probe(p) for p in mixed_pref("q").probes}
    assert len(rec3["rank_list"]) == 6 and set(rec3["rank_list"]) <= own


def test_never_positive_and_negative_and_drops() -> None:
    same = "one passage that both helped and hurt"
    p = pref("q", [probe(1, ALIGNED, 1.0, same), probe(5, UNALIGNED, 0.0, same), probe(9, UNALIGNED, 0.0, "other")])
    rec, info = build_train_record(p, 2, 2, 4)
    assert rec is not None and info["conflicts"] == 1
    assert not set(rec["positive"]) & set(rec["negative"])
    assert rec["negative"] == ["Title: T Content: other"] * 2
    only_conflict = pref("q", [probe(1, ALIGNED, 1.0, same), probe(5, UNALIGNED, 0.0, same)])
    assert build_train_record(only_conflict)[1]["drop"] == "no_negative"
    no_pos = pref("q", [probe(1, UNALIGNED, 0.0), probe(2, BOTH_CORRECT, 1.0)], cb_f1=1.0)
    assert build_train_record(no_pos)[1]["drop"] == "no_positive"
    assert build_train_record(pref("q", [probe(1, BOTH_WRONG, 0.0)]))[1]["drop"] == "no_positive_nor_negative"
    # graded pools fill the missing side from the middle grades (the hit rule never mixes sides)
    rec_g, info_g = build_train_record(no_pos, 2, 2, 4, pool="graded")
    assert rec_g is not None and info_g["borrowed_positive"]
    assert rec_g["positive"] == [render_probe(no_pos.probes[1])] * 2


def test_classification_balanced_and_seeded() -> None:
    recs = [build_train_record(mixed_pref(f"q{i}"))[0] for i in range(9)]
    assign_classification(recs, seed=1)
    labels = [r["classification"]["label"] for r in recs]
    assert sorted(labels) == [1] * 5 + [2] * 4
    for r in recs:
        side = r["positive"] if r["classification"]["label"] == 1 else r["negative"]
        assert r["classification"]["text"] == side[0]
    again = [build_train_record(mixed_pref(f"q{i}"))[0] for i in range(9)]
    assign_classification(again, seed=1)
    assert [r["classification"] for r in again] == [r["classification"] for r in recs]


# ---------------------------------------------------------------- the reranker stage end to end


def _write_inputs(tmp: Path, n: int = 20) -> tuple[Path, Path, Path]:
    prefs = [mixed_pref(f"q{i}") for i in range(n - 2)]
    prefs.append(pref(f"q{n - 2}", [probe(1, BOTH_WRONG, 0.0, "nothing helps")], cb_f1=0.0))
    prefs.append(pref(f"q{n - 1}", [probe(1, ALIGNED, 1.0, "only helps")], cb_f1=0.0))
    pref_path = tmp / "mine" / "preferences.jsonl"
    write_jsonl(pref_path, prefs)
    aug = [{"id": f"q{i}-r{s}", "question": f"rewrite {s} of q{i}", "origin_id": f"q{i}", "strategy": s}
           for i in range(0, n, 3) for s in ("rephrase", "complex")]
    aug.append({"id": "orphan-r", "question": "a rewrite of nothing", "origin_id": "nope", "strategy": "rephrase"})
    aug_path = tmp / "augmented.jsonl"
    write_jsonl(aug_path, aug)
    retrieval = [{"id": p.id, "question": p.question, "answers": p.answers,
                  "ctxs": [{"title": "R", "text": f"{p.id} retrieved {j}"} for j in range(6)]} for p in prefs]
    ret_path = tmp / "retrieval.jsonl"
    write_jsonl(ret_path, retrieval)
    (tmp / "mine" / "config.yaml").write_text(f"retrieval: {ret_path}\n", encoding="utf-8")
    return pref_path, aug_path, ret_path


def test_build_reranker_data(tmp_path: Path) -> None:
    pref_path, aug_path, _ = _write_inputs(tmp_path)
    cfg = RerankerDataConfig(preferences=pref_path.parent, out_dir=tmp_path / "rr", include_augmented=aug_path,
                             train_fraction=0.6, valid_fraction=0.2, test_fraction=0.2, seed=3)
    out = run_reranker(cfg)
    splits = json.loads(out.splits.read_text())
    sets = {s: set(splits[s]) for s in ("train", "valid", "test")}
    assert not (sets["train"] & sets["valid"] or sets["train"] & sets["test"] or sets["valid"] & sets["test"])
    assert len(sets["train"] | sets["valid"] | sets["test"]) == 20 + 14  # 7 originals × 2 rewrites; orphan dropped
    for s, ids in sets.items():  # rewrites stay with their original
        for qid in ids:
            if "-r" in qid:
                assert qid.split("-r")[0] in ids, (qid, s)
    train = load_reranker_train(out.train)
    for r in train:
        assert len(r.positive) == 2 and len(r.negative) == 2 and len(r.rank_list) == 4
        assert not set(r.positive) & set(r.negative)
        assert r.query.split()[-1].split("-")[0].lstrip("q").isdigit() or r.query.startswith("rewrite")
        qid = r.model_extra["id"]
        assert qid in sets["train"]
        own = qid.split("-r")[0]
        assert all(own in t for t in [*r.positive, *r.negative, *r.rank_list])  # never borrowed
    labels = [r.classification.label for r in train]
    assert abs(labels.count(1) - labels.count(2)) <= 1
    for split in ("valid", "test"):
        pairs = load_reranker_pairs(getattr(out, split))
        assert {p.category for p in pairs} <= {1, 2}
        assert all(p.model_extra["id"] in sets[split] and "-r" not in p.model_extra["id"] for p in pairs)
    stats = json.loads(out.stats.read_text())
    assert stats["augmented"] == 14 and stats["augmented_orphans"] == 1
    assert stats["train"]["kept"] == len(train)
    n_train_special = sum(qid.split("-r")[0] in {"q18", "q19"} for qid in sets["train"])  # incl. rewrites
    assert sum(stats["train"]["dropped"].values()) == n_train_special
    # deterministic: the same inputs give the same bytes
    first = out.train.read_bytes()
    run_reranker(cfg)
    assert out.train.read_bytes() == first


def test_build_llm_data(tmp_path: Path) -> None:
    pref_path, aug_path, ret_path = _write_inputs(tmp_path, n=8)
    out = run_llm(LLMDataConfig(preferences=pref_path, out_dir=tmp_path / "llm", include_augmented=aug_path))
    pre = [json.loads(x) for x in out.prealign.read_text().splitlines()]
    alpaca = json.loads(out.prealign_alpaca.read_text())
    stats = json.loads(out.stats.read_text())
    assert stats["retrieval"] == str(ret_path)  # found through the mine folder's config.yaml
    # 8 originals + 3 originals × 2 rewrites, less q6 and its 2 rewrites (no preference passage)
    assert len(pre) == len(alpaca) == 8 + 6 - 3 and stats["prealign"]["skipped_no_preference_passage"] == 3
    for ex, al in zip(pre, alpaca, strict=True):
        roles = [m["role"] for m in ex["messages"]]
        assert roles == ["system", "user", "assistant"]
        user, target = ex["messages"][1]["content"], ex["messages"][2]["content"]
        assert al == {"instruction": user, "input": "", "output": target, "system": ex["messages"][0]["content"]}
        assert user.count("\n[") == 3  # k = 3 numbered passages
        idx = int(target.split("[")[1].split("]")[0])
        line = next(x for x in user.splitlines() if x.startswith(f"[{idx}] "))
        star = line[len(f"[{idx}] "):]
        is_positive = ("aligned" in star and "unaligned" not in star) or "only helps" in star
        assert ("Positive" in target) == is_positive
        assert "aligned" in star or "only helps" in star  # d* is a preference passage
        own = user.split("Question: ")[1].split("\n")[0].split()[-1]  # "question q3" / "rewrite x of q3"
        passages = [x for x in user.splitlines() if x.startswith("[")]
        assert all(own + " " in x or "only helps" in x for x in passages), passages  # never another question's
    sft = [json.loads(x) for x in out.sft.read_text().splitlines()]
    assert len(sft) == 8 + 6
    assert sft[0]["messages"][1]["content"].startswith("Passages:\n[1] R: q0 retrieved 0")
    assert "[4]" not in sft[0]["messages"][1]["content"]
    assert sft[0]["messages"][2]["content"] == "gold q0"
    assert sft[-1]["messages"][1]["content"].endswith("Question: rewrite complex of q6\nAnswer:")
    info = json.loads(out.dataset_info.read_text())
    assert info["dpa_rag_sft"]["file_name"] == "sft.json"
    assert info["dpa_rag_prealign"]["columns"]["prompt"] == "instruction"


def test_llm_data_holds_out_validation_filters_and_adds_closed_book(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """valid.jsonl: held-out questions (and their rewrites) left out of both sets; has-answer drops SFT targets the
    passages do not hold; closed_book=self adds the reader's own closed-book answers as closed-book examples."""
    from dpa_rag.mining.llm_data import held_out_ids

    pref_path, aug_path, ret_path = _write_inputs(tmp_path, n=10)
    rows = [json.loads(x) for x in ret_path.read_text().splitlines()]
    rows[1]["ctxs"][0]["text"] = "here is gold q1"  # the only question whose top-3 holds its gold answer
    write_jsonl(ret_path, rows)
    cfg = LLMDataConfig(preferences=pref_path, out_dir=tmp_path / "llm", include_augmented=aug_path,
                        valid_fraction=0.3, seed=1)
    out = run_llm(cfg)
    held = held_out_ids([r["id"] for r in rows], 0.3, seed=1)
    assert len(held) == 3
    valid = [json.loads(x) for x in out.valid.read_text().splitlines()]
    assert {v["id"] for v in valid} == held and all(v["ctxs"] and v["answers"] for v in valid)
    sft = [json.loads(x) for x in out.sft.read_text().splitlines()]
    questions = [m["messages"][1]["content"].split("Question: ")[1].split("\n")[0] for m in sft]
    assert not any(q.endswith(f"of {h}") or q == f"question {h}" for q in questions for h in held)
    pre = out.prealign.read_text()
    assert not any(f"question {h}\n" in pre or f"of {h}\n" in pre for h in held)
    stats = json.loads(out.stats.read_text())
    assert stats["valid"]["questions"] == 3 and stats["sft"]["held_out"] >= 3

    filtered = run_llm(cfg.model_copy(update={"sft_filter": "has-answer", "out_dir": tmp_path / "f"}))
    sft = [json.loads(x) for x in filtered.sft.read_text().splitlines()]
    kept = 0 if "q1" in held else 1
    assert len(sft) == kept and json.loads(filtered.stats.read_text())["sft"]["skipped_answer_not_in_passages"] > 0

    closed = run_llm(cfg.model_copy(update={"closed_book": "self", "out_dir": tmp_path / "c"}))
    sft = [json.loads(x) for x in closed.sft.read_text().splitlines()]
    cb = [m for m in sft if "Passages:" not in m["messages"][1]["content"]]
    assert len(cb) == 10 - 3 and all(m["messages"][2]["content"] == "cb" for m in cb)  # the reader's own answer
    assert "mined before `mine` kept the raw closed-book completions: 7 closed-book examples" in caplog.text
    caplog.clear()
    assert cb[0]["messages"][1]["content"].startswith("Question: ")

    # with the raw completion (mine keeps it): the answer as written, and none from an answer cut mid-sentence
    prefs = [json.loads(x) for x in pref_path.read_text().splitlines()]
    for i, p in enumerate(prefs):
        p["closed_book"]["raw"] = f"The answer is {p['id']}." if i % 2 == 0 else f"The answer to {p['id']} is the"
    write_jsonl(pref_path, prefs)
    raw = run_llm(cfg.model_copy(update={"closed_book": "self", "out_dir": tmp_path / "r"}))
    sft = [json.loads(x) for x in raw.sft.read_text().splitlines()]
    targets = {m["messages"][2]["content"] for m in sft if "Passages:" not in m["messages"][1]["content"]}
    kept = {f"The answer is q{i}." for i in range(0, 10, 2) if f"q{i}" not in held}
    assert targets == kept
    unfinished = sum(1 for i in range(1, 10, 2) if f"q{i}" not in held)
    assert json.loads(raw.stats.read_text())["sft"]["closed_book_skipped_unfinished"] == unfinished
    assert "mined before" not in caplog.text
    # the budget mine generated with (its config.yaml): six pieces of a 16-token budget were not cut; of 8, maybe
    mine_cfg = (pref_path.parent / "config.yaml").read_text()
    (pref_path.parent / "config.yaml").write_text(mine_cfg + "max_new_tokens: 16\n")
    budget = run_llm(cfg.model_copy(update={"closed_book": "self", "out_dir": tmp_path / "b"}))
    assert json.loads(budget.stats.read_text())["sft"]["closed_book_self"] == 10 - 3
    (pref_path.parent / "config.yaml").write_text(mine_cfg + "max_new_tokens: 8\n")
    budget = run_llm(cfg.model_copy(update={"closed_book": "self", "out_dir": tmp_path / "b8"}))
    assert json.loads(budget.stats.read_text())["sft"]["closed_book_self"] == len(kept)


def test_prealign_example_is_seeded_and_local() -> None:
    p = mixed_pref("q")
    others = [f"other {j}" for j in range(10)]
    a, _ = prealign_example(p, others, k=3, seed=5)
    b, _ = prealign_example(p, others, k=3, seed=5)
    assert a == b
    short, info = prealign_example(p, ["lonely"], k=3, seed=5)
    assert short is not None and info["short"]
    with pytest.raises(ValueError, match="k must"):
        prealign_example(p, others, k=0, seed=5)


def test_cli_builders(run_dir: Path) -> None:
    from typer.testing import CliRunner

    from dpa_rag.cli.main import app

    pref_path, _, ret_path = _write_inputs(run_dir, n=10)
    runner = CliRunner()
    res = runner.invoke(app, ["build-reranker-data", "--preferences", str(pref_path), "--out-dir",
                              str(run_dir / "rr"), "--n-positive", "1", "--rank-list-size", "3"])
    assert res.exit_code == 0, res.output
    train = load_reranker_train(run_dir / "rr" / "train.jsonl")
    assert all(len(r.positive) == 1 and len(r.rank_list) == 3 for r in train)
    bad = runner.invoke(app, ["build-reranker-data", "--preferences", str(pref_path), "--n-positive", "0"])
    assert bad.exit_code != 0 and "n_positive" in bad.output
    res = runner.invoke(app, ["build-llm-data", "--preferences", str(pref_path), "--retrieval", str(ret_path),
                              "--out-dir", str(run_dir / "llm"), "--k", "2"])
    assert res.exit_code == 0, res.output
    sft = json.loads((run_dir / "llm" / "sft.json").read_text())
    assert len(sft) == 10 and "[3]" not in sft[0]["instruction"]
