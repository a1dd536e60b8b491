"""Paired bootstrap: ties, a dominant system, agreement with a brute-force computation, input errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpa_rag.eval.bootstrap import paired_bootstrap


def test_identical_systems_give_zero_and_a_ci_containing_zero():
    a = [1, 0, 1, 1, 0, 0, 1, 0.5]
    r = paired_bootstrap(a, list(a), n_resamples=500)
    assert r["diff"] == 0.0
    assert r["lo"] <= 0.0 <= r["hi"]
    assert r["share_le_0"] == 1.0 and r["p_value"] == 1.0
    assert r["n"] == 8 and r["n_resamples"] == 500 and r["confidence"] == 0.95


def test_system_right_everywhere_the_other_is_wrong_has_ci_above_zero():
    a = [0, 1, 0, 1, 0, 0, 1, 0, 0, 1]
    b = [1] * 10  # right on every question a gets wrong, and where a is right
    r = paired_bootstrap(a, b, n_resamples=2000)
    assert r["diff"] == pytest.approx(0.6)
    assert 0.0 < r["lo"] <= r["diff"] <= r["hi"] <= 1.0
    assert r["share_le_0"] == 0.0 and r["p_value"] == 0.0
    # a wrong everywhere, b right everywhere: every resample gives exactly +1
    r2 = paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1], n_resamples=100)
    assert r2["diff"] == r2["lo"] == r2["hi"] == 1.0
    # the mirror image: CI strictly below 0 and a two-sided p-value of 0
    r3 = paired_bootstrap(b, a, n_resamples=2000)
    assert r3["hi"] < 0.0 and r3["share_le_0"] == 1.0 and r3["p_value"] == 0.0


def test_matches_a_brute_force_loop_over_the_same_draws():
    a = [0.0, 1.0, 0.0, 0.5, 1.0]
    b = [1.0, 1.0, 0.0, 0.0, 1.0]
    n_resamples, seed = 257, 3
    r = paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed, confidence=0.9)
    # the documented draw: floor(u * n) for uniforms of one default_rng(seed), resample by resample
    rng = np.random.default_rng(seed)
    u = rng.random((n_resamples, len(a)))
    means = []
    for row in u:
        idx = [int(x * len(a)) for x in row]
        means.append(sum(b[i] - a[i] for i in idx) / len(idx))
    lo, hi = np.quantile(means, [0.05, 0.95])
    assert r["lo"] == pytest.approx(lo) and r["hi"] == pytest.approx(hi)
    assert r["share_le_0"] == pytest.approx(np.mean(np.array(means) <= 1e-12))
    assert r["diff"] == pytest.approx(sum(b) / 5 - sum(a) / 5)
    # chunking bounds memory but does not change the numbers
    for chunk in (1, 7, 1000):
        assert paired_bootstrap(a, b, n_resamples=n_resamples, seed=seed, confidence=0.9, chunk_size=chunk) == r


def test_interval_converges_to_the_exact_bootstrap_distribution():
    # n = 3: all 27 equally likely resamples enumerated; differences d = (1, 0, -1) give means k/3, k in -3..3
    a, b = [0, 0, 1], [1, 0, 0]
    d = [bi - ai for ai, bi in zip(a, b, strict=True)]
    exact = sorted(sum(d[i] for i in idx) / 3 for idx in itertools.product(range(3), repeat=3))
    r = paired_bootstrap(a, b, n_resamples=20000, seed=1, confidence=0.8)
    # P(mean = -2/3 or less) = P(>= 2/3) = 4/27 ≈ 0.148 > 0.1, so the exact 10% / 90% quantiles are -2/3 and 2/3
    assert np.quantile(exact, 0.1) == pytest.approx(-2 / 3) and np.quantile(exact, 0.9) == pytest.approx(2 / 3)
    assert r["lo"] == pytest.approx(-2 / 3) and r["hi"] == pytest.approx(2 / 3)
    share_exact = sum(m <= 1e-12 for m in exact) / 27
    assert r["share_le_0"] == pytest.approx(share_exact, abs=0.01)


def test_seed_reproducible_and_input_errors():
    a, b = [0, 1, 1, 0, 1], [1, 1, 0, 1, 1]
    assert paired_bootstrap(a, b, seed=5, n_resamples=300) == paired_bootstrap(a, b, seed=5, n_resamples=300)
    with pytest.raises(ValueError, match="differ in length: 5 vs 4"):
        paired_bootstrap(a, b[:4])
    with pytest.raises(ValueError, match="at least one question"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap(a, b, n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap(a, b, confidence=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        paired_bootstrap(a, b, chunk_size=0)
