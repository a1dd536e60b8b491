"""Dense retrieval with separate query/passage encoders (DPR's pair) and chosen pooling (contriever's mean), on tiny
models built from configs: scores equal embeddings computed by hand with the models themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dpa_rag.cli.main import app
from dpa_rag.data.loaders import load_retrieval
from dpa_rag.data.schema import Passage
from dpa_rag.io import write_jsonl
from dpa_rag.retrieval import DenseRetriever, RetrieveConfig, load_index
from dpa_rag.retrieval.base import doc_text
from dpa_rag.retrieval.dense import HFEncoder, encode, load_encoder
from dpa_rag.retrieval.retrieve import run as run_retrieve

CORPUS = [
    {"id": "paris", "title": "Paris", "text": "paris is the capital city of france"},
    {"id": "berlin", "title": "Berlin", "text": "berlin is the capital of germany"},
    {"id": "nile", "title": "Nile", "text": "the nile is a river"},
    {"id": "nobel", "title": "Nobel Prize", "text": "the first nobel prize in physics was won in germany"},
    {"id": "moon", "title": "Moon", "text": "the moon"},
]
QUESTIONS = [
    {"id": "q1", "question": "what is the capital of france", "answers": ["paris"]},
    {"id": "q2", "question": "who won the first nobel prize in physics", "answers": ["germany"]},
    {"id": "q3", "question": "river", "answers": []},
]
TEXTS = ["the capital of france", "a river", "who wrote the song that won the world cup in the year of the moon"]


def _passages() -> list[Passage]:
    return [Passage(**p) for p in CORPUS]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_bert_dir: Path):
    """A WordPiece tokenizer over the tiny BERT vocabulary (built from the vocabulary itself, as transformers 5
    ignores ``vocab_file`` in the constructor)."""
    from transformers import BertTokenizerFast

    words = (tiny_bert_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    vocab = {w: i for i, w in enumerate(dict.fromkeys(w for w in words if w))}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    assert tok.convert_ids_to_tokens(tok("paris france")["input_ids"])[1:3] == ["paris", "france"]
    return tok


def _dpr(kind: str, out: Path, tok, seed: int, projection_dim: int = 0) -> Path:
    from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    cfg = DPRConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256, projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = (DPRQuestionEncoder if kind == "question" else DPRContextEncoder)(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dpr_dirs(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(question encoder, context encoder): tiny DPR models with different random weights."""
    q = _dpr("question", tmp_path_factory.mktemp("dpr-q"), tiny_tokenizer, seed=1)
    c = _dpr("context", tmp_path_factory.mktemp("dpr-ctx"), tiny_tokenizer, seed=2)
    return q, c


@pytest.fixture(scope="module")
def plain_bert_dir(tiny_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain HF BERT folder (no modules.json), with its pooler layer, as contriever is."""
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("plain-bert")
    cfg = BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(3)
    BertModel(cfg).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def _dpr_by_hand(path: Path, cls_name: str, texts: list[str]) -> np.ndarray:
    import transformers

    model = getattr(transformers, cls_name).from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).pooler_output.numpy()


def _dpr_passages_by_hand(path: Path, passages: list[Passage]) -> np.ndarray:
    """DPR's passage input, one at a time (no padding): [CLS] title [SEP] text [SEP], segment ids 0."""
    from transformers import AutoTokenizer, DPRContextEncoder

    model = DPRContextEncoder.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rows = []
    with torch.no_grad():
        for p in passages:
            ids = tok(p.title, p.text, return_tensors="pt")["input_ids"]
            assert tok.convert_ids_to_tokens(ids[0]).count("[SEP]") == 2
            rows.append(model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).pooler_output[0].numpy())
    return np.stack(rows)


def _hand_scores(q: np.ndarray, p: np.ndarray) -> list[dict[int, float]]:
    return [{i: float(s) for i, s in enumerate(row)} for row in q @ p.T]


def _assert_hits_match(hits: list[list[tuple[int, float]]], expected: list[dict[int, float]], k: int) -> None:
    for row, exp in zip(hits, expected, strict=True):
        assert len(row) == k
        for i, s in row:
            assert s == pytest.approx(exp[i], rel=1e-4, abs=1e-4)
        best = sorted(exp.values(), reverse=True)[:k]
        assert [s for _, s in row] == pytest.approx(best, rel=1e-4, abs=1e-4)


# ---------------------------------------------------------------- DPR question/context pair


