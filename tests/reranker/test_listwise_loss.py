"""The listwise (ListNet) loss on graded gains: its value, its gradient's direction, and MGDA over four losses."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpa_rag.reranker.losses.listwise import GAINS_KEY, ListwiseLoss
from toys import LOSSES, authors_train_records, write_rows


def test_value_is_cross_entropy_against_softmax_of_gains():
    scores = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    gains = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    got = ListwiseLoss(temperature=0.5)(scores, gains, mask)
    expected = []
    for s, g, n in ((scores[0], gains[0], 3), (scores[1], gains[1], 2)):
        t = torch.softmax(g[:n] / 0.5, 0)
        expected.append(float(-(t * torch.log_softmax(s[:n], 0)).sum()))
    assert float(got) == pytest.approx(sum(expected) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        ListwiseLoss()(scores, gains[:, :2])
    with pytest.raises(ValueError, match="at least 2"):
        ListwiseLoss()(scores, gains, torch.tensor([[True, False, False], [True, True, True]]))


def test_gradient_moves_scores_toward_the_gain_order():
    gains = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    scores = torch.zeros(1, 4, requires_grad=True)
    opt = torch.optim.SGD([scores], lr=1.0)
    loss = ListwiseLoss()
    first = float(loss(scores, gains).detach())
    for _ in range(50):
        opt.zero_grad()
        loss(scores, gains).backward()
        opt.step()
    order = torch.argsort(scores.detach()[0], descending=True).tolist()
    assert order == [1, 3, 2, 0]  # the gains' order
    assert float(loss(scores, gains).detach()) < first


def test_record_check_names_the_missing_gains():
    from dpa_rag.data.reranker_records import RerankerTrainRecord

    rec = RerankerTrainRecord(**authors_train_records(1)[0])
    assert GAINS_KEY in ListwiseLoss.check_record(rec)
    rec = RerankerTrainRecord(**{**authors_train_records(1)[0], GAINS_KEY: [1.0, 0.5, 0.0, math.nan]})
    assert "finite" in ListwiseLoss.check_record(rec)


def test_mgda_over_four_losses_on_the_tiny_encoder(tiny_bert_dir, run_dir):
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import run as train_reranker

    records = [{**r, GAINS_KEY: [2.0, 1.5, -0.5, -1.0]} for r in authors_train_records(4)]
    train = write_rows(run_dir / "train.jsonl", records)
    out = train_reranker(TrainRerankerConfig(
        train=str(train), out_dir=str(run_dir / "o"), backbone=str(tiny_bert_dir), losses=[*LOSSES, "listwise"],
        weighting="mgda", max_steps=2, batch_size=2, max_length=64,
    ))
    log = json.loads(out.train_log.read_text())
    assert log["losses"] == ["point", "pair", "contrastive", "listwise"]
    for step in log["steps"]:
        assert set(step["weights"]) == set(log["losses"])
        assert sum(step["weights"].values()) == pytest.approx(1.0) and min(step["weights"].values()) >= 0
        assert math.isfinite(step["losses"]["listwise"]) and step["losses"]["listwise"] > 0


def test_listwise_temperature_comes_from_the_config():
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.losses.base import LossOptions

    assert ListwiseLoss.from_options(LossOptions(listwise_temperature=0.25)).temperature == 0.25
    cfg = TrainRerankerConfig(train="t.jsonl", losses=["listwise"], listwise_temperature=0.5)
    assert cfg.alignment.listwise_temperature == 0.5
    with pytest.raises(ValueError):
        TrainRerankerConfig(train="t.jsonl", listwise_temperature=0)
