"""Paired bootstrap of a difference in means (two systems scored on the same questions).

:func:`paired_bootstrap` resamples questions with replacement (the same draw for both systems, so per-question
correlation is kept), and reports the mean difference ``b − a``, its percentile confidence interval and the share of
resamples where ``b`` does not beat ``a``. Pure and seeded: the same inputs and seed give the same numbers, whatever
the chunk size used to bound memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["paired_bootstrap"]

# resampled values held at once (rows × questions); ~8 MB of float64
_CHUNK_CELLS = 1_000_000


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    n_resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Paired bootstrap of ``mean(b) − mean(a)`` over questions.

    Each resample draws ``n`` question indices uniformly with replacement and takes the mean of the per-question
    differences ``b[i] − a[i]`` at those indices. Indices come from ``floor(u · n)`` for uniform ``u`` of one
    seeded ``numpy.random.Generator``, drawn ``chunk_size`` resamples at a time (vectorised), so the result does not
    depend on the chunking.

    Args:
        a: per-question scores of the reference system (e.g. 0/1 hits or F1 in [0, 1]).
        b: per-question scores of the compared system, same questions in the same order.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling.
        confidence: coverage of the percentile interval (0.95 → the 2.5th and 97.5th percentiles).
        chunk_size: resamples drawn at once (default: about a million drawn values per chunk).

    Returns:
        ``diff`` (observed ``mean(b) − mean(a)``, in the inputs' units), ``lo`` and ``hi`` (percentile interval of
        the resampled differences), ``share_le_0`` (share of resamples with difference ≤ 0: near 0 when ``b`` is
        reliably better), ``p_value`` (two-sided: ``min(1, 2 · min(share ≤ 0, share ≥ 0))``), ``n``,
        ``n_resamples``, ``confidence``.

    Raises:
        ValueError: ``a`` and ``b`` differ in length or are empty; ``n_resamples`` or ``chunk_size`` < 1;
            ``confidence`` not in (0, 1).

    Example:
        >>> r = paired_bootstrap([0, 0, 1, 0], [1, 1, 1, 0], n_resamples=2000)
        >>> round(r["diff"], 2), r["lo"] >= 0.0
        (0.5, True)
    """
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.ndim != 1 or xb.ndim != 1:
        raise ValueError("paired_bootstrap expects two flat sequences of per-question scores")
    if len(xa) != len(xb):
        raise ValueError(f"paired scores differ in length: {len(xa)} vs {len(xb)}")
    if len(xa) == 0:
        raise ValueError("paired_bootstrap needs at least one question")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = xb - xa
    n = len(d)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows = chunk_size or max(1, _CHUNK_CELLS // n)
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows):
        m = min(rows, n_resamples - start)
        idx = np.minimum((rng.random((m, n)) * n).astype(np.int64), n - 1)
        means[start : start + m] = d[idx].mean(axis=1)
    alpha = 1.0 - confidence
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    # the resampled means carry float noise around exact ties (e.g. all-zero differences); compare with a tolerance
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    le0 = float(np.mean(means <= tol))
    ge0 = float(np.mean(means >= -tol))
    return {
        "diff": float(d.mean()),
        "lo": float(lo),
        "hi": float(hi),
        "share_le_0": le0,
        "p_value": min(1.0, 2.0 * min(le0, ge0)),
        "n": n,
        "n_resamples": n_resamples,
        "confidence": confidence,
    }
