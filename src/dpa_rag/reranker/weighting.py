"""How the enabled losses are combined each step: a strategy object, so ablations are config changes.

* ``mgda`` (method.md §6.3, the authors' choice made exact): per-loss gradients over the shared encoder parameters
  (embeddings + layers; head and pooler excluded), Gram matrix ``M_ij = g_i·g_j``, min-norm weights on the simplex by
  Frank–Wolfe with the closed-form line search, checked against the exact solution (:func:`min_norm_weights`).
  One extra ``autograd.grad`` per loss (graph retained), then the trainer's single backward of ``Σ α_t L_t``.
* ``mgda-ub`` (Sener & Koltun 2018, the paper's name): the same solver on gradients w.r.t. the shared representation
  (the last hidden-state tensor of the one fused forward), which is far cheaper: ``autograd.grad`` stops at that
  tensor instead of running through the encoder.
* ``equal``: ``α_t = 1/n`` (sums to 1 like MGDA); ``fixed``: the user's weights, as given.

With one loss every strategy returns weight 1 and skips the solver. Weights are constants (no gradient flows through
them).

Under data parallelism (``accelerate launch``/torchrun: ``torch.distributed`` initialised with more than one process)
both MGDA variants sum the processes' Gram matrices before solving (:func:`all_reduce_gram`), so every process uses
the same weights. For ``mgda-ub`` this is exactly the Gram matrix of the global batch (the global batch's
representation is the processes' representations side by side; the common ``1/world²`` factor does not change the
min-norm point). For ``mgda`` it is ``Σ_r M^r``, the Gram matrix of the processes' gradients side by side, not of
their average (that would need every per-loss gradient all-reduced): the same weights everywhere, an estimate of
the global batch's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "WEIGHTINGS",
    "EqualWeighting",
    "FixedWeighting",
    "MGDAUBWeighting",
    "MGDAWeighting",
    "Weighting",
    "all_reduce_gram",
    "build_weighting",
    "exact_min_norm",
    "frank_wolfe_min_norm",
    "fw_gap",
    "gram_matrix",
    "min_norm_weights",
]

logger = logging.getLogger(__name__)

WEIGHTINGS = ("mgda", "mgda-ub", "equal", "fixed")


def frank_wolfe_min_norm(gram: Tensor, max_iter: int = 100, stop_gamma: float = 1e-3, eps: float = 1e-12) -> Tensor:
    """Frank–Wolfe for ``argmin_{α ∈ simplex} αᵀ M α``, exactly method.md §6.3 (float64).

    Start at the uniform point; each iteration picks the vertex ``t = argmin_i (Mα)_i``, takes the closed-form step
    ``γ = clip((a − b)/(a − 2b + c), 0, 1)`` with ``a = αᵀMα``, ``b = (Mα)_t``, ``c = M_tt`` (γ = 0 when the
    denominator ``‖Σα_i g_i − g_t‖² ≤ eps``), and stops after ``max_iter`` iterations, when ``γ < stop_gamma`` or
    when some ``α_i > 1 − stop_gamma``.
    """
    m = _check_gram(gram)
    n = m.shape[0]
    alpha = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if n == 1:
        return alpha
    for _ in range(max_iter):
        m_alpha = m @ alpha
        t = int(torch.argmin(m_alpha))
        a = float(alpha @ m_alpha)
        b = float(m_alpha[t])
        c = float(m[t, t])
        denom = a - 2 * b + c
        gamma = 0.0 if denom <= eps else min(max((a - b) / denom, 0.0), 1.0)
        alpha = (1 - gamma) * alpha
        alpha[t] += gamma
        if gamma < stop_gamma or float(alpha.max()) > 1 - stop_gamma:
            break
    return alpha


def exact_min_norm(gram: Tensor) -> Tensor:
    """The exact min-norm point by enumerating the simplex's faces (KKT system per support set; n ≤ 12)."""
    m = _check_gram(gram)
    n = m.shape[0]
    if n > 12:
        raise ValueError(f"exact_min_norm enumerates 2^n faces; n = {n} is too many (use frank_wolfe_min_norm)")
    best, best_f = None, float("inf")
    for mask in range(1, 1 << n):
        idx = [i for i in range(n) if mask >> i & 1]
        k = len(idx)
        kkt = torch.zeros(k + 1, k + 1, dtype=torch.float64)
        kkt[:k, :k] = 2 * m[idx][:, idx]
        kkt[:k, k] = 1.0
        kkt[k, :k] = 1.0
        rhs = torch.zeros(k + 1, dtype=torch.float64)
        rhs[k] = 1.0
        sol = torch.linalg.lstsq(kkt, rhs.unsqueeze(1)).solution[:, 0]
        a_s = sol[:k]
        if float(a_s.min()) < -1e-12 or abs(float(a_s.sum()) - 1.0) > 1e-9:
            continue
        alpha = torch.zeros(n, dtype=torch.float64)
        alpha[idx] = a_s.clamp(min=0)
        alpha /= alpha.sum()
        f = float(alpha @ m @ alpha)
        if f < best_f - 1e-15:
            best, best_f = alpha, f
    assert best is not None  # every vertex is feasible
    return best


