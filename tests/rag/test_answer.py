"""Prompt templates, answer clean-up and the ``answer`` stage (fake backend, no model)."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpa_rag.config import ConfigError
from dpa_rag.data.schema import Ctx, RetrievalRecord
from dpa_rag.eval.metrics import score_answer
from dpa_rag.generation import GeneratorOptions
from dpa_rag.generation.fake import FakeGenerator
from dpa_rag.prompts import BUILTIN_TEMPLATES, PromptTemplate, clean_answer, load_template
from dpa_rag.rag.answer import AnswerConfig, answer_records
from dpa_rag.rag.answer import run as run_answer

RECORDS = [
    {
        "id": "q1",
        "question": "who wrote hamlet",
        "answers": ["William Shakespeare"],
        "category": "person",
        "ctxs": [
            {"id": "p1", "title": "Hamlet", "text": "Hamlet is a tragedy by William Shakespeare.", "has_answer": True},
            {"id": "p2", "title": "Denmark", "text": "Denmark is a country in Europe."},
            {"id": "p3", "title": "Globe", "text": "The Globe Theatre stood in London."},
            {"id": "p4", "title": "Kronborg", "text": "Kronborg is a castle near Helsingor."},
        ],
    },
    {
        "id": "q2",
        "question": "capital of france",
        "answers": ["Paris"],
        "category": "place",
        "ctxs": [
            {"id": "p5", "title": "Lyon", "text": "Lyon is a city in France."},
            {"id": "p6", "title": "France", "text": "The capital of France is Paris."},
        ],
    },
    {
        "id": "q3",
        "question": "who discovered penicillin",
        "answers": ["Alexander Fleming"],
        "ctxs": [{"id": "p7", "title": "", "text": "Alexander Fleming discovered penicillin in 1928."}],
    },
]


def first_passage_reader(prompt: str) -> str:
    """Answer with the last capitalised phrase of the first passage's text ('unknown' closed-book)."""
    line = next((x for x in prompt.splitlines() if x.startswith("[1] ")), None)
    if line is None:
        return "Answer: unknown"
    names = re.findall(r"[A-Z][a-z]+(?: [A-Z][a-z]+)*", line[4:].rsplit(": ", 1)[-1])
    return f"Answer: {names[-1]}." if names else "Answer: unknown"


@pytest.fixture()
def retrieval_file(tmp_path: Path) -> Path:
    path = tmp_path / "retrieval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------- templates


def test_qa_template_numbers_passages_and_includes_question():
    t = load_template("qa")
    ctxs = [Ctx(id="a", title="Hamlet", text="A play."), Ctx(id="b", title="", text="No title here.")]
    chat = t.render("who wrote hamlet?", ctxs)
    assert [m["role"] for m in chat] == ["system", "user"]
    assert chat[0]["content"] == BUILTIN_TEMPLATES["qa"].system
    user = chat[1]["content"]
    assert user.startswith("Passages:\n[1] Hamlet: A play.\n[2] No title here.\n\n")
    assert user.endswith("Question: who wrote hamlet?\nAnswer:")


def test_closed_book_and_text_rendering():
    t = load_template("qa")
    chat = t.render("who wrote hamlet", [])
    assert chat[-1]["content"] == "Question: who wrote hamlet\nAnswer:"
    text = t.render_text("who wrote hamlet", ["Title: Hamlet Content: A play."])
    assert text.startswith(t.system + "\n\nPassages:\n[1] Hamlet: A play.")
    # no system message when the template has none
    plain = load_template("plain").render("q?", [" Title: T Content: body"])
    assert plain == [{"role": "user", "content": "Title: T Content: body\n\nQuestion: q?\nAnswer:"}]


def test_dpa_template_keeps_authors_passage_layout_and_order():
    msg = load_template("dpa").render("who?", ["Title: A Content: one", "Title: B Content: two"])[0]["content"]
    assert msg.index("[1] Title: A Content: one") < msg.index("[2] Title: B Content: two") < msg.index("who?")
    assert "own knowledge" in msg


def test_template_from_yaml(tmp_path: Path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "system: Be brief.\nuser: |-\n  Docs {json: braces kept}\n  {passages}\n  Q: {question}\n"
        "passage_format: '<{i}|{title}> {text}'\n",
        encoding="utf-8",
    )
    t = load_template(str(path))
    assert t.name == "mine"
    chat = t.render("what?", [Ctx(title="T", text="body")])
    assert chat == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Docs {json: braces kept}\n<1|T> body\nQ: what?"},
    ]


