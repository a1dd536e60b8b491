from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from dpa_rag.data.loaders import load_corpus, load_questions, load_retrieval, parse_rendered_passage
from dpa_rag.data.reranker_records import load_reranker_pairs, load_reranker_train
from dpa_rag.io import DataError, iter_jsonl, read_resumable_jsonl, write_json, write_jsonl


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_malformed_jsonl_names_file_and_line(tmp_path):
    f = _write(tmp_path / "q.jsonl", ['{"question": "a", "answers": ["b"]}', "", '{"question": "c", answers: 1}'])
    with pytest.raises(DataError, match=r"q\.jsonl:3: invalid JSON"):
        list(iter_jsonl(f))
    f2 = _write(tmp_path / "arr.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"arr\.jsonl:1: expected a JSON object"):
        list(iter_jsonl(f2))


def test_questions_layouts(tmp_path):
    ours = _write(tmp_path / "ours.jsonl", ['{"id": "x1", "question": "who?", "answers": ["A", "B"]}'])
    nq = _write(tmp_path / "nq.jsonl", ['{"question": "when?", "answer": ["1999"]}'])
    flash = _write(tmp_path / "flash.jsonl", ['{"id": "t0", "question": "what?", "golden_answers": ["C"]}'])
    authors = _write(tmp_path / "a.jsonl", ['{"question": "how?", "reference": ["D"], "ctx": "x", "category": 1}'])
    assert load_questions(ours)[0].answers == ["A", "B"]
    q = load_questions(nq)[0]
    assert q.answers == ["1999"] and q.id.startswith("q")
    assert load_questions(flash)[0].id == "t0"
    assert load_questions(authors)[0].answers == ["D"]
    gz = tmp_path / "g.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as fh:
        fh.write('{"question": "gz?", "answers": ["E"]}\n')
    assert load_questions(gz)[0].question == "gz?"
    js = tmp_path / "list.json"
    write_json(js, [{"question": "j?", "answers": ["F"]}])
    assert load_questions(js)[0].answers == ["F"]


def test_questions_errors(tmp_path):
    f = _write(tmp_path / "bad.jsonl", ['{"question": "ok", "answers": ["a"]}', '{"question": "no answers"}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no gold answers"):
        load_questions(f)
    assert load_questions(f, require_answers=False)[1].answers == []
    f2 = _write(tmp_path / "bad2.jsonl", ['{"question": "   ", "answers": ["a"]}'])
    with pytest.raises(DataError, match=r"bad2\.jsonl:1: .*question"):
        load_questions(f2)
    f3 = _write(tmp_path / "bad3.jsonl", ['{"question": "x", "answers": [{"a": 1}]}'])
    with pytest.raises(DataError, match=r"bad3\.jsonl:1"):
        load_questions(f3)


def test_duplicate_ids_are_an_error_unless_deduped(tmp_path):
    f = _write(tmp_path / "d.jsonl", ['{"question": "same", "answers": ["a"]}'] * 2)
    with pytest.raises(DataError, match=r"d.jsonl:2: .*line 1.*--dedupe-ids"):
        load_questions(f)
    ids = [q.id for q in load_questions(f, dedupe_ids=True)]
    assert len(set(ids)) == 2


def test_corpus_layouts(tmp_path):
    ours = _write(tmp_path / "c.jsonl", ['{"id": "1", "title": "T", "text": "body"}'])
    flash = _write(tmp_path / "f.jsonl", ['{"id": "0", "contents": "\\"Evan Morris\\"\\nEvan Morris was a lobbyist"}'])
    tsv = tmp_path / "p.tsv"
    tsv.write_text("id\ttext\ttitle\n7\tsome text\tSome Title\n", encoding="utf-8")
    dpr = _write(
        tmp_path / "r.jsonl",
        ['{"question": "q", "answers": ["a"], "ctxs": [{"title": "G", "text": "gold", "hasanswer": true}]}'],
    )
    ps = load_corpus([ours, flash, tsv, dpr])
    assert [p.title for p in ps] == ["T", "Evan Morris", "Some Title", "G"]
    assert ps[1].text == "Evan Morris was a lobbyist"
    assert ps[0].render() == "Title: T Content: body"


def test_corpus_dedup_and_conflicts(tmp_path):
    a = _write(
        tmp_path / "a.jsonl", ['{"id": "1", "title": "T", "text": "x"}', '{"id": "2", "title": "T", "text": "x"}']
    )
    assert len(load_corpus(a)) == 1
    b = _write(
        tmp_path / "b.jsonl", ['{"id": "1", "title": "T", "text": "x"}', '{"id": "1", "title": "U", "text": "y"}']
    )
    with pytest.raises(DataError, match=r"b\.jsonl:2: passage id '1'"):
        load_corpus(b)
    c = _write(tmp_path / "c.jsonl", ['{"id": "1", "title": "T"}'])
    with pytest.raises(DataError, match=r"c\.jsonl:1"):
        load_corpus(c)


def test_retrieval_layouts(tmp_path):
    f = _write(
        tmp_path / "r.jsonl",
        [
            json.dumps(
                {"question": "q", "answers": ["a"], "ctxs": [{"id": 5, "title": "T", "text": "x", "score": 1.5}]}
            ),
        ],
    )
    r = load_retrieval(f)[0]
    assert r.ctxs[0].id == "5" and r.ctxs[0].score == 1.5
    bad = _write(tmp_path / "bad.jsonl", ['{"question": "q", "answers": ["a"]}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: no 'ctxs'"):
        load_retrieval(bad)


def test_parse_rendered_passage():
    assert parse_rendered_passage(" Title: Paris Content: Paris is the capital.") == ("Paris", "Paris is the capital.")
    assert parse_rendered_passage("plain text") == ("", "plain text")


def test_shared_files_load(shared_data):
    lim = load_retrieval(shared_data / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz", limit=5)
    assert len(lim) == 5 and lim[0].ctxs[0].has_answer is True
    assert len(load_questions(shared_data / "nq-open" / "NQ-open.dev.jsonl")) == 3610
    assert len(load_questions(shared_data / "flashrag" / "nq_test.jsonl")) == 17
    assert len(load_corpus(shared_data / "flashrag" / "wiki_sample_corpus.jsonl")) == 1000
    assert len(load_questions(shared_data / "genread-webq" / "webq-dev.jsonl")) == 300
    train = load_reranker_train(shared_data / "dpa-rag" / "example_train_dataset.jsonl")
    assert len(train) == 20 and {r.classification.label for r in train} == {1, 2}
    pairs = load_reranker_pairs(shared_data / "dpa-rag" / "example_valid_dataset.jsonl")
    assert len(pairs) == 20 and pairs[0].before is not None
    assert len(load_retrieval(shared_data / "dpa-rag" / "example_test_dataset.jsonl")) == 20


def test_authors_file_validation(tmp_path):
    f = _write(
        tmp_path / "t.jsonl",
        [
            '{"query": "q", "classification": {"text": "x", "label": 3}, '
            '"rank_list": [], "positive": [], "negative": []}'
        ],
    )
    with pytest.raises(DataError, match=r"t\.jsonl:1: not a RerankerTrainRecord: classification\.label"):
        load_reranker_train(f)


def test_atomic_write_leaves_no_partial_file(tmp_path):
    out = tmp_path / "out.jsonl"
    write_jsonl(out, [{"a": 1}])

    def boom():
        yield {"a": 2}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_jsonl(out, boom())
    assert out.read_text() == '{"a": 1}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_read_resumable_truncates_partial_last_line(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_bytes(b'{"id": 1}\n{"id": 2}\n{"id": 3, "x"')
    assert [r["id"] for r in read_resumable_jsonl(f)] == [1, 2]
    assert f.read_bytes() == b'{"id": 1}\n{"id": 2}\n'
    f.write_bytes(b'{"id": 1}\n{"id": 2}')
    assert [r["id"] for r in read_resumable_jsonl(f)] == [1, 2]
    assert f.read_bytes() == b'{"id": 1}\n{"id": 2}\n'
    f.write_bytes(b'{"id": 1}\nnot json\n{"id": 3}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:2"):
        read_resumable_jsonl(f)
    assert read_resumable_jsonl(tmp_path / "missing.jsonl") == []
