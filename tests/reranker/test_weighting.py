"""MGDA min-norm weights against brute force, degenerate Grams, and the four weighting strategies."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from dpa_rag.reranker.weighting import (
    build_weighting,
    exact_min_norm,
    frank_wolfe_min_norm,
    gram_matrix,
    min_norm_weights,
)


def _brute_force(gram: np.ndarray) -> tuple[np.ndarray, float]:
    """Best of a 0.01 simplex grid, refined by SLSQP from the grid point and every vertex."""
    n = gram.shape[0]
    steps = 100
    best, best_f = None, np.inf
    for combo in itertools.product(range(steps + 1), repeat=n - 1):
        if sum(combo) > steps:
            continue
        a = np.array([*combo, steps - sum(combo)], dtype=float) / steps
        f = a @ gram @ a
        if f < best_f:
            best, best_f = a, f
    starts = [best, *np.eye(n)]
    for x0 in starts:
        res = minimize(
            lambda x: x @ gram @ x, x0, jac=lambda x: 2 * gram @ x, bounds=[(0, 1)] * n, method="SLSQP",
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}], options={"ftol": 1e-15, "maxiter": 500},
        )
        if res.success and res.fun < best_f:
            best, best_f = res.x, res.fun
    return best, best_f


@pytest.mark.parametrize("seed", range(12))
def test_min_norm_matches_brute_force_on_random_grams(seed):
    g = torch.Generator().manual_seed(seed)
    n, d = (3, [3, 6, 40][seed % 3])
    grads = torch.randn(n, d, generator=g, dtype=torch.float64)
    if seed % 4 == 0:
        grads[2] = -grads[0] + 0.1 * grads[2]  # nearly opposed pair
    gram = grads @ grads.T
    alpha = min_norm_weights(gram)
    assert (alpha >= 0).all()
    assert float(alpha.sum()) == pytest.approx(1.0, abs=1e-12)
    ref, ref_f = _brute_force(gram.numpy())
    f = float(alpha @ gram @ alpha)
    scale = float(gram.diagonal().max())
    assert f <= ref_f + 1e-8 * scale
    # the optimum is unique when the gradients are linearly independent (d >= n)
    assert np.abs(alpha.numpy() - ref).max() < 1e-3


def test_frank_wolfe_stops_short_where_the_exact_check_is_needed():
    """The §6.3 stopping rule ends after a clipped step onto a vertex; the checked solver does not."""
    found = False
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        grads = torch.randn(3, 2, generator=g, dtype=torch.float64)
        gram = grads @ grads.T
        fw = frank_wolfe_min_norm(gram)
        ex = exact_min_norm(gram)
        if float(fw @ gram @ fw) > float(ex @ gram @ ex) + 1e-3 * float(gram.diagonal().max()):
            found = True
            checked = min_norm_weights(gram)
            assert float(checked @ gram @ checked) == pytest.approx(float(ex @ gram @ ex), abs=1e-12)
            break
    assert found


@pytest.mark.parametrize("seed", range(6))
def test_two_losses_match_closed_form(seed):
    g = torch.Generator().manual_seed(100 + seed)
    g1, g2 = torch.randn(2, 7, generator=g, dtype=torch.float64)
    if seed == 0:
        g2 = 3 * g1 + 0.01 * g2  # one gradient nearly a multiple of the other: a vertex solution
    gram = torch.stack([g1, g2]) @ torch.stack([g1, g2]).T
    expected = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
    expected = min(max(expected, 0.0), 1.0)
    alpha = min_norm_weights(gram)
    assert float(alpha[0]) == pytest.approx(expected, abs=1e-9)
    assert float(alpha[1]) == pytest.approx(1 - expected, abs=1e-9)


def test_degenerate_grams():
    assert min_norm_weights(torch.tensor([[4.0]])).tolist() == [1.0]
    g = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    same = torch.stack([g, g, g])
    alpha = min_norm_weights(same @ same.T)  # identical gradients: every point is optimal
    assert float(alpha.sum()) == pytest.approx(1.0) and (alpha >= 0).all()
    opposed = torch.stack([g, -g])
    alpha = min_norm_weights(opposed @ opposed.T)
    assert alpha.tolist() == pytest.approx([0.5, 0.5])
    zero = torch.zeros(3, 3)
    alpha = min_norm_weights(zero)
    assert float(alpha.sum()) == pytest.approx(1.0) and (alpha >= 0).all()


def test_bad_gram_raises():
    with pytest.raises(ValueError, match="square"):
        min_norm_weights(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        min_norm_weights(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


def test_gram_matrix_sums_over_tensors_and_handles_none():
    a = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    b = [torch.tensor([0.0, 1.0]), None]
    gram = gram_matrix([a, b])
    assert gram.tolist() == [[14.0, 2.0], [2.0, 1.0]]


def _toy():
    torch.manual_seed(0)
    shared = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    h = shared(x)
    losses = {"point": (h[:, 0] ** 2).mean(), "pair": (h[:, 1] - 1).abs().mean(), "contrastive": h.sum() * 0.1}
    return shared, h, losses


def test_mgda_strategy_uses_parameter_gradients():
    shared, _, losses = _toy()
    params = list(shared.parameters())
    weights = build_weighting("mgda").weights(losses, parameters=params)
    grads = [torch.autograd.grad(v, params, retain_graph=True) for v in losses.values()]
    expected = min_norm_weights(gram_matrix(grads))
    assert list(weights) == ["point", "pair", "contrastive"]
    assert list(weights.values()) == pytest.approx(expected.tolist(), abs=1e-12)


def test_mgda_ub_strategy_uses_representation_gradients():
    _, h, losses = _toy()
    weights = build_weighting("mgda-ub").weights(losses, representation=[h])
    grads = [torch.autograd.grad(v, [h], retain_graph=True) for v in losses.values()]
    assert list(weights.values()) == pytest.approx(min_norm_weights(gram_matrix(grads)).tolist(), abs=1e-12)
    assert sum(weights.values()) == pytest.approx(1.0)


def test_single_loss_weight_one_and_simple_strategies():
    _, h, losses = _toy()
    assert build_weighting("mgda").weights({"pair": losses["pair"]}) == {"pair": 1.0}
    assert build_weighting("equal").weights(losses) == {k: pytest.approx(1 / 3) for k in losses}
    fixed = build_weighting("fixed", {"point": 1.0, "pair": 0.5, "contrastive": 0.0})
    assert fixed.weights(losses) == {"point": 1.0, "pair": 0.5, "contrastive": 0.0}
    with pytest.raises(ValueError, match="no fixed weight"):
        build_weighting("fixed", {"point": 1.0}).weights(losses)
    with pytest.raises(ValueError, match="needs loss weights"):
        build_weighting("fixed")
    with pytest.raises(ValueError, match="unknown weighting"):
        build_weighting("pcgrad")
