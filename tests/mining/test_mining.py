"""Preference mining: category rules, the authors' labels, batching, caching, kill-and-resume, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpa_rag.data.reranker_records import load_reranker_pairs
from dpa_rag.eval.metrics import f1, hit
from dpa_rag.generation.fake import FakeGenerator, first_capitalised_phrase
from dpa_rag.io import write_jsonl
from dpa_rag.mining.labels import (
    ALIGNED,
    BOTH_CORRECT,
    BOTH_WRONG,
    UNALIGNED,
    categorize,
    rule_categories,
    score,
)
from dpa_rag.mining.mine import MineConfig, probe_ranks, run
from dpa_rag.mining.prompts import clean_answer, qa_prompt
from dpa_rag.prompts import load_template
from toys import NAMES, city_retrieval

# ---------------------------------------------------------------- category rules (hand-made cases)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ({"hit": 0, "f1": 0.0}, {"hit": 1, "f1": 1.0}, ALIGNED),
        ({"hit": 1, "f1": 1.0}, {"hit": 0, "f1": 0.0}, UNALIGNED),
        ({"hit": 1, "f1": 0.2}, {"hit": 1, "f1": 1.0}, BOTH_CORRECT),  # F1 rises, hit rule ignores it
        ({"hit": 0, "f1": 0.0}, {"hit": 0, "f1": 0.8}, BOTH_WRONG),  # F1 rises without a hit
    ],
)
def test_hit_rule(before: dict, after: dict, expected: str) -> None:
    assert categorize(before, after, "hit") == expected


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        ({"hit": 0, "f1": 0.0}, {"hit": 0, "f1": 0.67}, ALIGNED),  # Tri-Cities: no hit, F1 up
        ({"hit": 1, "f1": 1.0}, {"hit": 1, "f1": 0.18}, UNALIGNED),  # LeBron: hit kept, F1 down
        ({"hit": 1, "f1": 0.5}, {"hit": 1, "f1": 0.5}, BOTH_CORRECT),  # tie, hit after
        ({"hit": 0, "f1": 0.0}, {"hit": 0, "f1": 0.0}, BOTH_WRONG),  # tie, no hit after
    ],
)
def test_f1_delta_rule(before: dict, after: dict, expected: str) -> None:
    assert categorize(before, after, "f1-delta") == expected
    assert categorize(before, after, "f1_delta") == expected  # method.md's spelling


def test_rules_accept_authors_em_field_and_reject_unknown_rule() -> None:
    assert categorize({"em": 0, "f1": 0}, {"em": 1, "f1": 1.0}, "hit") == ALIGNED
    with pytest.raises(ValueError, match="unknown label rule"):
        categorize({"hit": 0, "f1": 0}, {"hit": 1, "f1": 1}, "exact")


@pytest.mark.parametrize("name", ["example_valid_dataset.jsonl", "example_test_dataset.jsonl"])
def test_f1_delta_reproduces_authors_labels(shared_data: Path, name: str) -> None:
    """Every released category follows the F1-delta rule, and our metrics recompute every em/f1 from the answers."""
    pairs = load_reranker_pairs(shared_data / "dpa-rag" / name)
    assert len(pairs) == 20
    disagree_hit = 0
    for p in pairs:
        assert p.before is not None and p.after is not None
        before, after = p.before.model_dump(), p.after.model_dump()
        for side in (p.before, p.after):
            assert hit(side.answer, p.reference) == side.em, (side.answer, p.reference)
            assert f1(side.answer, p.reference) == pytest.approx(side.f1, abs=1e-9), (side.answer, p.reference)
        expected = {1: ALIGNED, 2: UNALIGNED}[p.category]
        assert categorize(before, after, "f1-delta") == expected, p.question
        recomputed_b, recomputed_a = score(p.before.answer, p.reference), score(p.after.answer, p.reference)
        assert categorize(recomputed_b, recomputed_a, "f1-delta") == expected
        disagree_hit += categorize(before, after, "hit") != expected
    assert disagree_hit > 0  # the hit rule does not reproduce them (method.md §2.2: 7 of 40 differ)


# ---------------------------------------------------------------- probes and prompts


def test_probe_ranks() -> None:
    assert probe_ranks(100, [1, 25, 50, 100]) == [1, 25, 50, 100]
    assert probe_ranks(30, [1, 25, 50, 100]) == [1, 25, 30]
    assert probe_ranks(10, [1, 25, 50, 100]) == [1, 10]
    assert probe_ranks(1, [1, 25, 50, 100]) == [1]
    assert probe_ranks(0, [1, 25]) == []


def test_qa_prompt_and_clean_answer() -> None:
    closed = qa_prompt("who wrote hamlet", [])
    assert [m["role"] for m in closed] == ["system", "user"]
    assert "Passages" not in closed[1]["content"]
    assert closed[1]["content"].endswith("Question: who wrote hamlet\nAnswer:")
    opened = qa_prompt("who wrote hamlet", ["Title: Hamlet Content: by Shakespeare"])
    assert opened == load_template("qa").render("who wrote hamlet", ["Title: Hamlet Content: by Shakespeare"])
    assert "by Shakespeare" in opened[1]["content"] and "Hamlet" in opened[1]["content"]
    assert "Content:" not in opened[0]["content"]  # the system message holds no passage text
    assert clean_answer("\n  Paris \nbecause ...") == "Paris"
    assert clean_answer("   ") == ""


def test_finished_line_tells_a_finished_answer_from_a_cut_one() -> None:
    from dpa_rag.prompts import finished_line

    assert finished_line("The capital of Alabama is Montgomery.") == "The capital of Alabama is Montgomery."
    assert finished_line(' He said "no!" ') == 'He said "no!"'
    assert finished_line("Paris\nThe capital of France") == "Paris"  # it went on to another line: finished
    assert finished_line("The largest bill in American money is the $100 bill, which is") is None  # budget cut
    assert finished_line("  \n ") is None
    # given the budget: far shorter than it means the reader stopped on its own; a dense string may still be a cut
    assert finished_line("Paris") is None and finished_line("Paris", max_new_tokens=16) == "Paris"
    assert finished_line("The answer is: 1972", max_new_tokens=16) == "The answer is: 1972"
    assert finished_line("Canadatr.gov.ca/en/2018/", max_new_tokens=16) is None
    assert finished_line("The largest bill in American money is the", max_new_tokens=16) is None


# ---------------------------------------------------------------- a synthetic retrieval file and a scripted reader

def scripted_reader(text: str) -> str:
    """Closed-book: right for even question numbers, 'unknown' for odd; with a passage: copy its first name."""
    if "Passages:" in text:
        return first_capitalised_phrase(text)
    i = int(re.search(r"city number (\d+)", text).group(1))
    return NAMES[i % len(NAMES)] if i % 2 == 0 else "unknown"


class FlakyReader(FakeGenerator):
    """The scripted reader, killed (raises) when asked for its ``die_at``-th batch."""

    def __init__(self, die_at: int | None = None) -> None:
        super().__init__(fn=scripted_reader)
        self.die_at = die_at

    def generate(self, prompts, params):  # type: ignore[no-untyped-def]
        if self.die_at is not None and self.batches + 1 >= self.die_at:
            raise KeyboardInterrupt("simulated kill")
        return super().generate(prompts, params)


def _cfg(run_dir: Path, retrieval: Path, out: str, cache: str = "cache", **kw: object) -> MineConfig:
    base = {"retrieval": retrieval, "out_dir": run_dir / out, "backend": "fake", "cache_dir": run_dir / cache,
            "ranks": [1, 2, 3, 4], "batch_size": 4, "chunk_size": 3, "progress": False}
    return MineConfig(**{**base, **kw})


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_mine_outputs_categories_and_batching(run_dir: Path) -> None:
    retrieval = city_retrieval(run_dir / "ret.jsonl", n=10)
    reader = FlakyReader()
    path = run(_cfg(run_dir, retrieval, "mine"), backend=reader)
    prefs = _read(path)
    assert [p["id"] for p in prefs] == [f"q{i}" for i in range(10)]
    first = prefs[0]
    assert first["closed_book"] == {"answer": "Paris", "hit": 1, "f1": 1.0, "raw": "Paris"}
    assert [p["rank"] for p in first["probes"]] == [1, 2, 3, 4]
    assert set(first["probes"][0]["ctx"]) >= {"id", "title", "text"}
    cats = {p["category"] for pref in prefs for p in pref["probes"]}
    assert cats == set(rule_categories("hit"))
    for pref in prefs:  # every label follows the rule from the stored scores
        for p in pref["probes"]:
            assert p["category"] == categorize(pref["closed_book"], p, "hit")
            assert p["hit"] == hit(p["answer"], pref["answers"])
    # 10 questions × 5 prompts, chunks of 3 questions (15 prompts) in batches of 4 → 4+4+4+3 backend batches each
    assert reader.calls == 50
    assert reader.batches == 3 * 4 + 2  # last chunk: 1 question = 5 prompts = 2 batches
    stats = json.loads((run_dir / "mine" / "stats.json").read_text())
    assert stats["n_questions"] == 10 and stats["overall"]["total"] == 40 and stats["calls"] == 50
    assert stats["label_rule"] == "hit"
    assert sum(stats["per_rank"]["1"]["counts"].values()) == 10
    assert stats["overall"]["shares"][ALIGNED] == pytest.approx(stats["overall"]["counts"][ALIGNED] / 40)
    summary = (run_dir / "mine" / "summary.md").read_text()
    assert "| all |" in summary and "aligned" in summary
    manifest = json.loads((run_dir / "mine" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["questions"] == 10


def test_short_lists_probe_nearest_ranks(run_dir: Path) -> None:
    retrieval = city_retrieval(run_dir / "ret.jsonl", n=2)
    path = run(_cfg(run_dir, retrieval, "mine", ranks=[1, 25, 50, 100]), backend=FlakyReader())
    assert [p["rank"] for p in _read(path)[0]["probes"]] == [1, 4]


def test_kill_and_resume_matches_clean_run(run_dir: Path) -> None:
    retrieval = city_retrieval(run_dir / "ret.jsonl", n=10)
    clean_reader = FlakyReader()
    clean = run(_cfg(run_dir, retrieval, "clean", cache="cache-clean"), backend=clean_reader)

    killed_reader = FlakyReader(die_at=7)  # dies inside the third chunk (chunk = 15 prompts = 4 batches)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(run_dir, retrieval, "resumed", cache="cache-resumed"), backend=killed_reader)
    partial = _read(run_dir / "resumed" / "preferences.jsonl")
    assert [p["id"] for p in partial] == ["q0", "q1", "q2"]  # only the finished chunk was written
    with open(run_dir / "resumed" / "preferences.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"id": "q3", "question": "half a li')  # a kill in the middle of a write

    resume_reader = FlakyReader()
    resumed = run(_cfg(run_dir, retrieval, "resumed", cache="cache-resumed"), backend=resume_reader)
    assert resumed.preferences.read_bytes() == clean.preferences.read_bytes()
    # nothing was generated twice: killed + resumed calls = the clean run's calls
    assert killed_reader.calls + resume_reader.calls == clean_reader.calls == 50
    # the resumed run never asked for the prompts of the 3 finished questions
    stats = json.loads((run_dir / "resumed" / "stats.json").read_text())
    assert stats["resumed_questions"] == 3 and stats["mined_questions"] == 7
    assert stats["calls"] + stats["cache_hits"] == 7 * 5
    assert stats["cache_hits"] == killed_reader.calls - 3 * 5


def test_rerun_is_instant_and_config_change_starts_over(run_dir: Path) -> None:
    retrieval = city_retrieval(run_dir / "ret.jsonl", n=6)
    first = run(_cfg(run_dir, retrieval, "mine"), backend=FlakyReader())
    before = first.preferences.read_bytes()
    dead = FlakyReader(die_at=1)  # any reader call would raise
    again = run(_cfg(run_dir, retrieval, "mine", batch_size=2, chunk_size=5), backend=dead)
    assert again.preferences.read_bytes() == before
    assert dead.calls == 0
    # another label rule changes the results: start over (answers all come from the generation cache)
    reader = FlakyReader()
    path = run(_cfg(run_dir, retrieval, "mine", label_rule="f1-delta"), backend=reader)
    assert reader.calls == 0
    prefs = _read(path)
    assert len(prefs) == 6
    for pref in prefs:
        for p in pref["probes"]:
            assert p["category"] == categorize(pref["closed_book"], p, "f1-delta")
    assert json.loads((run_dir / "mine" / "stats.json").read_text())["label_rule"] == "f1-delta"


def test_mine_then_builders(run_dir: Path) -> None:
    """Under the hit rule no question has both sides (strict pools drop all); graded pools and the LLM sets work."""
    from dpa_rag.data.reranker_records import load_reranker_train
    from dpa_rag.mining.llm_data import LLMDataConfig
    from dpa_rag.mining.llm_data import run as run_llm
    from dpa_rag.mining.reranker_data import RerankerDataConfig
    from dpa_rag.mining.reranker_data import run as run_reranker

    retrieval = city_retrieval(run_dir / "ret.jsonl", n=10)
    run(_cfg(run_dir, retrieval, "mine"), backend=FlakyReader())
    split = {"train_fraction": 1.0, "valid_fraction": 0.0, "test_fraction": 0.0}
    strict = run_reranker(RerankerDataConfig(preferences=run_dir / "mine", out_dir=run_dir / "strict", **split))
    stats = json.loads(strict.stats.read_text())
    assert stats["train"]["kept"] == 0 and stats["train"]["dropped"] == {"no_negative": 5, "no_positive": 5}
    graded = run_reranker(RerankerDataConfig(preferences=run_dir / "mine", out_dir=run_dir / "graded", pool="graded",
                                             **split))
    train = load_reranker_train(graded.train)
    assert len(train) == 10
    for r in train:
        assert not set(r.positive) & set(r.negative)
    llm = run_llm(LLMDataConfig(preferences=run_dir / "mine", out_dir=run_dir / "llm"))  # retrieval from config.yaml
    sft = _read(llm.sft)
    assert len(sft) == 10 and sft[0]["messages"][-1]["content"] == "Paris"
    assert len(_read(llm.prealign)) == 10


def test_cli_mine(run_dir: Path) -> None:
    from typer.testing import CliRunner

    from dpa_rag.cli.main import app

    retrieval = city_retrieval(run_dir / "ret.jsonl", n=4)
    out = run_dir / "cli-mine"
    result = CliRunner().invoke(
        app,
        ["mine", "--retrieval", str(retrieval), "--out-dir", str(out), "--backend", "fake",
         "--ranks", "1", "--ranks", "3", "--label-rule", "f1-delta", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    prefs = _read(out / "preferences.jsonl")
    assert len(prefs) == 4 and [p["rank"] for p in prefs[0]["probes"]] == [1, 3]
    assert json.loads((out / "stats.json").read_text())["label_rule"] == "f1-delta"
    bad = CliRunner().invoke(app, ["mine", "--retrieval", str(retrieval), "--label-rule", "exact"])
    assert bad.exit_code != 0


# ---------------------------------------------------------------- the real bundled reader


@pytest.mark.slow
def test_mine_with_smollm2(run_dir: Path, shared_data: Path) -> None:
    pytest.importorskip("dpa_rag.generation.hf")
    from dpa_rag.data.loaders import load_retrieval

    recs = load_retrieval(shared_data / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz", limit=4)
    rows = []
    for i, r in enumerate(recs):
        fillers = [recs[(i + j) % len(recs)].ctxs[0] for j in (1, 2)]
        ctxs = [r.ctxs[0], *fillers]
        rows.append({"id": r.id, "question": r.question, "answers": r.answers,
                     "ctxs": [c.model_dump(mode="json", exclude_none=True) for c in ctxs]})
    retrieval = write_jsonl(run_dir / "ret.jsonl", rows) and run_dir / "ret.jsonl"
    cfg = MineConfig(retrieval=retrieval, out_dir=run_dir / "mine", backend="hf", model="smollm2-135m",
                     device="cpu", max_new_tokens=10, batch_size=12, chunk_size=4, progress=False)
    path = run(cfg)
    prefs = _read(path)
    assert len(prefs) == 4
    for pref in prefs:
        assert [p["rank"] for p in pref["probes"]] == [1, 3]
        for p in pref["probes"]:
            assert p["category"] in rule_categories("hit")
            assert p["hit"] == hit(p["answer"], pref["answers"])
    stats = json.loads((run_dir / "mine" / "stats.json").read_text())
    assert stats["calls"] == 4 * 3
    # a second run is served from preferences.jsonl without loading the model
    again = run(cfg)
    assert again.preferences.read_bytes() == path.preferences.read_bytes()
    assert json.loads((run_dir / "mine" / "stats.json").read_text())["calls"] == 0
