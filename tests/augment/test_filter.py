"""Consistency filter: NLI label handling and rules (tiny BERT with a forced winner), similarity, reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dpa_rag.augment.filter import FilterConfig, filter_records, load_augmentation_records, render_report, run
from dpa_rag.augment.nli import NLIScorer, label_indices, nli_decision
from dpa_rag.io import DataError, read_records, write_jsonl

SWAPPED = {0: "CONTRADICTION", 1: "Neutral", 2: "entailment"}  # the usual MNLI order is entailment, neutral, contra.
USUAL = {0: "entailment", 1: "neutral", 2: "contradiction"}


def make_nli(tiny_bert_dir: Path, out: Path, id2label: dict[int, str], bias: list[float]) -> Path:
    """A tiny BERT classifier whose output ignores the input: weight 0, so softmax(bias) always."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig.from_pretrained(tiny_bert_dir, num_labels=3, id2label=id2label,
                                     label2id={v: k for k, v in id2label.items()})
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(out)
    for f in tiny_bert_dir.iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def _records() -> list[dict]:
    return [
        {"id": "q1", "instruction": "who wrote hamlet", "back_instruction": ["who is the author of hamlet",
         "which writer created the play hamlet", "SELECT ?a WHERE { ?p rdfs:label 'Hamlet' ; wdt:P50 ?a }"],
         "answers": ["Shakespeare"], "strategies": ["rephrasing", "constraint", "sparql"], "failures": {"complexity":
         "refusal"}},
        {"id": "q2", "instruction": "what is the capital of france", "back_instruction": ["which city is the capital "
         "of france"], "answers": ["Paris"], "strategies": ["rephrasing"], "failures": {}},
    ]


def test_label_indices_follow_config() -> None:
    assert label_indices(SWAPPED) == {"entailment": 2, "neutral": 1, "contradiction": 0}
    assert label_indices(USUAL) == {"entailment": 0, "neutral": 1, "contradiction": 2}
    assert label_indices({"0": "entailment", "1": "not_entailment", "2": "contradiction"})["entailment"] == 0
    assert label_indices({0: "ENTAILMENT", 1: "CONTRADICTION"}) == {"entailment": 0, "contradiction": 1}
    with pytest.raises(ValueError, match="no entailment or contradiction label"):
        label_indices({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})


def test_nli_decision_rules() -> None:
    contra = {"entailment": 0.2, "neutral": 0.3, "contradiction": 0.5}
    neutral = {"entailment": 0.2, "neutral": 0.6, "contradiction": 0.2}
    entail = {"entailment": 0.7, "neutral": 0.2, "contradiction": 0.1}
    assert nli_decision(contra) == "contradiction"
    assert nli_decision(neutral) is None and nli_decision(entail) is None
    assert nli_decision(neutral, require_entailment=True) == "not_entailment"
    assert nli_decision(entail, require_entailment=True) is None
    assert nli_decision(neutral, contradiction_threshold=0.15) == "contradiction"
    assert nli_decision(contra, contradiction_threshold=0.6) is None  # the threshold replaces the argmax rule
    assert nli_decision(entail, contradiction_threshold=0.1) == "contradiction"  # >= threshold


@pytest.mark.parametrize(
    ("id2label", "bias", "kept"),
    [
        (SWAPPED, [3.0, 0.0, 0.0], 0),  # index 0 wins = contradiction under the swapped config: everything dropped
        (USUAL, [3.0, 0.0, 0.0], 4),  # the same logits under the usual config = entailment: everything kept
        (SWAPPED, [0.0, 0.0, 3.0], 4),  # index 2 = entailment
    ],
)
def test_nli_filter_follows_id2label(
    tiny_bert_dir: Path, tmp_path: Path, id2label: dict, bias: list[float], kept: int
) -> None:
    model_dir = make_nli(tiny_bert_dir, tmp_path / "nli", id2label, bias)
    cfg = FilterConfig(input=tmp_path, out_dir=tmp_path / "o", backend="nli", nli_model=str(model_dir),
                       device="cpu", batch_size=3, progress=False)
    out, report = filter_records(cfg, _records())
    assert report["kept"] == kept and report["dropped"] == 4 - kept
    winner = id2label[max(range(3), key=lambda i: bias[i])].lower()
    for rec in out:
        assert len(rec["nli_scores"]) == len(rec["back_instruction"]) == len(rec["strategies"])
        for scores in rec["nli_scores"] + [d["nli_scores"] for d in rec["dropped"]]:
            assert max(scores, key=scores.get) == winner
            assert scores[winner] == pytest.approx(0.9094, abs=1e-3)  # e^3 / (e^3 + 2)
            assert sum(scores.values()) == pytest.approx(1.0, abs=1e-4)
    if kept == 0:
        assert {d["reason"] for r in out for d in r["dropped"]} == {"contradiction"}
        assert report["per_strategy"]["rephrasing"] == {
            "rewrites": 2, "kept": 0, "dropped": 2, "drop_rate": 1.0,
            "mean_p_entailment": pytest.approx(0.0453, abs=1e-3), "reasons": {"contradiction": 2},
            "parse_failures": 0,
        }