def _check_gram(gram: Tensor) -> Tensor:
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"min-norm weights need a non-empty square Gram matrix, got shape {tuple(gram.shape)}")
    m = gram.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(m).all()):
        raise ValueError("min-norm weights: the Gram matrix has NaN or infinite entries")
    return m


def fw_gap(gram: Tensor, alpha: Tensor) -> float:
    """Frank–Wolfe duality gap ``αᵀMα − min_i (Mα)_i`` (≥ the objective's distance to the optimum, /2)."""
    m = gram.detach().to("cpu", torch.float64)
    m_alpha = m @ alpha.to(torch.float64)
    return float(alpha.to(torch.float64) @ m_alpha - m_alpha.min())


def min_norm_weights(gram: Tensor, tol: float = 1e-6, max_iter: int = 100, stop_gamma: float = 1e-3) -> Tensor:
    """Min-norm point of the convex hull of the gradients: ``argmin_{α ∈ simplex} αᵀ M α``.

    Runs the Frank–Wolfe of method.md §6.3 (:func:`frank_wolfe_min_norm`). Its stopping rules can stop short: after
    a clipped first step onto a vertex (the ``α_i > 1 − 10⁻³`` rule) or after 100 zig-zag iterations; on random
    3×3 Grams the objective was measured up to 1.6% of ``max_i ‖g_i‖²`` above the optimum. So the result is
    checked: when its Frank–Wolfe duality gap exceeds ``tol · max_i M_ii`` (and n ≤ 12), the exact solution
    (:func:`exact_min_norm`) is returned instead. With one loss the weight is 1 (no solver).

    Args:
        gram: ``[n, n]`` symmetric positive semi-definite Gram matrix of the per-loss gradients.
        tol: accepted duality gap, relative to the largest squared gradient norm.

    Returns:
        ``[n]`` non-negative float64 weights summing to 1 (CPU).

    Raises:
        ValueError: a non-square or non-finite matrix.
    """
    m = _check_gram(gram)
    n = m.shape[0]
    if n == 1:
        return torch.ones(1, dtype=torch.float64)
    alpha = frank_wolfe_min_norm(m, max_iter=max_iter, stop_gamma=stop_gamma)
    scale = float(m.diagonal().max())
    if n <= 12 and scale > 0 and fw_gap(m, alpha) > tol * scale:
        exact = exact_min_norm(m)
        logger.debug("Frank–Wolfe stopped short (gap %.2e); using the exact min-norm point", fw_gap(m, alpha))
        return exact
    return alpha


def gram_matrix(grads: Sequence[Sequence[Tensor | None]]) -> Tensor:
    """``M_ij = Σ_tensors <g_i, g_j>`` for per-loss lists of gradient tensors (``None`` = zero), float64 on CPU.

    Accumulated tensor by tensor (``[n, numel] @ [numel, n]``), so no flattened copy of all gradients is made and
    the device synchronises once.
    """
    n = len(grads)
    if n == 0:
        raise ValueError("gram_matrix needs at least one gradient list")
    gram: Tensor | None = None
    for parts in zip(*grads, strict=False):
        ref = next((g for g in parts if g is not None), None)
        if ref is None:
            continue
        rows = torch.stack([(g if g is not None else torch.zeros_like(ref)).reshape(-1).float() for g in parts])
        block = (rows @ rows.T).double()
        gram = block if gram is None else gram + block
    if gram is None:
        return torch.zeros(n, n, dtype=torch.float64)
    return gram.cpu()


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_gram(gram: Tensor) -> Tensor:
    """The sum of every process's Gram matrix under data parallelism (float64, CPU); ``gram`` itself in one process.

    A collective: every process must call it at the same point (each MGDA step does, with the same losses).
    """
    import torch.distributed as dist

    if _world_size() < 2:
        return gram
    backend = str(dist.get_backend())
    device = torch.device("cpu")
    if backend not in ("gloo", "mpi") and "cpu:" not in backend:  # nccl & co. reduce device tensors only
        acc = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
        if acc is not None:
            device = torch.device(acc.type, torch.accelerator.current_device_index())
        elif torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
    t = gram.detach().to(device=device, dtype=torch.float64).contiguous()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


