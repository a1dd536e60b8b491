"""The one ranking-metrics function (``dpa_rag.eval.ranking``), its key scheme and old-name aliases; the training
collator's grouping chosen by the weighting's declared ``needs``; the one ``TrainingArguments`` builder."""

from __future__ import annotations

import math

import pytest

from dpa_rag.eval.ranking import canonical_metric, rank_order, ranking_metrics


def test_ranking_metrics_hand_computed() -> None:
    # q1: first relevant at rank 2; q2: at rank 1; q3: none
    rel = [[0, 1, 0], [1, 0, 1], [0, 0, 0]]
    m = ranking_metrics(rel, ks=(1, 2, 3), ndcg=True)
    assert list(m) == ["mrr", "ndcg@1", "hit@1", "ndcg@2", "hit@2", "ndcg@3", "hit@3", "n_questions"]
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["hit@1"] == pytest.approx(1 / 3) and m["hit@2"] == pytest.approx(2 / 3) and m["hit@3"] == 2 / 3
    assert m["ndcg@1"] == pytest.approx((0 + 1 + 0) / 3)
    # q1 @2: dcg 1/log2(3), idcg 1; q2 @2: dcg 1, idcg 1 + 1/log2(3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1 / (1 + 1 / math.log2(3))) / 3)
    # q2 @3: dcg 1 + 1/2, idcg 1 + 1/log2(3)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1.5 / (1 + 1 / math.log2(3))) / 3)
    assert m["n_questions"] == 3.0


