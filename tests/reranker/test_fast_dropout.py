"""Fast CPU dropout: mask statistics and reproducibility, the attention function, the model swap and its undo."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpa_rag.reranker.fast_dropout import (
    ATTENTION_NAME,
    FastDropout,
    attention_forward,
    fast_cpu_dropout,
    keep_mask,
)


def test_keep_mask_rate_scale_and_seed():
    torch.manual_seed(0)
    keep, scale = keep_mask((301, 1001), 0.1)  # 301 * 1001 elements: not a multiple of 3
    assert keep.shape == (301, 1001) and keep.dtype == torch.bool
    assert scale == pytest.approx(1 / (1 - 6554 / 65536), abs=0)
    flat = keep.reshape(-1).float()
    # every one of the three 16-bit slices of a word is uniform: each position drops ~p (std ~0.001 here)
    for k in range(3):
        assert 1 - flat[k::3].mean().item() == pytest.approx(0.1, abs=0.005), k
    # slices of one word are independent: P(both dropped) ~ p^2
    both = ((1 - flat[0:-2:3]) * (1 - flat[1:-1:3])).mean().item()
    assert both == pytest.approx(0.01, abs=0.002)
    torch.manual_seed(0)
    again, _ = keep_mask((301, 1001), 0.1)
    assert torch.equal(keep, again)
    assert not torch.equal(keep, keep_mask((301, 1001), 0.1)[0])
    assert keep_mask((5, 7), 0.0)[0].all()
    for p in (0.5, 0.9):
        assert 1 - keep_mask((200_000,), p)[0].float().mean().item() == pytest.approx(p, abs=0.01)
    with pytest.raises(ValueError, match="dropout probability"):
        keep_mask((3,), 1.0)


def test_fast_dropout_module():
    drop = FastDropout(0.25)
    x = torch.ones(400, 300, requires_grad=True)
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    out = drop(x)
    scale = 1 / (1 - 16384 / 65536)
    values = out.unique()
    assert len(values) == 2 and values[0].item() == 0.0 and values[1].item() == pytest.approx(scale)
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)  # expectation kept
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # d(x * mask * scale)/dx = mask * scale = out for x = 1
    assert torch.equal(FastDropout(0.0).train()(x), x)


class _Attn(nn.Module):
    is_causal = False

    def __init__(self) -> None:
        super().__init__()
        self.config = None


@pytest.mark.parametrize("mask_kind", ["none", "float", "bool"])
def test_attention_forward_matches_sdpa_and_eager(mask_kind):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    mask = None
    if mask_kind != "none":
        keep_cols = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)[:, None, None, :]
        mask = keep_cols if mask_kind == "bool" else torch.zeros(2, 1, 1, 5).masked_fill(~keep_cols, -1e9)
    module = _Attn().train()
    ours, _ = attention_forward(module, q, k, v, mask, scaling=0.5, dropout=0.0)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.5, dropout=0.0)
    torch.testing.assert_close(ours, ref)
    torch.manual_seed(7)
    ours, _ = attention_forward(module, q, k, v, mask, scaling=0.5, dropout=0.3)
    torch.manual_seed(7)
    w = q @ k.transpose(2, 3) * 0.5
    if mask is not None:
        w = w.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else w + mask
    keep, scale = keep_mask((2, 3, 5, 5), 0.3)
    expected = (torch.softmax(w, -1) * keep * scale) @ v
    torch.testing.assert_close(ours, expected.transpose(1, 2))
    assert not torch.allclose(ours, ref)  # dropout did act


def test_model_swap_is_undone_and_not_saved(tiny_bert_dir, tmp_path):
    from sentence_transformers import CrossEncoder

    from dpa_rag.reranker.model import load_reranker_model

    model, tok = load_reranker_model(str(tiny_bert_dir), "single")
    batch = tok(["who wrote hamlet"] * 2, ["shakespeare wrote hamlet", "paris is in france"], padding=True,
                return_tensors="pt")
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    n_dropout = sum(type(m) is nn.Dropout for m in model.modules())
    assert n_dropout > 0
    with fast_cpu_dropout(model):
        assert sum(type(m) is FastDropout for m in model.modules()) == n_dropout
        assert model.config._attn_implementation == ATTENTION_NAME
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, before)  # eval: no dropout anywhere
            model.train()
            torch.manual_seed(3)
            a = model(**batch).logits
            torch.manual_seed(3)
            b = model(**batch).logits
            c = model(**batch).logits
        assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, before)
        model.save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        model.eval()
    assert sum(type(m) is nn.Dropout for m in model.modules()) == n_dropout
    assert not any(isinstance(m, FastDropout) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert ATTENTION_NAME not in json.dumps(json.loads((tmp_path / "config.json").read_text()))
    scores = CrossEncoder(str(tmp_path), device="cpu", activation_fn=nn.Identity()).predict(
        [("who wrote hamlet", "shakespeare wrote hamlet"), ("who wrote hamlet", "paris is in france")])
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float32), before[:, 0], atol=1e-5, rtol=1e-5)


def test_disabled_is_a_no_op(tiny_bert_dir):
    from dpa_rag.reranker.model import load_reranker_model

    model, _ = load_reranker_model(str(tiny_bert_dir), "single")
    with fast_cpu_dropout(model, enabled=False):
        assert not any(isinstance(m, FastDropout) for m in model.modules())
        assert model.config._attn_implementation == "sdpa"


def test_training_with_fast_dropout_matches_torch_dropout_in_expectation():
    """Mean over many dropout draws of a layer's output ~ the no-dropout output, as with F.dropout."""
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    drop = FastDropout(0.1).train()
    mean = torch.stack([drop(x) for _ in range(400)]).mean(0)
    ref = torch.stack([F.dropout(x, 0.1, True) for _ in range(400)]).mean(0)
    err, ref_err = (mean - x).abs().mean().item(), (ref - x).abs().mean().item()
    assert err < 1.5 * ref_err + 1e-3


