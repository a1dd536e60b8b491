"""Calibrated relevance: map a reranker's raw score to a probability that the passage bears the answer.

A Platt fit (``p = sigmoid(a * score + b)``, logistic regression on one feature) on held-out ``(score, has_answer)``
pairs, saved with the model as ``calibration.json``, so that ``p >= 0.5`` separates answer-bearing passages from the
others on held-out data (what ``relevance_score`` thresholds assume). The fit is in the score the
:class:`~dpa_rag.reranker.rerank.Reranker` returns: the logit or probability of a cross-encoder, the plain cosine of
a bi-encoder.

Without a ``calibration.json`` (older folders, base models), :func:`default_calibration` maps a cosine through the
bi-encoder's own scaled logit ``s * cos + b`` (its saved scale and bias; 20 and -10 when none: a cosine of 0.5 is
the decision boundary), a logit through the sigmoid and leaves a probability as it is.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["CALIBRATION_FILE", "Calibration", "calibrate_trained", "default_calibration", "fit_lists", "fit_platt",
           "load_calibration", "save_calibration"]

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
DEFAULT_COSINE_SCALE = 20.0  # the bi-encoder's initial scale (biencoder.BiEncoderReranker)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid(a * score + b)`` (``identity``: ``p = score``, for scores that already are probabilities).

    Attributes:
        a, b: slope and intercept on the raw score.
        score: the raw score it applies to (``logit``, ``prob``, ``z1``, ``cosine``).
        source: ``fitted`` (held-out data, see ``pairs``/``positives``) or ``default``.
        pairs, positives: held-out pairs and answer-bearing ones it was fitted on.
        threshold: the raw score where ``p = 0.5`` (``-b / a``).
    """

    a: float = 1.0
    b: float = 0.0
    score: str = "logit"
    source: str = "default"
    identity: bool = False
    pairs: int = 0
    positives: int = 0

    @property
    def threshold(self) -> float | None:
        return None if self.identity or self.a == 0 else -self.b / self.a

    def __call__(self, score: float) -> float:
        """The calibrated relevance of a raw score, in ``[0, 1]``."""
        if self.identity:
            return min(1.0, max(0.0, float(score)))
        return _sigmoid(self.a * float(score) + self.b)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "threshold": self.threshold}


def fit_platt(scores: Sequence[float], labels: Sequence[bool | int], score: str = "logit",
              l2: float = 1e-3, iters: int = 100) -> Calibration:
    """Fit ``sigmoid(a * score + b)`` to binary labels by Newton's method (L2 ``l2`` on ``a`` keeps a perfectly
    separated set finite; Platt's smoothed targets keep the intercept finite).

    Raises:
        ValueError: fewer than one positive and one negative, or lengths differ.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"calibration needs positives and negatives; got {n_pos} and {n_neg}")
    hi, lo = (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2)  # Platt (1999) targets
    xs = [float(s) for s in scores]
    ts = [hi if y else lo for y in labels]
    mean = sum(xs) / len(xs)
    spread = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)) or 1.0
    zs = [(x - mean) / spread for x in xs]  # standardised: Newton is well conditioned whatever the score's range
    a, b = 0.0, math.log((n_pos + 1) / (n_neg + 1))
    for _ in range(iters):
        ga = gb = haa = hab = hbb = 0.0
        for z, t in zip(zs, ts, strict=True):
            p = _sigmoid(a * z + b)
            w = max(p * (1 - p), 1e-12)
            ga += (p - t) * z
            gb += p - t
            haa += w * z * z
            hab += w * z
            hbb += w
        ga += l2 * a
        haa += l2
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        da = (hbb * ga - hab * gb) / det
        db = (haa * gb - hab * ga) / det
        a, b = a - da, b - db
        if abs(da) < 1e-10 and abs(db) < 1e-10:
            break
    return Calibration(a=a / spread, b=b - a * mean / spread, score=score, source="fitted", pairs=len(xs),
                       positives=n_pos)


def default_calibration(score: str, scale: float | None = None, bias: float | None = None) -> Calibration:
    """The mapping used without a fitted file: see the module docstring."""
    if score in ("prob",):
        return Calibration(score=score, identity=True)
    if score == "cosine":
        s = DEFAULT_COSINE_SCALE if scale is None else float(scale)
        return Calibration(a=s, b=-s / 2 if bias is None else float(bias), score=score)
    return Calibration(a=1.0, b=0.0, score=score)


def save_calibration(model_dir: str | Path, cal: Calibration) -> Path:
    """Write ``calibration.json`` into the model folder."""
    path = Path(model_dir) / CALIBRATION_FILE
    path.write_text(json.dumps(cal.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def load_calibration(model_dir: str | Path) -> Calibration | None:
    """The fitted calibration saved with a model (``None``: no file, e.g. a hub id or an older folder)."""
    path = Path(str(model_dir)) / CALIBRATION_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    keys = {"a", "b", "score", "source", "identity", "pairs", "positives"}
    return Calibration(**{k: v for k, v in data.items() if k in keys})


def fit_lists(scores: Sequence[Sequence[float]], has_answer: Sequence[Sequence[bool]], score: str) -> Calibration:
    """:func:`fit_platt` over held-out lists (each question's passages' scores and ``has_answer`` flags)."""
    flat = [float(s) for row in scores for s in row]
    labels = [bool(y) for row in has_answer for y in row]
    return fit_platt(flat, labels, score=score)


def calibrate_trained(model_dir: str | Path, model: Any, records: Sequence[Any], scores: Sequence[Sequence[float]],
                      score: str) -> Calibration | None:
    """The training hook: fit on the held-out retrieval lists' scores (as training scored them) and save it in the
    score the served ``Reranker`` returns (a bi-encoder's logit ``s * cos + b`` back to its cosine; a 1-logit
    cross-encoder's logit). ``None`` (nothing written) when the held-out lists lack positives or negatives."""
    labels = [[bool(c.has_answer) for c in r.ctxs] for r in records]
    if hasattr(model, "log_scale"):  # bi-encoder: the Reranker scores with the plain cosine
        s, b = float(model.scale.detach()), float(model.bias.detach())
        scores, score = [[(x - b) / s for x in row] for row in scores], "cosine"
    elif int(getattr(getattr(model, "config", None), "num_labels", 1)) == 1:
        score = "logit"
    try:
        cal = fit_lists(scores, labels, score)
    except ValueError as exc:
        logger.warning("no relevance calibration saved: %s", exc)
        return None
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    save_calibration(model_dir, cal)
    logger.info("relevance calibration on %d held-out pairs (%d answer-bearing): p = sigmoid(%.4g * %s + %.4g)",
                cal.pairs, cal.positives, cal.a, score, cal.b)
    return cal