class Weighting:
    """Base class: ``weights(losses, ...) -> {name: α}``.

    Attributes:
        name: the strategy's name.
        needs: what :meth:`weights` differentiates against: ``None``, ``"parameters"`` or ``"representation"``.
            The batches follow from it (:attr:`grouped_batches`), never from the strategy's name.
    """

    name = "base"
    needs: str | None = None

    @property
    def grouped_batches(self) -> bool:
        """Whether a step needs each loss's rows kept apart (``needs == "parameters"``): the collators then keep the
        groups unsorted and unduplicated (``FusedCollator(sort=False, dedupe=False)``, ``BiEncoderCollator(
        grouped=True)``) and each group gets its own forward, so a loss's parameter gradient only traverses its own
        rows. A strategy that needs nothing, or the shared representation, takes one fused, deduplicated batch."""
        return self.needs == "parameters"

    def weights(
        self,
        losses: dict[str, Tensor],
        parameters: Sequence[Tensor] | None = None,
        representation: Sequence[Tensor] | None = None,
    ) -> dict[str, float]:
        raise NotImplementedError

    def get_config_dict(self) -> dict[str, object]:
        return {"weighting": self.name}


class EqualWeighting(Weighting):
    """``α_t = 1/n`` for each of the ``n`` enabled losses."""

    name = "equal"

    def weights(self, losses, parameters=None, representation=None):  # noqa: D102
        return {k: 1.0 / len(losses) for k in losses}


class FixedWeighting(Weighting):
    """User-given weights per loss name (used as given, not normalised)."""

    name = "fixed"

    def __init__(self, fixed: dict[str, float]) -> None:
        if any(v < 0 for v in fixed.values()):
            raise ValueError(f"fixed loss weights must be non-negative, got {fixed}")
        self.fixed = dict(fixed)

    def weights(self, losses, parameters=None, representation=None):  # noqa: D102
        missing = [k for k in losses if k not in self.fixed]
        if missing:
            raise ValueError(f"no fixed weight for loss(es) {missing}; given: {self.fixed}")
        return {k: float(self.fixed[k]) for k in losses}

    def get_config_dict(self) -> dict[str, object]:
        return {"weighting": self.name, "weights": self.fixed}


class _MinNorm(Weighting):
    """Shared code of the two MGDA variants: per-loss gradients w.r.t. some tensors → Gram → min-norm weights."""

    def _targets(self, parameters, representation) -> Sequence[Tensor]:
        raise NotImplementedError

    def weights(self, losses, parameters=None, representation=None):  # noqa: D102
        names = list(losses)
        if len(names) == 1:
            return {names[0]: 1.0}
        targets = list(self._targets(parameters, representation))
        grads = [
            torch.autograd.grad(losses[k], targets, retain_graph=True, allow_unused=True) for k in names
        ]
        return self.weights_from_gram(gram_matrix(grads), names)

    def weights_from_gram(self, gram: Tensor, names: Sequence[str]) -> dict[str, float]:
        """Min-norm weights for a ready Gram matrix (equal weights, with a warning, if it is not finite).

        Under data parallelism the processes' matrices are summed first (:func:`all_reduce_gram`): every process
        gets the same weights (a non-finite entry anywhere gives equal weights everywhere).
        """
        gram = all_reduce_gram(gram)
        if not bool(torch.isfinite(gram).all()):
            logger.warning("%s: non-finite gradients (Gram %s); using equal weights this step", self.name, gram)
            return {k: 1.0 / len(names) for k in names}
        alpha = min_norm_weights(gram)
        return {k: float(a) for k, a in zip(names, alpha, strict=True)}

    def get_config_dict(self) -> dict[str, object]:
        world = _world_size()
        if world < 2:
            return {"weighting": self.name}
        return {"weighting": self.name, "gram": f"summed over {world} processes (the same weights on every one)"}


class MGDAWeighting(_MinNorm):
    """Parameter-level MGDA (method.md §6.3): gradients over the shared encoder parameters."""

    name = "mgda"
    needs = "parameters"

    def _targets(self, parameters, representation):
        if not parameters:
            raise ValueError("mgda weighting needs the shared encoder parameters")
        return parameters


class MGDAUBWeighting(_MinNorm):
    """MGDA-UB: gradients w.r.t. the shared representation (last hidden states of the fused forward)."""

    name = "mgda-ub"
    needs = "representation"

    def _targets(self, parameters, representation):
        if not representation:
            raise ValueError("mgda-ub weighting needs the shared representation tensor(s)")
        return representation


def build_weighting(name: str, fixed: dict[str, float] | None = None) -> Weighting:
    """A weighting strategy by name: ``mgda``, ``mgda-ub``, ``equal`` or ``fixed`` (with ``fixed`` weights)."""
    if name == "mgda":
        return MGDAWeighting()
    if name == "mgda-ub":
        return MGDAUBWeighting()
    if name == "equal":
        return EqualWeighting()
    if name == "fixed":
        if not fixed:
            raise ValueError("weighting 'fixed' needs loss weights, e.g. --loss-weights point=1,pair=0.5")
        return FixedWeighting(fixed)
    raise ValueError(f"unknown weighting {name!r}; choose one of {WEIGHTINGS}")