def test_dpr_pair_scores_equal_hand_computed_embeddings(dpr_dirs: tuple[Path, Path], tmp_path: Path):
    from transformers import DPRContextEncoder, DPRQuestionEncoder

    q_dir, c_dir = dpr_dirs
    passages = _passages()
    questions = [q["question"] for q in QUESTIONS]
    r = DenseRetriever.build(passages, encoder=str(c_dir), query_encoder=str(q_dir), normalize=False, device="cpu",
                             dtype="float32", show_progress=False)
    assert isinstance(r.encoder, HFEncoder) and isinstance(r.encoder.model, DPRQuestionEncoder)
    assert r.meta["query_encoder"] == str(q_dir) and r.meta["encoder"] == str(c_dir)
    assert r.meta["pooling"] == "auto" and r.meta["query_fingerprint"] and r.meta["dim"] == 32

    assert r.meta["passage_input"] == "title [SEP] text"
    p_vec = _dpr_passages_by_hand(c_dir, passages)
    q_vec = _dpr_by_hand(q_dir, "DPRQuestionEncoder", questions)
    # DPR's pooler output is the last layer's CLS vector (no projection for projection_dim 0)
    with torch.no_grad():
        ctx = DPRContextEncoder.from_pretrained(c_dir).eval()
        enc = r.encoder.tokenizer(TEXTS, padding=True, return_tensors="pt")
        cls = ctx.ctx_encoder.bert_model(**enc).last_hidden_state[:, 0].numpy()
        np.testing.assert_allclose(ctx(**enc).pooler_output.numpy(), cls, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r.encode_queries(questions), q_vec, rtol=1e-4, atol=1e-5)
    expected = _hand_scores(q_vec, p_vec)
    _assert_hits_match(r.search(questions, 3), expected, 3)

    # saved and reloaded: the recorded query encoder is used without being named
    r.save(tmp_path / "dense")
    loaded = DenseRetriever.load(tmp_path / "dense", passages, device="cpu")
    _assert_hits_match(loaded.search(questions, 5), expected, 5)
    assert isinstance(loaded.encoder.model, DPRQuestionEncoder)
    # an explicit override replaces it (here: the context encoder on the query side gives other scores)
    other = DenseRetriever.load(tmp_path / "dense", passages, device="cpu", query_encoder=str(c_dir))
    _assert_hits_match(other.search(questions, 5), _hand_scores(_dpr_by_hand(c_dir, "DPRContextEncoder", questions),
                                                                 p_vec), 5)
    assert not np.allclose(other.encode_queries(questions), q_vec, atol=1e-3)


def test_query_encoder_dimension_mismatch_fails_before_encoding(dpr_dirs, tiny_tokenizer, tmp_path: Path):
    q_dir, _ = dpr_dirs
    projected = _dpr("context", tmp_path / "proj", tiny_tokenizer, seed=4, projection_dim=16)
    model = load_encoder(str(projected), device="cpu", dtype="float32")
    assert isinstance(model, HFEncoder) and model.get_embedding_dimension() == 16
    assert encode(model, ["the moon"], normalize=False).shape == (1, 16)
    with pytest.raises(ValueError, match="16-dimensional"):
        DenseRetriever.build(_passages(), encoder=str(projected), query_encoder=str(q_dir), device="cpu",
                             dtype="float32", show_progress=False)


def test_index_and_retrieve_stages_record_and_use_the_query_encoder(dpr_dirs, run_dir: Path):
    q_dir, c_dir = dpr_dirs
    corpus, questions = run_dir / "corpus.jsonl", run_dir / "questions.jsonl"
    write_jsonl(corpus, CORPUS)
    write_jsonl(questions, QUESTIONS)
    res = CliRunner().invoke(app, [
        "index", "--corpus", str(corpus), "--out-dir", str(run_dir / "idx"), "--kind", "dense",
        "--encoder", str(c_dir), "--query-encoder", str(q_dir), "--pooling", "pooler", "--no-normalize",
        "--device", "cpu", "--dtype", "float32", "--no-progress",
    ])
    assert res.exit_code == 0, res.output
    meta = json.loads((run_dir / "idx" / "dense" / "meta.json").read_text())
    assert meta["encoder"] == str(c_dir) and meta["query_encoder"] == str(q_dir)
    assert meta["query_encoder_path"] == str(q_dir) and meta["pooling"] == "pooler" and meta["normalize"] is False

    # `retrieve` is not told about the query encoder
    out = run_retrieve(RetrieveConfig(index_dir=run_dir / "idx", questions=questions, out_dir=run_dir / "ret",
                                      method="dense", top_k=3, device="cpu", progress=False))
    records = load_retrieval(out)
    passages = load_index(run_dir / "idx").passages
    expected = _hand_scores(_dpr_by_hand(q_dir, "DPRQuestionEncoder", [q["question"] for q in QUESTIONS]),
                            _dpr_passages_by_hand(c_dir, passages))
    ids = [p.id for p in passages]
    _assert_hits_match([[(ids.index(c.id), c.score) for c in r.ctxs] for r in records], expected, 3)


