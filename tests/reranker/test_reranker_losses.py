"""The three reranker losses against hand-computed values, their shape checks, and the pair loss on a toy."""

from __future__ import annotations

import math

import pytest
import torch

from dpa_rag.reranker.losses import ContrastiveLoss, PairwiseLoss, PointwiseLoss


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def _norm(v: list[float]) -> list[float]:
    n = math.sqrt(_dot(v, v))
    return [x / n for x in v]


# ---------------------------------------------------------------- point-wise


def test_pointwise_single_logit_is_bce_by_hand():
    logits = torch.tensor([[2.0], [-1.0], [0.5]])
    labels = torch.tensor([1, 0, 0])
    expected = (-math.log(_sig(2.0)) - math.log(1 - _sig(-1.0)) - math.log(1 - _sig(0.5))) / 3
    got = PointwiseLoss(num_labels=1)(logits, labels)
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_pointwise_two_class_is_cross_entropy_by_hand():
    logits = torch.tensor([[0.2, 1.3], [2.0, -0.5]])
    labels = torch.tensor([1, 0])

    def nll(z: list[float], y: int) -> float:
        return -(z[y] - math.log(sum(math.exp(v) for v in z)))

    expected = (nll([0.2, 1.3], 1) + nll([2.0, -0.5], 0)) / 2
    assert PointwiseLoss(num_labels=2)(logits, labels).item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    ("num_labels", "logits", "labels", "match"),
    [
        (1, torch.zeros(3, 2), torch.zeros(3), r"logits of shape \[B, 1\]"),
        (2, torch.zeros(3, 2), torch.zeros(2), r"labels of shape \[3\]"),
        (1, torch.zeros(2, 1), torch.tensor([1, 2]), "must be 1 .aligned. or 0"),
    ],
)
def test_pointwise_shape_errors(num_labels, logits, labels, match):
    with pytest.raises(ValueError, match=match):
        PointwiseLoss(num_labels)(logits, labels)


def test_pointwise_rejects_bad_head():
    with pytest.raises(ValueError, match="1 or 2 labels"):
        PointwiseLoss(num_labels=3)


# ---------------------------------------------------------------- pair-wise