def test_ranking_metrics_scores_sort_stably_and_graded_gains() -> None:
    # scores put the relevant item first in q1; a tie in q2 keeps the given order (relevant second)
    m = ranking_metrics([[False, True], [False, True]], [[0.2, 0.9], [0.5, 0.5]], ks=(1,))
    assert m == {"mrr": (1 + 0.5) / 2, "hit@1": 0.5, "n_questions": 2.0}
    assert rank_order([0.5, 0.9, 0.5, 0.1]) == [1, 0, 2, 3]
    g = ranking_metrics([[0.0, 2.0, 1.0]], ks=(2,), ndcg=True)  # graded: relevant = gain > 0
    assert g["ndcg@2"] == pytest.approx((2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert g["mrr"] == 0.5 and g["hit@2"] == 1.0


def test_ranking_metrics_empty_and_mismatched() -> None:
    assert ranking_metrics([], ks=(1, 3)) == {"mrr": 0.0, "hit@1": 0.0, "hit@3": 0.0, "n_questions": 0.0}
    with pytest.raises(ValueError, match="score lists"):
        ranking_metrics([[1, 0]], [[0.1, 0.2], [0.3]])
    with pytest.raises(ValueError, match="2 scores for 3 items"):
        ranking_metrics([[1, 0, 0]], [[0.1, 0.2]])


def test_canonical_metric_maps_old_spellings() -> None:
    assert canonical_metric("hit_at_1") == "hit@1"
    assert canonical_metric("ndcg_at_10") == "ndcg@10"
    assert canonical_metric("utility_ndcg_at_3") == "utility_ndcg@3"
    assert canonical_metric("eval_hit_at_3") == "eval_hit@3"
    assert canonical_metric("n_ranked_questions") == "n_questions"
    assert canonical_metric("eval_n_ranked_questions") == "eval_n_questions"
    for same in ("f1", "mrr", "hit@1", "utility_ndcg@3", "utility_mrr_aligned", "eval_loss", "top1_gain"):
        assert canonical_metric(same) == same


def test_retrieve_and_reranker_metrics_share_the_function() -> None:
    from dpa_rag.data.schema import Ctx, RetrievalRecord
    from dpa_rag.reranker.metrics import answer_ranking_metrics
    from dpa_rag.retrieval.retrieve import retrieval_metrics

    recs = [RetrievalRecord(id="a", question="q", answers=["y"], ctxs=[Ctx(text="x", has_answer=False),
                                                                        Ctx(text="y", has_answer=True)]),
            RetrievalRecord(id="b", question="q2", answers=["w"], ctxs=[Ctx(text="z", has_answer=False),
                                                                         Ctx(text="v", has_answer=False)])]
    r = retrieval_metrics(recs, top_k=2)  # every question with answers counts (b: 0)
    assert r == {"n_questions": 2, "n_with_answers": 2, "hit@1": 0.0, "hit@2": 0.5, "mrr": 0.25}
    a = answer_ranking_metrics(recs)  # only questions with an answer-bearing passage (a)
    assert a == {"mrr": 0.5, "hit@1": 0.0, "hit@3": 1.0, "n_questions": 1.0}
    assert set(a) - {"n_questions"} <= set(ranking_metrics([[1]], ks=(1, 3)))


def test_utility_table_reads_old_keys() -> None:
    from dpa_rag.reranker.metrics import utility_table

    new = utility_table({"r": {"ndcg@3": 0.5, "n_questions": 2.0}})
    assert "ndcg@3" in new and "0.500" in new
    assert utility_table({"r": {"ndcg_at_3": 0.5, "n_questions": 2.0}}) == new


class _Tok:
    pad_token_id = 0


@pytest.mark.parametrize("needs", [None, "representation", "parameters"])
@pytest.mark.parametrize("kind", ["cross-encoder", "bi-encoder"])
def test_collator_grouping_follows_declared_needs(needs: str | None, kind: str) -> None:
    from dpa_rag.reranker.biencoder import BiEncoderCollator
    from dpa_rag.reranker.data import FusedCollator
    from dpa_rag.reranker.train import build_collator
    from dpa_rag.reranker.weighting import Weighting

    class Custom(Weighting):  # a new strategy: its name says nothing, its needs decide
        name = "custom"

    Custom.needs = needs
    grouped = needs == "parameters"
    assert Custom().grouped_batches is grouped
    collator = build_collator(kind, _Tok(), ["point", "pair", "contrastive"], Custom(), 64)
    if kind == "bi-encoder":
        assert isinstance(collator, BiEncoderCollator) and collator.grouped is grouped
    else:
        assert isinstance(collator, FusedCollator)
        assert collator.sort is not grouped and collator.dedupe is not grouped


def test_builtin_weightings_group_by_needs() -> None:
    from dpa_rag.reranker.weighting import WEIGHTINGS, build_weighting

    for name in WEIGHTINGS:
        w = build_weighting(name, {"point": 1.0} if name == "fixed" else None)
        assert w.grouped_batches is (w.needs == "parameters")
    assert build_weighting("mgda").grouped_batches and not build_weighting("mgda-ub").grouped_batches


def test_training_args_builder_accepts_old_metric_names(tmp_path) -> None:
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.training_args import RerankerTrainingArguments

    def make_training_args(out: str, metric_for_best_model: str, use_cpu: bool) -> RerankerTrainingArguments:
        cfg = TrainRerankerConfig(train="x", metric_for_best_model=metric_for_best_model)
        return RerankerTrainingArguments.for_alignment(cfg, out, use_cpu=use_cpu, evaluate=True, tensorboard=False)

    args = make_training_args(str(tmp_path), metric_for_best_model="utility_ndcg_at_3", use_cpu=True)
    assert args.metric_for_best_model == "utility_ndcg@3" and args.greater_is_better is True
    assert make_training_args(str(tmp_path), metric_for_best_model="hit_at_1", use_cpu=True).metric_for_best_model \
        == "hit@1"


def test_warmup_args_match_the_former_hand_built_ones(tmp_path) -> None:
    from transformers import TrainingArguments

    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import _warmup_args

    cfg = TrainRerankerConfig(train="x.jsonl", max_steps=3)
    built = _warmup_args(cfg, tmp_path, use_cpu=True)
    by_hand = TrainingArguments(  # what train.py built for the warm-up before it used the builder
        output_dir=str(tmp_path / "warmup"), num_train_epochs=cfg.warmup_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        learning_rate=cfg.warmup_lr, lr_scheduler_type="constant", optim="adamw_torch_fused", adam_epsilon=1e-6,
        weight_decay=0.0, max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16, seed=cfg.seed, use_cpu=True,
        save_strategy="no", eval_strategy="no",
        logging_steps=1, report_to=[], remove_unused_columns=False, disable_tqdm=True,
        max_steps=cfg.max_steps if cfg.max_steps else -1,
    )
    # settings that only act when evaluating or saving (both off here) may differ
    inert = {"eval_steps", "save_steps", "save_total_limit"}
    a, b = built.to_dict(), by_hand.to_dict()
    assert {k: v for k, v in a.items() if k not in inert} == {k: v for k, v in b.items() if k not in inert}