# ---------------------------------------------------------------- pooling


def test_mean_cls_and_pooler_pooling_equal_hand_computed(plain_bert_dir: Path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer, BertModel

    bert = BertModel.from_pretrained(plain_bert_dir).eval()
    tok = AutoTokenizer.from_pretrained(plain_bert_dir)
    enc = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    assert int(enc["attention_mask"].sum(1).min()) < enc["attention_mask"].shape[1]  # padding is present
    with torch.no_grad():
        out = bert(**enc)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    hand = {
        "mean": ((out.last_hidden_state * mask).sum(1) / mask.sum(1)).numpy(),
        "cls": out.last_hidden_state[:, 0].numpy(),
        "pooler": out.pooler_output.numpy(),
    }
    for pooling, want in hand.items():
        model = load_encoder(str(plain_bert_dir), device="cpu", dtype="float32", pooling=pooling)
        assert isinstance(model, HFEncoder if pooling == "pooler" else SentenceTransformer), pooling
        got = encode(model, TEXTS, normalize=False)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=pooling)
        normed = encode(model, TEXTS, normalize=True)
        np.testing.assert_allclose(normed, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
    # auto on a plain HF folder is mean pooling (as before)
    auto = encode(load_encoder(str(plain_bert_dir), device="cpu", dtype="float32"), TEXTS, normalize=False)
    np.testing.assert_allclose(auto, hand["mean"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown pooling"):
        load_encoder(str(plain_bert_dir), device="cpu", pooling="max")


def test_mean_pooling_of_a_dpr_encoder_and_a_mean_pooled_index(dpr_dirs, plain_bert_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer, DPRContextEncoder

    _, c_dir = dpr_dirs
    tok = AutoTokenizer.from_pretrained(c_dir)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        tokens = DPRContextEncoder.from_pretrained(c_dir).eval().ctx_encoder.bert_model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    model = load_encoder(str(c_dir), device="cpu", dtype="float32", pooling="mean")
    np.testing.assert_allclose(encode(model, TEXTS, normalize=False), ((tokens * mask).sum(1) / mask.sum(1)).numpy(),
                               rtol=1e-4, atol=1e-5)

    # a contriever-style index: mean pooling, inner product, no normalisation
    passages = _passages()
    r = DenseRetriever.build(passages, encoder=str(plain_bert_dir), pooling="mean", normalize=False, device="cpu",
                             dtype="float32", show_progress=False)
    r.save(tmp_path / "dense")
    loaded = DenseRetriever.load(tmp_path / "dense", passages, device="cpu")
    assert loaded.meta["pooling"] == "mean" and loaded.meta["query_encoder"] is None
    questions = [q["question"] for q in QUESTIONS]
    mean = load_encoder(str(plain_bert_dir), device="cpu", dtype="float32", pooling="mean")  # = masked mean (above)
    q_vec = encode(mean, questions, normalize=False)
    p_vec = encode(mean, [doc_text(p) for p in passages], normalize=False)
    _assert_hits_match(loaded.search(questions, 5), _hand_scores(q_vec, p_vec), 5)


# ---------------------------------------------------------------- backward compatibility


def test_index_written_before_the_new_meta_keys_still_loads(plain_bert_dir: Path, tmp_path: Path):
    passages = _passages()
    questions = [q["question"] for q in QUESTIONS]
    r = DenseRetriever.build(passages, encoder=str(plain_bert_dir), device="cpu", dtype="float32",
                             show_progress=False)
    before = r.search(questions, 4)
    r.save(tmp_path / "dense")
    meta_path = tmp_path / "dense" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("pooling", "query_encoder", "query_encoder_path", "query_fingerprint"):
        meta.pop(key)
    meta_path.write_text(json.dumps(meta))
    old = DenseRetriever.load(tmp_path / "dense", passages, device="cpu")
    assert old.query_encoder_name == str(plain_bert_dir)
    after = old.search(questions, 4)
    assert [[i for i, _ in row] for row in after] == [[i for i, _ in row] for row in before]
    for a, b in zip(after, before, strict=True):
        assert [s for _, s in a] == pytest.approx([s for _, s in b], rel=1e-5, abs=1e-6)