def test_nli_threshold_and_require_entailment(tiny_bert_dir: Path, tmp_path: Path) -> None:
    # neutral wins (0.576), p(contradiction) = p(entailment) = 1 / (2 + e) = 0.212
    model_dir = make_nli(tiny_bert_dir, tmp_path / "nli", SWAPPED, [0.0, 1.0, 0.0])
    scorer = NLIScorer(str(model_dir), device="cpu")
    probs = scorer.score(["who wrote hamlet"], ["who is the author of hamlet"])[0]
    assert probs["neutral"] == pytest.approx(0.5761, abs=1e-3)
    assert probs["contradiction"] == pytest.approx(0.2119, abs=1e-3)
    base = dict(input=tmp_path, out_dir=tmp_path / "o", backend="nli", nli_model=str(model_dir), device="cpu",
                progress=False)
    assert filter_records(FilterConfig(**base), _records())[1]["kept"] == 4  # the authors' rule: neutral passes
    assert filter_records(FilterConfig(contradiction_threshold=0.2, **base), _records())[1]["kept"] == 0
    assert filter_records(FilterConfig(contradiction_threshold=0.3, **base), _records())[1]["kept"] == 4
    out, report = filter_records(FilterConfig(require_entailment=True, **base), _records())
    assert report["kept"] == 0 and report["per_strategy"]["sparql"]["reasons"] == {"not_entailment": 1}


def test_nli_unnamed_labels_error(tiny_bert_dir: Path, tmp_path: Path) -> None:
    model_dir = make_nli(tiny_bert_dir, tmp_path / "nli", {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, [0, 0, 0])
    with pytest.raises(ValueError, match="id2label"):
        NLIScorer(str(model_dir), device="cpu")


def test_similarity_filter_tiny_encoder(tiny_bert_dir: Path, tmp_path: Path) -> None:
    recs = [{"id": "q1", "instruction": "who wrote hamlet", "back_instruction": ["who wrote hamlet", "", 7],
             "strategies": ["rephrasing", "complexity", "constraint"]}]
    path = tmp_path / "aug.jsonl"
    write_jsonl(path, recs)
    base = dict(input=path, encoder=str(tiny_bert_dir), device="cpu", progress=False)
    out = run(FilterConfig(out_dir=tmp_path / "a", **base))
    rec = next(r for _, r in read_records(out))
    assert rec["back_instruction"] == ["who wrote hamlet"] and rec["strategies"] == ["rephrasing"]
    assert rec["similarity"][0] == pytest.approx(1.0, abs=1e-5)
    assert [d["reason"] for d in rec["dropped"]] == ["invalid", "invalid"]
    q = [r for _, r in read_records(tmp_path / "a" / "questions_augmented.jsonl")]
    assert q == [{"id": "q1::rephrasing", "question": "who wrote hamlet", "answers": [], "origin_id": "q1",
                  "strategy": "rephrasing"}]
    run(FilterConfig(out_dir=tmp_path / "b", similarity_threshold=1.01, **base))
    report = json.loads((tmp_path / "b" / "filter_report.json").read_text())
    assert report["kept"] == 0 and report["per_strategy"]["rephrasing"]["reasons"] == {"low_similarity": 1}
    run(FilterConfig(out_dir=tmp_path / "c", similarity_threshold=1.01, strategy_thresholds={"rephrasing": 0.9},
                     **base))
    assert json.loads((tmp_path / "c" / "filter_report.json").read_text())["kept"] == 1


def test_load_augmented_authors_format_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "authors.jsonl"
    write_jsonl(path, [{"instruction": "who wrote hamlet", "back_instruction": ["who penned hamlet", "x"]}])
    rec = load_augmentation_records(path)[0]
    assert rec["id"].startswith("q") and rec["strategies"] == ["rewrite0", "rewrite1"] and rec["answers"] == []
    write_jsonl(path, [{"instruction": "q", "back_instruction": ["a"], "strategies": ["s1", "s2"]}])
    with pytest.raises(DataError, match=r"authors.jsonl:1: 2 strategies for 1 rewrites"):
        load_augmentation_records(path)
    write_jsonl(path, [{"instruction": "", "back_instruction": []}])
    with pytest.raises(DataError, match="instruction"):
        load_augmentation_records(path)


def test_report_markdown_counts() -> None:
    cfg = FilterConfig(input=Path("x"), out_dir=Path("y"))
    _, report = filter_records(cfg, _records(), scores=[0.9, 0.3, 0.1, 0.8])
    assert report["per_strategy"]["rephrasing"]["kept"] == 2
    assert report["per_strategy"]["constraint"]["dropped"] == 1
    assert report["per_strategy"]["complexity"] == {
        "rewrites": 0, "kept": 0, "dropped": 0, "drop_rate": 0.0, "reasons": {}, "parse_failures": 1,
    }
    md = render_report(report)
    assert "| rephrasing | 2 | 2 | 0 | 0.0% | 0.850 | - | 0 |" in md
    assert "| **total** | 4 | 2 | 2 | 50.0% |" in md
    with pytest.raises(ValueError, match="3 scores for 4 rewrites"):
        filter_records(cfg, _records(), scores=[0.9, 0.3, 0.1])


@pytest.mark.slow
def test_similarity_minilm_default_threshold(tmp_path: Path) -> None:
    recs = [{"id": "q1", "instruction": "when did the eagles win last super bowl",
             "back_instruction": ["In which year did the Philadelphia Eagles most recently win the Super Bowl?",
                                  "what is the boiling point of mercury in kelvin"],
             "strategies": ["rephrasing", "complexity"]}]
    out, report = filter_records(FilterConfig(input=tmp_path, out_dir=tmp_path, device="cpu", progress=False), recs)
    assert out[0]["strategies"] == ["rephrasing"]
    assert out[0]["similarity"][0] >= 0.5 and out[0]["dropped"][0]["similarity"] < 0.5
    assert report["per_strategy"]["complexity"]["reasons"] == {"low_similarity": 1}