def _tiny(kind: str) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    common = dict(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=40, num_labels=1)
    torch.manual_seed(0)
    if kind == "roberta":
        return RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **common))
    return BertForSequenceClassification(BertConfig(**common))


def _rows(kind: str) -> dict[str, torch.Tensor]:
    lengths = [12, 11, 9, 7, 7, 4]  # length-sorted, as the collator leaves them
    pad = 1 if kind == "roberta" else 0
    ids = torch.full((len(lengths), 12), pad)
    mask = torch.zeros_like(ids)
    g = torch.Generator().manual_seed(0)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, 60, (n,), generator=g)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_chunked_forward_with_shared_embeddings_equals_one_forward(kind):
    """Chunks share one token-embedding lookup (:data:`_EMBEDS_ONCE`): same logits and gradients as one forward."""
    from dpa_rag.reranker.model import encode_pairs

    model, batch = _tiny(kind).eval(), _rows(kind)
    grads = []
    for chunk in (None, 4):
        model.zero_grad(set_to_none=True)
        out = encode_pairs(model, batch, chunk_size=chunk)
        (out.logits.square().sum() + out.reps.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if chunk is None:
            ref = out.logits.detach()
        else:
            torch.testing.assert_close(out.logits.detach(), ref, atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any("word_embeddings" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_swap_keeps_eval_outputs(kind):
    model, batch = _tiny(kind).eval(), _rows(kind)
    with torch.no_grad():
        before = model(**batch).logits
        with fast_cpu_dropout(model):
            assert model.config._attn_implementation == ATTENTION_NAME
            torch.testing.assert_close(model(**batch).logits, before)
            model.train()
            assert not torch.allclose(model(**batch).logits, before)
        model.eval()
        torch.testing.assert_close(model(**batch).logits, before)


def test_restored_after_error_and_in_the_mode_left(monkeypatch):
    import dpa_rag.reranker.fast_dropout as fd

    model = _tiny("bert").eval()
    with pytest.raises(RuntimeError, match="boom"), fast_cpu_dropout(model):
        raise RuntimeError("boom")
    assert not any(isinstance(m, FastDropout) for m in model.modules())

    def broken() -> None:
        raise RuntimeError("registration failed")

    monkeypatch.setattr(fd, "_register", broken)  # an error while switching, after the dropout swap
    with pytest.raises(RuntimeError, match="registration failed"), fast_cpu_dropout(model):
        pass
    monkeypatch.undo()
    assert not any(isinstance(m, FastDropout) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    with fast_cpu_dropout(model):
        model.train()
    assert all(m.training for m in model.modules() if type(m) is nn.Dropout)  # train() inside the block sticks
    with fast_cpu_dropout(model):
        model.eval()
    assert not any(m.training for m in model.modules() if type(m) is nn.Dropout)


def test_causal_modules_go_to_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _Attn().train()
    module.is_causal = True
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 4, 3) for _ in range(3))
    torch.manual_seed(5)
    ours, _ = attention_forward(module, q, k, v, None, dropout=0.0)
    torch.testing.assert_close(ours, sdpa_attention_forward(module, q, k, v, None, dropout=0.0)[0])
    with torch.no_grad():
        ours_drop, _ = attention_forward(module, q, k, v, None, dropout=0.5)
    # causal: the first query attends to the first key only, whatever the dropout keeps (0 or v[0] / (1 - p))
    first = ours_drop[0, 0, :, :]  # [heads, dim] of query position 0
    for h in range(2):
        assert torch.allclose(first[h], torch.zeros(3)) or torch.allclose(first[h], v[0, h, 0] * 2, atol=1e-5)
