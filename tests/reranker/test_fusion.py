"""Retriever fusion: the pure blend, the alpha choice, and the Reranker / rerank command applying a saved weight."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.reranker.fusion import fuse, select_alpha
from dpa_rag.reranker.model import load_reranker_model
from dpa_rag.reranker.rerank import Reranker


def _record(rel: list[bool]) -> RetrievalRecord:
    ctxs = [{"id": f"p{i}", "title": "", "text": f"passage {i}", "has_answer": r} for i, r in enumerate(rel)]
    return RetrievalRecord(id="q", question="q?", answers=["a"], ctxs=ctxs)


def test_fuse_by_hand():
    # alpha 0.5, scores [3, 1] -> z [1, -1]; prior -log([1, 2]) = [0, -0.693] -> z [1, -1]
    assert fuse([3.0, 1.0], [1, 2], 0.5) == pytest.approx([1.0, -1.0])
    # reranker reversed against the retriever: the halves cancel
    assert fuse([1.0, 3.0], [1, 2], 0.5) == pytest.approx([0.0, 0.0])
    # three passages, alpha 0.25
    zs = [-1.2247449, 0.0, 1.2247449]  # z of [0, 1, 2]
    p = [0.0, -math.log(2), -math.log(3)]
    mean = sum(p) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in p) / 3)
    expected = [0.25 * a + 0.75 * (b - mean) / std for a, b in zip(zs, p, strict=True)]
    assert fuse([0.0, 1.0, 2.0], [1, 2, 3], 0.25) == pytest.approx(expected, abs=1e-6)


def test_fuse_ends_give_each_order():
    scores, ranks = [0.2, 0.9, -0.4, 0.5], [1, 2, 3, 4]
    by = lambda xs: sorted(range(len(xs)), key=lambda i: -xs[i])  # noqa: E731
    assert by(fuse(scores, ranks, 1.0)) == by(scores)
    assert by(fuse(scores, ranks, 0.0)) == [0, 1, 2, 3]
    assert fuse([5.0, 5.0], [1, 2], 1.0) == [0.0, 0.0]  # constant scores: no signal, no division by zero


@pytest.mark.parametrize(("scores", "ranks", "alpha", "match"), [
    ([1.0], [1, 2], 0.5, "scores for"), ([1.0, 2.0], [0, 1], 0.5, "1-based"), ([1.0], [1], 1.5, r"\[0, 1\]"),
])
def test_fuse_errors(scores, ranks, alpha, match):
    with pytest.raises(ValueError, match=match):
        fuse(scores, ranks, alpha)


def test_select_alpha_picks_what_ranks_best():
    records = [_record([False, False, True]), _record([True, False, False]), _record([False, True, False])]
    good = [[0.0, 0.1, 2.0], [3.0, 0.0, 0.1], [0.0, 5.0, 0.1]]  # the reranker puts every answer first
    alpha, table = select_alpha(records, good)
    assert alpha == 1.0 and table["1.0"]["mrr"] == pytest.approx(1.0)
    assert table["0.0"]["mrr"] == pytest.approx((1 / 3 + 1 + 1 / 2) / 3)  # the retriever's order
    bad = [[5.0, 4.0, -1.0], [-3.0, 0.0, 0.1], [4.0, -5.0, 0.1]]  # the reranker buries every answer
    alpha, table = select_alpha(records, bad)
    assert alpha is not None and table[str(alpha)]["mrr"] == pytest.approx(table["0.0"]["mrr"])
    assert table["1.0"]["mrr"] < table["0.0"]["mrr"]
    assert all(table[str(alpha)]["mrr"] >= m["mrr"] for m in table.values())


def test_select_alpha_without_answers():
    alpha, _ = select_alpha([_record([False, False])], [[1.0, 0.0]])
    assert alpha is None
    with pytest.raises(ValueError, match="score lists"):
        select_alpha([_record([True])], [])


@pytest.fixture(scope="module")
def fused_model(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fused")
    torch.manual_seed(0)
    model, tok = load_reranker_model(str(tiny_bert_dir), "single")
    model.config.dpa_rag = {**model.config.dpa_rag, "retriever_fusion": {"alpha": 0.0, "prior": "-log(rank)"}}
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _retrieval() -> list[RetrievalRecord]:
    texts = ["the moon", "paris is the capital of france", "berlin", "the nile is a river", "einstein physics"]
    ctxs = [{"id": f"p{i}", "title": "T", "text": t, "score": 10.0 - i, "has_answer": i == 1}
            for i, t in enumerate(texts)]
    return [RetrievalRecord(id="q0", question="what is the capital of france", answers=["paris"], ctxs=ctxs)]


def test_reranker_applies_saved_fusion(fused_model):
    records = _retrieval()
    saved = Reranker(str(fused_model), device="cpu", dtype="fp32").rerank(records, top_k=3)[0]
    assert [c.id for c in saved.ctxs] == ["p0", "p1", "p2"]  # alpha 0 = the retriever's order
    assert all("reranker_score" in c.model_extra for c in saved.ctxs)
    plain = Reranker(str(fused_model), device="cpu", dtype="fp32", fusion="off")
    own = plain.rerank(records, top_k=None)[0]
    raw = plain.score(records[0].question, [c.render() for c in records[0].ctxs])
    assert [c.id for c in own.ctxs] == [f"p{i}" for i in sorted(range(5), key=lambda i: -raw[i])]
    assert [c.id for c in own.ctxs] != ["p0", "p1", "p2", "p3", "p4"]  # so the first check can fail
    half = Reranker(str(fused_model), device="cpu", dtype="fp32", fusion=0.5).rerank(records, top_k=None)[0]
    want = fuse(raw, [1, 2, 3, 4, 5], 0.5)
    assert [c.score for c in half.ctxs] == pytest.approx(sorted(want, reverse=True), abs=1e-6)
    with pytest.raises(ValueError, match="fusion"):
        Reranker(str(fused_model), device="cpu", fusion="sometimes")


def test_rerank_command_fusion_option(fused_model, run_dir):
    from dpa_rag.cli.main import app
    from dpa_rag.io import write_jsonl

    inp = run_dir / "r.jsonl"
    write_jsonl(inp, [r.model_dump(mode="json", exclude_none=True) for r in _retrieval()])
    for fusion in ("saved", "0", "off"):
        out = run_dir / f"out-{fusion}"
        res = CliRunner().invoke(app, ["rerank", "--input", str(inp), "--model", str(fused_model), "--out-dir",
                                       str(out), "--top-k", "5", "--device", "cpu", "--fusion", fusion])
        assert res.exit_code == 0, res.output
        row = json.loads((out / "reranked.jsonl").read_text())
        ids = [c["id"] for c in row["ctxs"]]
        if fusion == "off":  # the model alone: its own order, no fused score
            assert ids != ["p0", "p1", "p2", "p3", "p4"] and "reranker_score" not in row["ctxs"][0]
        else:  # the saved alpha 0 (or --fusion 0): the retriever's order
            assert ids == ["p0", "p1", "p2", "p3", "p4"] and "reranker_score" in row["ctxs"][0]
    res = CliRunner().invoke(app, ["rerank", "--input", str(inp), "--model", str(fused_model), "--out-dir",
                                   str(run_dir / "bad"), "--fusion", "2"])
    assert res.exit_code != 0 and "fusion" in res.output


def test_resolve_alpha():
    from dpa_rag.reranker.fusion import resolve_alpha

    assert resolve_alpha("saved", None) is None and resolve_alpha("saved", {"alpha": 1.0}) is None
    assert resolve_alpha("saved", {"alpha": 0.3}) == 0.3 and resolve_alpha("off", {"alpha": 0.3}) is None
    assert resolve_alpha("0.25", None) == 0.25 and resolve_alpha(0.0, None) == 0.0 and resolve_alpha("1", None) is None
    for bad in ("x", "-0.1", 1.5):
        with pytest.raises(ValueError, match="fusion"):
            resolve_alpha(bad, None)


def test_fusion_settings_from_yaml(run_dir):
    import yaml

    from dpa_rag.config import load_config
    from dpa_rag.reranker.config import RerankConfig
    from dpa_rag.reranker.fusion import normalize_fusion

    assert normalize_fusion(False) == "off" and normalize_fusion(0.3) == "0.3" and normalize_fusion("Saved") == "saved"
    assert normalize_fusion(0) == "0.0" and normalize_fusion(1) == "1.0"
    for text, want in (("off", "off"), ("0.3", "0.3"), ("saved", "saved")):
        path = run_dir / f"r-{text}.yaml"
        path.write_text(yaml.safe_dump({"input": "x.jsonl", "model": "m"}) + f"fusion: {text}\n")
        assert load_config(RerankConfig, path).fusion == want
    with pytest.raises(ValueError, match="fusion"):
        RerankConfig(input="x", model="m", fusion=1.5)


def test_safe_ranks():
    from dpa_rag.reranker.fusion import safe_ranks

    assert safe_ranks([3, 1, 2]) == [3, 1, 2]
    for bad in ([None, 2], [0, 1], [1, 1], ["a", 2], [1.5, 2]):
        assert safe_ranks(bad) == [1, 2]


def test_reranker_fuses_with_retriever_rank_not_file_order(fused_model):
    rec = _retrieval()[0]
    ctxs = [c.model_copy(update={"retriever_rank": 5 - i}) for i, c in enumerate(rec.ctxs)]  # file order reversed
    out = Reranker(str(fused_model), device="cpu", dtype="fp32").rerank([rec.model_copy(update={"ctxs": ctxs})])[0]
    assert [c.id for c in out.ctxs] == ["p4", "p3", "p2", "p1", "p0"]  # alpha 0 follows retriever_rank
    assert [c.model_extra["retriever_rank"] for c in out.ctxs] == [1, 2, 3, 4, 5]


def test_select_alpha_tie_goes_to_reranker():
    records = [_record([True, False, False])]
    alpha, table = select_alpha(records, [[3.0, 2.0, 1.0]])  # same order as the retriever: every alpha ties
    assert len({m["mrr"] for m in table.values()}) == 1 and alpha == 1.0