def test_template_yaml_errors_name_the_key(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("user: '{passages} {question}'\nsytem: typo\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown key 'sytem'"):
        load_template(bad)
    missing = tmp_path / "missing.yaml"
    missing.write_text("user: 'no placeholders'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'user'.*\{passages\} and \{question\}"):
        load_template(missing)
    with pytest.raises(ConfigError, match="unknown prompt template 'nope'"):
        load_template("nope")


def test_template_validates_placeholders():
    with pytest.raises(ValueError, match="closed_book_user"):
        PromptTemplate(user="{passages} {question}", closed_book_user="no question")


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Paris", "Paris"),
        ("Answer: Paris.", "Paris"),
        ("  answer:  Paris\nQuestion: next one", "Paris"),
        ('"William Shakespeare."', "William Shakespeare"),
        ("**Answer:** Marie Curie", "Marie Curie"),
        ("Answer:\n\nJuly 2, 1776", "July 2, 1776"),
        ("A: 42", "42"),
        ("Washington, D.C.", "Washington, D.C"),
        ("The Beatles...", "The Beatles..."),
        ("", ""),
        ("\n\n", ""),
    ],
)
def test_clean_answer(raw: str, clean: str):
    assert clean_answer(raw) == clean


# ----------------------------------------------------------------------------------------------------- stage


def test_answer_records_scores_and_passage_ids():
    records = [RetrievalRecord.model_validate(r) for r in RECORDS]
    fake = FakeGenerator(first_passage_reader)
    preds = answer_records(records, fake, load_template("qa"), top_k=1, params=GeneratorOptions().generation_params())
    assert [p["prediction"] for p in preds] == ["William Shakespeare", "France", "Alexander Fleming"]
    assert preds[0]["raw_output"] == "Answer: William Shakespeare."
    assert [p["ctx_ids"] for p in preds] == [["p1"], ["p5"], ["p7"]]
    assert [p["ctx_has_answer"] for p in preds] == [[True], [False], [True]]
    for p, r in zip(preds, RECORDS, strict=True):
        assert p["scores"] == score_answer(p["prediction"], r["answers"])
    assert preds[0]["category"] == "person" and "category" not in preds[2]


def test_run_answer_writes_predictions_and_second_run_hits_cache(run_dir: Path, retrieval_file: Path):
    cfg = AnswerConfig(backend="fake", retrieval=retrieval_file, top_k=2, out_dir=run_dir / "a", progress=False)
    fake = FakeGenerator(first_passage_reader)
    out = run_answer(cfg, backend=fake)
    assert out.predictions == run_dir / "a" / "predictions.jsonl" and out.metrics == run_dir / "a" / "metrics.json"
    assert fake.calls == 3
    preds = read_jsonl(out)
    assert [p["id"] for p in preds] == ["q1", "q2", "q3"]
    assert [len(p["ctx_ids"]) for p in preds] == [2, 2, 1]
    metrics = json.loads((run_dir / "a" / "metrics.json").read_text())
    expected_hits = 100 * sum(p["scores"]["hit"] for p in preds) / 3
    assert metrics["hits@1"] == pytest.approx(expected_hits)
    assert metrics["n"] == 3
    manifest = json.loads((run_dir / "a" / "manifest.json").read_text())
    assert manifest["counts"]["generated"] == 3

    fake2 = FakeGenerator(first_passage_reader)
    run_answer(cfg.model_copy(update={"out_dir": run_dir / "b"}), backend=fake2)
    assert fake2.calls == 0
    assert read_jsonl(run_dir / "b" / "predictions.jsonl") == preds
    assert json.loads((run_dir / "b" / "manifest.json").read_text())["counts"]["cache_hits"] == 3


def test_cache_key_follows_the_prompt(run_dir: Path, retrieval_file: Path):
    cfg = AnswerConfig(backend="fake", retrieval=retrieval_file, top_k=1, out_dir=run_dir / "a", progress=False)
    run_answer(cfg, backend=FakeGenerator(first_passage_reader))
    fake = FakeGenerator(first_passage_reader)
    run_answer(cfg.model_copy(update={"template": "plain", "out_dir": run_dir / "b"}), backend=fake)
    assert fake.calls == 3


