"""Query augmentation: output parser, templates, the augment stage (batching, cache, resume), inheritance, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dpa_rag.augment.augment import AugmentConfig, augment_questions, augmented_to_questions, run
from dpa_rag.augment.inherit import group_split, inherit_preferences, inherit_retrieval
from dpa_rag.augment.parser import parse_rewrite
from dpa_rag.augment.strategies import DEFAULT_STRATEGIES, load_templates, render_prompt
from dpa_rag.data.schema import Ctx, Preference, Question, RetrievalRecord
from dpa_rag.generation import GenerationParams, build_generator
from dpa_rag.generation.base import GeneratorOptions
from dpa_rag.generation.fake import FakeGenerator
from dpa_rag.io import read_records

ORIG = "who wrote he ain't heavy he's my brother lyrics"

# (model output, parse mode, expected rewrite or None, expected failure or None)
PARSER_CASES = [
    ('Sure! Here is the rewritten question: "Who penned the lyrics of He Ain\'t Heavy?"', "single",
     "Who penned the lyrics of He Ain't Heavy?", None),
    ('Sure! Here is the rewritten question:\n\n"Who penned the lyrics?"\n\nThis version uses different words.',
     "single", "Who penned the lyrics?", None),
    ("“Which songwriter wrote the words of the song?”", "single", "Which songwriter wrote the words of the song?",
     None),
    ("1. Who is the lyricist of the song?\n2. Which songwriter wrote it?", "single",
     "Who is the lyricist of the song?", None),
    ("**Rewritten question:** Who is the lyricist of the Hollies song?", "single",
     "Who is the lyricist of the Hollies song?", None),
    ("### Rewritten Question\n> *Who composed the words of the 1969 Hollies hit?*", "single",
     "Who composed the words of the 1969 Hollies hit?", None),
    ("Rewritten question: Which lyricist wrote it, given it was a 1969 single?\n\nExplanation: I added the year.",
     "single", "Which lyricist wrote it, given it was a 1969 single?", None),
    ("Certainly! Who penned the lyrics to the Hollies' 1969 single? (I added the band and year.)", "single",
     "Who penned the lyrics to the Hollies' 1969 single?", None),
    ("Original question: who wrote he ain't heavy he's my brother lyrics\nRewritten question: Who is its lyricist?",
     "single", "Who is its lyricist?", None),
    ('"Hey Jude" was written by whom?', "single", '"Hey Jude" was written by whom?', None),
    ("<think>the user wants a paraphrase</think>Who penned it?", "single", "Who penned it?", None),
    ("Who wrote He Ain't Heavy, He's My Brother lyrics?", "single", None, "echo"),
    ("Question: Who wrote the he ain't heavy he's my brother lyrics", "single", None, "echo"),
    ("I'm sorry, but I can't help with rewriting this question.", "single", None, "refusal"),
    ("As an AI language model, I cannot do that.", "single", None, "refusal"),
    ("   \n\n  ", "single", None, "empty"),
    ("Here is the rewritten question:", "single", None, "empty"),
    ("Here are the sub-questions:\n1. Which band recorded the song?\n2. Who wrote the lyrics of that song?\n\n"
     "Explanation: answer 1, then 2.", "multi", "Which band recorded the song? Who wrote the lyrics of that song?",
     None),
    ("- Which band recorded it\n- Who wrote its lyrics", "multi", "Which band recorded it? Who wrote its lyrics?",
     None),
    ("Here is the SPARQL query:\n```sparql\nSELECT ?lyricist WHERE {\n  ?song rdfs:label \"He Ain't Heavy\"@en ;\n"
     "        wdt:P676 ?lyricist .\n}\nLIMIT 1\n```\nThis query finds the lyricist.", "sparql",
     "SELECT ?lyricist WHERE {\n?song rdfs:label \"He Ain't Heavy\"@en ;\nwdt:P676 ?lyricist .\n}\nLIMIT 1", None),
    ("To select the lyricist use: SELECT ?x WHERE { ?s wdt:P676 ?x . } ORDER BY ?x LIMIT 5 and that is it.", "sparql",
     "SELECT ?x WHERE { ?s wdt:P676 ?x . } ORDER BY ?x LIMIT 5", None),
    ("PREFIX wdt: <http://www.wikidata.org/prop/direct/>\nASK { ?s wdt:P676 ?x }", "sparql",
     "PREFIX wdt: <http://www.wikidata.org/prop/direct/>\nASK { ?s wdt:P676 ?x }", None),
    ("Who wrote the lyrics? It is a Hollies song.", "sparql", None, "no_query"),
    ("Query:\nSELECT name FROM songs;\n\nResult: { \"name\": 1 }", "sparql", None, "no_query"),  # SQL, not SPARQL
    ("Reply with only the rewritten question.", "single", None, "prompt_echo"),
    ("Asked: Which songwriter wrote the lyrics of the song?\nOptions: (A) Bob", "single",
     "Which songwriter wrote the lyrics of the song?", None),
    ("Bob Russell wrote the lyrics in 1969.", "single", None, "not_question"),  # an answer, not a rewrite
    ("What a great question!", "single", None, "not_question"),
    ("The answer to this question is: Bob Russell.", "single", None, "not_question"),
    ("Name the lyricist of the Hollies song", "single", "Name the lyricist of the Hollies song", None),
    ("SELECT ?x WHERE { ?s wdt:P676 ?x .", "sparql", None, "truncated"),
]


def test_parser_question_check_follows_original_style() -> None:
    nq_style = "field hockey is the national sport of which country"
    assert parse_rewrite("Field hockey is the national game of which nation", nq_style).text is not None
    assert parse_rewrite("Field hockey is the national sport of Canada", nq_style).failure == "not_question"
    keywords = "statue coming out of the ground in washington dc"
    assert parse_rewrite("the statue that emerges from the ground in DC", keywords).text is not None
    assert parse_rewrite("The answer is the Awakening.", keywords).failure == "not_question"


@pytest.mark.parametrize(("raw", "mode", "text", "failure"), PARSER_CASES)
def test_parser_messy_outputs(raw: str, mode: str, text: str | None, failure: str | None) -> None:
    parsed = parse_rewrite(raw, ORIG, mode)
    assert parsed.text == text
    assert parsed.failure == failure
    assert parsed.ok == (text is not None)


def test_parser_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="parse mode"):
        parse_rewrite("x", ORIG, "poem")


def test_templates_bundled_override_and_errors(tmp_path: Path) -> None:
    bundled = load_templates(DEFAULT_STRATEGIES)
    assert list(bundled) == list(DEFAULT_STRATEGIES)
    for text in bundled.values():
        assert "{question}" in text and "ONLY" in text
    (tmp_path / "rephrasing.txt").write_text("Paraphrase {question} please", encoding="utf-8")
    (tmp_path / "yoda.txt").write_text("Say like Yoda: {question}", encoding="utf-8")
    mixed = load_templates(["rephrasing", "yoda", "sparql"], tmp_path)
    assert mixed["rephrasing"] == "Paraphrase {question} please"
    assert mixed["sparql"] == bundled["sparql"]
    chat = render_prompt(mixed["yoda"], "  who is {x}? ")
    assert chat == [{"role": "user", "content": "Say like Yoda: who is {x}?"}]
    (tmp_path / "broken.txt").write_text("no placeholder", encoding="utf-8")
    with pytest.raises(ValueError, match="placeholder"):
        load_templates(["broken"], tmp_path)
    with pytest.raises(ValueError, match="no prompt template for strategy 'nope'"):
        load_templates(["nope"])
    with pytest.raises(ValueError, match="twice"):
        load_templates(["sparql", "sparql"])


_STRATEGY_MARKERS = {
    "different words": "rephrasing",
    "more complex": "complexity",
    "sub-questions": "decomposition",
    "extra condition": "constraint",
    "SPARQL": "sparql",
}


def chatty_rewriter(prompt: str) -> str:
    """A fake LLM that answers each bundled template the way small chat models do."""
    question = prompt.rsplit("Question:", 1)[1].strip()
    strategy = next(s for marker, s in _STRATEGY_MARKERS.items() if marker in prompt)
    if strategy == "rephrasing":
        return f'Sure! Here is the rewritten question: "In other words, {question}?"'
    if strategy == "complexity":
        return "I'm sorry, I cannot make this question harder." if "moon" in question else f"**{question}, exactly?**"
    if strategy == "decomposition":
        return f"Sub-questions:\n1. What is asked here\n2. {question}, answered step by step?"
    if strategy == "constraint":
        return question  # an echo: must become a failure
    return f"```sparql\nSELECT ?a WHERE {{ ?q rdfs:label \"{question}\" ; :answer ?a . }}\n```"


def _opts(tmp: Path, **kw) -> GeneratorOptions:
    return GeneratorOptions(backend="fake", cache_dir=tmp / "cache", **kw)


def test_augment_questions_records(tmp_path: Path) -> None:
    qs = [Question(id="q1", question="when was the last time anyone was on the moon", answers=["1972"]),
          Question(id="q2", question="who wrote hamlet", answers=["Shakespeare"])]
    fake = FakeGenerator(fn=chatty_rewriter)
    gen = build_generator(_opts(tmp_path, batch_size=4), backend=fake, progress=False)
    recs = augment_questions(qs, gen, GenerationParams(temperature=0.7), load_templates(DEFAULT_STRATEGIES))
    assert fake.calls == 10 and fake.batches == 3  # 2 questions x 5 strategies, in batches of 4
    r1, r2 = recs
    assert r1["instruction"] == qs[0].question and r1["answers"] == ["1972"]
    assert r1["strategies"] == ["rephrasing", "decomposition", "sparql"]
    assert r1["failures"] == {"complexity": "refusal", "constraint": "echo"}
    assert r1["back_instruction"][0] == f"In other words, {qs[0].question}?"
    assert r1["back_instruction"][1] == f"What is asked here? {qs[0].question}, answered step by step?"
    assert r1["back_instruction"][2].startswith("SELECT ?a WHERE {")
    assert r2["strategies"] == ["rephrasing", "complexity", "decomposition", "sparql"]
    assert len(r2["back_instruction"]) == len(r2["strategies"])
    aq = augmented_to_questions(recs)
    assert [q.id for q in aq][:3] == ["q1::rephrasing", "q1::decomposition", "q1::sparql"]
    assert all(q.origin_id in {"q1", "q2"} and q.answers == (["1972"] if q.origin_id == "q1" else ["Shakespeare"])
               for q in aq)
    # the same prompts again: all from the cache
    augment_questions(qs, gen, GenerationParams(temperature=0.7), load_templates(DEFAULT_STRATEGIES))
    assert fake.calls == 10 and gen.hits == 10


class KilledGenerator(FakeGenerator):
    """Works for ``live_batches`` backend calls, then dies like a killed process would."""

    def __init__(self, live_batches: int) -> None:
        super().__init__(fn=chatty_rewriter)
        self.live_batches = live_batches

    def generate(self, prompts, params):  # type: ignore[no-untyped-def]
        if self.batches >= self.live_batches:
            raise KeyboardInterrupt("killed")
        return super().generate(prompts, params)


def _read(path: Path) -> list[dict]:
    return [r for _, r in read_records(path)]


def test_augment_resume_matches_clean_run(run_dir: Path, shared_data: Path) -> None:
    src = shared_data / "nq-open" / "NQ-open.dev.jsonl"
    common = dict(input=src, limit=10, backend="fake", chunk_size=3, batch_size=5, use_cache=False, progress=False)
    clean_dir, resumed_dir = run_dir / "clean", run_dir / "resumed"
    clean_fake = FakeGenerator(fn=chatty_rewriter)
    run(AugmentConfig(out_dir=clean_dir, **common), backend=clean_fake)
    assert clean_fake.calls == 50

    # chunks of 3 questions = 15 prompts = 3 batches; die inside the second chunk
    with pytest.raises(KeyboardInterrupt):
        run(AugmentConfig(out_dir=resumed_dir, **common), backend=KilledGenerator(live_batches=4))
    assert not (resumed_dir / "augmented.jsonl").exists()
    assert len(_read(resumed_dir / "augmented.partial.jsonl")) == 3
    second = FakeGenerator(fn=chatty_rewriter)
    out = run(AugmentConfig(out_dir=resumed_dir, **common), backend=second)
    assert second.calls == 35  # the 3 finished questions were skipped, not regenerated (no cache in this test)
    assert _read(out) == _read(clean_dir / "augmented.jsonl")
    assert _read(resumed_dir / "questions_augmented.jsonl") == _read(clean_dir / "questions_augmented.jsonl")
    assert not (resumed_dir / "augmented.partial.jsonl").exists()
    manifest = json.loads((resumed_dir / "manifest.json").read_text())
    assert manifest["counts"]["questions"] == 10
    assert manifest["counts"]["rewrites"] == len(_read(resumed_dir / "questions_augmented.jsonl"))


def test_augment_partial_from_other_config_is_discarded(run_dir: Path, shared_data: Path) -> None:
    src = shared_data / "nq-open" / "NQ-open.dev.jsonl"
    common = dict(input=src, limit=4, backend="fake", chunk_size=2, batch_size=10, out_dir=run_dir / "o",
                  progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(AugmentConfig(**common), backend=KilledGenerator(live_batches=1))
    other = FakeGenerator(fn=chatty_rewriter)
    run(AugmentConfig(strategies=["rephrasing", "sparql"], **common), backend=other)
    recs = _read(run_dir / "o" / "augmented.jsonl")
    assert all(set(r["strategies"]) | set(r["failures"]) == {"rephrasing", "sparql"} for r in recs)


def test_augmented_questions_file_format(run_dir: Path, shared_data: Path) -> None:
    src = shared_data / "nq-open" / "NQ-open.dev.jsonl"
    out = run(AugmentConfig(input=src, limit=3, backend="fake", out_dir=run_dir / "a", progress=False,
                            keep_raw=True), backend=FakeGenerator(fn=chatty_rewriter))
    recs = _read(out)
    qrecs = _read(run_dir / "a" / "questions_augmented.jsonl")
    assert sum(len(r["back_instruction"]) for r in recs) == len(qrecs)
    by_id = {r["id"]: r for r in recs}
    for q in qrecs:
        orig = by_id[q["origin_id"]]
        assert q["id"] == f"{q['origin_id']}::{q['strategy']}"
        assert q["answers"] == orig["answers"] and q["answers"]
        assert q["question"] == orig["back_instruction"][orig["strategies"].index(q["strategy"])]
    assert set(recs[0]["raw"]) == set(DEFAULT_STRATEGIES)


def _pref(qid: str, question: str) -> Preference:
    return Preference.model_validate({
        "id": qid, "question": question, "answers": ["Bob Russell"], "origin_id": None,
        "closed_book": {"answer": "unknown", "hit": 0, "f1": 0.0},
        "probes": [{"rank": 1, "ctx": {"id": "p1", "title": "T", "text": "Bob Russell wrote it"},
                    "answer": "Bob Russell", "hit": 1, "f1": 1.0, "category": "aligned"}],
    })


def test_inherit_preferences_and_retrieval() -> None:
    prefs = [_pref("q1", ORIG), _pref("q2", "who wrote hamlet")]
    aq = [Question(id="q1::rephrasing", question="Who penned it?", answers=["Bob Russell"], origin_id="q1",
                   strategy="rephrasing"),
          Question(id="q9::sparql", question="SELECT ?x WHERE { }", origin_id="q9")]
    out = inherit_preferences(prefs, aq)
    assert len(out) == 1  # q9 has no preference record
    rec = out[0]
    assert rec.id == "q1::rephrasing" and rec.question == "Who penned it?" and rec.origin_id == "q1"
    assert rec.answers == ["Bob Russell"] and rec.probes == prefs[0].probes
    assert rec.closed_book == prefs[0].closed_book and rec.strategy == "rephrasing" and prefs[0].strategy is None
    rec.probes[0].category = "unaligned"  # a deep copy: the original is untouched
    rec.probes[0].ctx.text = "changed"
    assert prefs[0].probes[0].category == "aligned" and prefs[0].probes[0].ctx.text == "Bob Russell wrote it"

    ctx = Ctx(id="p1", title="T", text="Bob Russell wrote it", score=1.0, has_answer=True)
    rr = [RetrievalRecord(id="q1", question=ORIG, answers=["Bob Russell"], ctxs=[ctx])]
    inherited = inherit_retrieval(rr, aq)
    assert len(inherited) == 1
    r = inherited[0]
    assert (r.id, r.question, r.origin_id, r.answers) == ("q1::rephrasing", "Who penned it?", "q1", ["Bob Russell"])
    assert r.ctxs == rr[0].ctxs and r.ctxs[0] is not rr[0].ctxs[0]
    assert r.dump()["strategy"] == "rephrasing"
    with pytest.raises(ValueError, match="origin_id"):
        inherit_retrieval(rr, [Question(id="x", question="y")])


def test_group_split_no_leakage() -> None:
    originals = [_pref(f"q{i}", f"question {i}") for i in range(30)]
    rewrites = inherit_preferences(
        originals,
        [Question(id=f"q{i}::{s}", question=f"rewrite {s} {i}", origin_id=f"q{i}")
         for i in range(30) for s in ("rephrasing", "complexity")],
    )
    assert all(r.origin_id == r.id.split("::")[0] for r in rewrites)
    splits = group_split(originals + rewrites, {"train": 0.6, "valid": 0.2, "test": 0.2}, seed=3)
    assert sum(map(len, splits.values())) == 90
    assert [len(v) for v in splits.values()] == [54, 18, 18]
    origin_sets = {name: {r.origin_id or r.id for r in recs} for name, recs in splits.items()}
    assert not origin_sets["train"] & origin_sets["test"]
    assert not origin_sets["train"] & origin_sets["valid"]
    assert not origin_sets["valid"] & origin_sets["test"]
    assert group_split(originals + rewrites, {"train": 0.6, "valid": 0.2, "test": 0.2}, seed=3) == splits
    assert group_split(originals + rewrites, {"train": 0.6, "valid": 0.2, "test": 0.2}, seed=4) != splits
    with pytest.raises(ValueError, match="sum to 1"):
        group_split(originals, {"train": 0.6, "test": 0.6})


def test_cli_augment_then_filter(run_dir: Path, shared_data: Path, tiny_bert_dir: Path) -> None:
    from typer.testing import CliRunner

    from dpa_rag.cli.main import app

    runner = CliRunner()
    aug_dir, filt_dir = run_dir / "aug", run_dir / "filt"
    prompts = run_dir / "prompts"
    prompts.mkdir()
    # the default fake LLM answers with the first capitalised phrase after "Content:" (else "unknown")
    (prompts / "rephrasing.txt").write_text("Rephrase. Content: Which Famous Question {question}", encoding="utf-8")
    res = runner.invoke(app, [
        "augment", "--input", str(shared_data / "flashrag" / "nq_test.jsonl"), "--out-dir", str(aug_dir),
        "--backend", "fake", "--limit", "4", "--strategies", "rephrasing", "--strategies", "sparql",
        "--prompt-dir", str(prompts), "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    recs = _read(aug_dir / "augmented.jsonl")
    assert len(recs) == 4
    assert all(r["back_instruction"] == ["Which Famous Question"] and r["failures"] == {"sparql": "no_query"}
               for r in recs)
    res = runner.invoke(app, [
        "filter", "--input", str(aug_dir), "--out-dir", str(filt_dir), "--backend", "similarity",
        "--encoder", str(tiny_bert_dir), "--similarity-threshold", "1.01", "--device", "cpu", "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    report = json.loads((filt_dir / "filter_report.json").read_text())
    assert report["rewrites"] == 4 and report["kept"] == 0
    assert report["per_strategy"]["rephrasing"]["reasons"] == {"low_similarity": 4}
    assert report["per_strategy"]["sparql"]["parse_failures"] == 4
    assert "| rephrasing | 4 | 0 | 4 |" in (filt_dir / "filter_report.md").read_text()
    assert _read(filt_dir / "questions_augmented.jsonl") == []
    res = runner.invoke(app, ["augment", "--input", "nowhere.jsonl", "--out-dir", str(aug_dir), "--backend", "fake",
                              "--strategies", "poetry"])
    assert res.exit_code == 2 and re.search(r"no prompt template for strategy 'poetry'", res.output)