def test_pairwise_by_hand_with_ragged_lists():
    scores = torch.tensor([[3.0, 1.0, 2.0], [0.5, -0.5, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    rec1 = [(3.0, 1.0), (3.0, 2.0), (1.0, 2.0)]
    l1 = sum(-math.log(_sig(a - b)) for a, b in rec1) / 3
    l2 = -math.log(_sig(0.5 - -0.5))
    got = PairwiseLoss()(scores, mask)
    assert got.item() == pytest.approx((l1 + l2) / 2, abs=1e-6)


def test_pairwise_four_docs_equals_authors_formula():
    torch.manual_seed(1)
    s = torch.randn(3, 4)
    total = 0.0
    for b in range(3):
        for i in range(4):
            for j in range(i + 1, 4):
                total += -math.log(_sig(float(s[b, i] - s[b, j])))
    assert PairwiseLoss()(s).item() == pytest.approx(total / (6 * 3), abs=1e-5)


def test_pairwise_errors():
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        PairwiseLoss()(torch.zeros(4))
    with pytest.raises(ValueError, match="at least 2"):
        PairwiseLoss()(torch.zeros(2, 3), torch.tensor([[True, True, False], [True, False, False]]))


def test_pairwise_loss_falls_on_separable_toy():
    """A linear scorer learns a ranking that a hidden direction separates."""
    torch.manual_seed(0)
    dim, records, length = 8, 16, 4
    truth = torch.randn(dim)
    x = torch.randn(records, length, dim)
    order = torch.argsort(x @ truth, dim=1, descending=True)  # rank lists: best first by the hidden scorer
    x = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, dim))
    w = torch.zeros(dim, requires_grad=True)  # a linear scorer, plain gradient descent
    loss_fn = PairwiseLoss()
    history = []
    for _ in range(30):
        loss = loss_fn(x @ w)
        (grad,) = torch.autograd.grad(loss, w)
        with torch.no_grad():
            w -= 0.5 * grad
        history.append(loss.item())
    assert history[0] == pytest.approx(math.log(2), abs=1e-6)  # zero scorer: every pair at ln 2
    assert history[-1] < 0.5 * history[0]
    assert all(b <= a + 1e-6 for a, b in zip(history, history[1:], strict=False))


# ---------------------------------------------------------------- contrastive


def _supcon_by_hand(feats: list[list[float]], labels: list[int], tau: float, tau_base: float) -> float:
    """Per-record SupCon of method.md §6.2 with explicit loops (anchors without a positive are skipped)."""
    h = [_norm(f) for f in feats]
    per_anchor = []
    for a in range(len(h)):
        positives = [p for p in range(len(h)) if p != a and labels[p] == labels[a]]
        if not positives:
            continue
        denom = sum(math.exp(_dot(h[a], h[k]) / tau) for k in range(len(h)) if k != a)
        terms = [math.log(math.exp(_dot(h[a], h[p]) / tau) / denom) for p in positives]
        per_anchor.append(-(tau / tau_base) * sum(terms) / len(positives))
    return sum(per_anchor) / len(per_anchor)


def test_contrastive_pairs_by_hand_two_plus_two():
    torch.manual_seed(2)
    feats = torch.randn(1, 4, 3)
    labels = torch.tensor([[1, 1, 0, 0]])
    expected = _supcon_by_hand(feats[0].tolist(), [1, 1, 0, 0], 0.07, 0.07)
    got = ContrastiveLoss()(feats, labels)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_tau_factor_and_ragged_counts():
    torch.manual_seed(3)
    feats = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])  # record 2: 1 positive, 2 negatives
    r1 = _supcon_by_hand(feats[0].tolist(), [1, 1, 0, 0], 0.5, 0.07)
    r2 = _supcon_by_hand(feats[1, :3].tolist(), [1, 0, 0], 0.5, 0.07)
    got = ContrastiveLoss(temperature=0.5, base_temperature=0.07)(feats, labels, mask)
    assert got.item() == pytest.approx((r1 + r2) / 2, rel=1e-5)


def test_contrastive_one_per_side_is_zero_with_gradient():
    feats = torch.randn(1, 2, 4, requires_grad=True)
    loss = ContrastiveLoss()(feats, torch.tensor([[1, 0]]))
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_contrastive_query_anchor_by_hand():
    torch.manual_seed(4)
    feats = torch.randn(1, 3, 4)
    query = torch.randn(1, 4)
    labels = [1, 1, 0]
    q = _norm(query[0].tolist())
    h = [_norm(f) for f in feats[0].tolist()]
    tau = 0.07
    denom = sum(math.exp(_dot(q, hk) / tau) for hk in h)
    expected = -sum(math.log(math.exp(_dot(q, h[p]) / tau) / denom) for p in (0, 1)) / 2
    got = ContrastiveLoss(anchor="query")(feats, torch.tensor([labels]), query_features=query)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_errors():
    loss = ContrastiveLoss()
    with pytest.raises(ValueError, match=r"\[B, n, H\]"):
        loss(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="labels shape"):
        loss(torch.zeros(1, 4, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="query_features"):
        ContrastiveLoss(anchor="query")(torch.zeros(1, 2, 3), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="anchor"):
        ContrastiveLoss(anchor="doc")  # type: ignore[arg-type]


def test_config_dicts():
    assert PointwiseLoss(2).get_config_dict()["loss"] == "cross_entropy"
    assert ContrastiveLoss(0.1).get_config_dict() == {"temperature": 0.1, "base_temperature": 0.07, "anchor": "pairs"}
    assert PairwiseLoss().get_config_dict()["margin"] == 0.0