def test_closed_book_from_questions_and_top_k_zero(run_dir: Path, retrieval_file: Path):
    questions = run_dir / "questions.jsonl"
    questions.write_text(json.dumps({"question": "who wrote hamlet", "answer": ["Shakespeare"]}) + "\n")
    seen: list[str] = []

    def reader(prompt: str) -> str:
        seen.append(prompt)
        return "unknown"

    cfg = AnswerConfig(backend="fake", questions=questions, out_dir=run_dir / "cb", progress=False)
    preds = read_jsonl(run_answer(cfg, backend=FakeGenerator(reader)))
    assert preds[0]["ctx_ids"] == [] and preds[0]["answers"] == ["Shakespeare"]
    assert "Passages" not in seen[0] and "who wrote hamlet" in seen[0]
    cfg = AnswerConfig(backend="fake", retrieval=retrieval_file, top_k=0, out_dir=run_dir / "k0", progress=False)
    preds = read_jsonl(run_answer(cfg, backend=FakeGenerator(reader)))
    assert all(p["ctx_ids"] == [] and p["ctx_has_answer"] == [] for p in preds)
    assert not any("Hamlet is a tragedy" in s for s in seen)


def test_config_needs_exactly_one_input(tmp_path: Path):
    with pytest.raises(ValueError, match="--retrieval"):
        AnswerConfig(out_dir=tmp_path)
    with pytest.raises(ValueError, match="not both"):
        AnswerConfig(out_dir=tmp_path, retrieval=tmp_path / "r.jsonl", questions=tmp_path / "q.jsonl")


def test_reranker_path_reranks_then_keeps_top_k(run_dir: Path, retrieval_file: Path, monkeypatch):
    created: dict = {}

    class ReverseReranker:
        """Stands in for dpa_rag.reranker.rerank.Reranker: reverses the candidate order."""

        def __init__(self, model_path: str, **kwargs) -> None:
            created["path"] = model_path
            created["kwargs"] = kwargs

        def rerank(self, records, top_k):
            created["depths"] = [len(r.ctxs) for r in records]
            return [r.model_copy(update={"ctxs": list(reversed(r.ctxs))[:top_k]}) for r in records]

    module = types.ModuleType("dpa_rag.reranker.rerank")
    module.Reranker = ReverseReranker
    monkeypatch.setitem(sys.modules, "dpa_rag.reranker.rerank", module)
    cfg = AnswerConfig(
        backend="fake", retrieval=retrieval_file, top_k=1, rerank_depth=3, reranker=run_dir / "rr", dtype="bfloat16",
        out_dir=run_dir / "out", progress=False, reranker_fusion=False,  # YAML's `off`
    )
    preds = read_jsonl(run_answer(cfg, backend=FakeGenerator(first_passage_reader)))
    assert created["path"] == str(run_dir / "rr")
    assert created["kwargs"]["fusion"] == "off"
    assert created["kwargs"]["batch_size"] == cfg.reranker_batch_size
    assert created["kwargs"]["dtype"] == "bfloat16"  # one dtype spelling for the reader and the reranker
    assert created["depths"] == [3, 2, 1]  # candidates cut to rerank_depth before reranking
    assert [p["ctx_ids"] for p in preds] == [["p3"], ["p6"], ["p7"]]
    assert preds[1]["prediction"] == "Paris" and preds[1]["scores"]["hit"] == 1.0


def test_reads_lost_in_the_middle_layout(run_dir: Path, shared_data: Path):
    path = shared_data / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz"
    cfg = AnswerConfig(backend="fake", retrieval=path, limit=4, out_dir=run_dir / "litm", progress=False)
    preds = read_jsonl(run_answer(cfg, backend=FakeGenerator(first_passage_reader)))
    assert len(preds) == 4
    # the oracle passage is the gold one, and the file says so
    assert all(p["ctx_has_answer"] == [True] for p in preds)
    assert all(p["answers"] for p in preds)


def test_cli_answer(run_dir: Path, retrieval_file: Path):
    from dpa_rag.cli.main import app

    result = CliRunner().invoke(
        app,
        ["answer", "--backend", "fake", "--retrieval", str(retrieval_file), "--template", "dpa", "--top-k", "2",
         "--out-dir", str(run_dir / "cli"), "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    preds = read_jsonl(run_dir / "cli" / "predictions.jsonl")
    # the default fake reader copies the first capitalised phrase of the first passage
    assert [p["prediction"] for p in preds] == ["Hamlet", "Lyon", "unknown"]
    assert (run_dir / "cli" / "config.yaml").exists()


def test_cli_answer_errors_exit_2(run_dir: Path, retrieval_file: Path):
    from dpa_rag.cli.main import app

    bad = run_dir / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["answer", "--backend", "fake", "--retrieval", str(bad), "--out-dir", str(run_dir)])
    assert result.exit_code == 2
    assert f"{bad}:2" in result.output
    result = runner.invoke(
        app, ["answer", "--backend", "fake", "--retrieval", str(retrieval_file), "--template", "nope",
              "--out-dir", str(run_dir)],
    )
    assert result.exit_code == 2 and "unknown prompt template 'nope'" in result.output
