"""The graded preference signal (method.md §13): teacher-forced answer log-probabilities and the loglik label rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpa_rag.generation import CachedGenerator, LoglikUnsupported
from dpa_rag.generation.fake import FakeGenerator
from dpa_rag.io import write_jsonl
from dpa_rag.mining.labels import ALIGNED, NEUTRAL, UNALIGNED, categorize, categorize_gain
from dpa_rag.mining.mine import MineConfig, run, scoring_golds
from dpa_rag.mining.prompts import qa_prompt
from toys import city_retrieval


def _manual_loglik(gen, prompt, continuation: str) -> float:  # type: ignore[no-untyped-def]
    """Sum of log p(continuation tokens) from one unpadded forward over prompt + continuation."""
    import torch

    prompt_ids = gen.encode(prompt)
    cont_ids = gen.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(gen.model(input_ids=ids).logits.float(), dim=-1)[0]
    return float(sum(logp[len(prompt_ids) + t - 1, tok] for t, tok in enumerate(cont_ids)))


@pytest.fixture(scope="module")
def tiny_hf(tiny_llm_dir: Path):  # type: ignore[no-untyped-def]
    from dpa_rag.generation.hf import HFGenerator

    return HFGenerator(str(tiny_llm_dir), dtype="float32", device="cpu", batch_size=3)


def test_hf_loglik_equals_hand_computed_and_batched_equals_single(tiny_hf) -> None:  # type: ignore[no-untyped-def]
    prompts = [
        qa_prompt("who was the first king of france", []),
        qa_prompt("what river runs through paris", ["Title: Paris Content: the river of paris is the seine"]),
        qa_prompt("who wrote the song", ["Title: Song Content: a long passage " + "about the song " * 12]),
        "a plain string prompt",
    ]
    conts = ["the king", "seine", "the beatles", "yes"]
    batched = tiny_hf.loglik(prompts, conts)
    one_by_one = [tiny_hf.loglik([p], [c])[0] for p, c in zip(prompts, conts, strict=True)]
    for (s_b, n_b), (s_1, n_1), p, c in zip(batched, one_by_one, prompts, conts, strict=True):
        assert n_b == n_1 == len(tiny_hf.tokenizer(c, add_special_tokens=False)["input_ids"])
        assert s_b == pytest.approx(s_1, abs=1e-4)
        assert s_b == pytest.approx(_manual_loglik(tiny_hf, p, c), abs=1e-4)
        assert s_b < 0
    # pairs sharing a prompt share its forward (KV cache gathered per continuation): same values as alone
    shared_p = [prompts[1]] * 3 + [prompts[0]] * 2
    shared_c = ["seine", "the river seine of paris", "x", "the king", "france"]
    for (s, n), p, c in zip(tiny_hf.loglik(shared_p, shared_c), shared_p, shared_c, strict=True):
        assert s == pytest.approx(_manual_loglik(tiny_hf, p, c), abs=1e-4)
        assert n == len(tiny_hf.tokenizer(c, add_special_tokens=False)["input_ids"])
    # the prompt's own tokens are not counted: a longer continuation has more tokens, not a longer prompt
    (_, n_short), (_, n_long) = tiny_hf.loglik([prompts[0], prompts[2]], ["paris", "paris"])
    assert n_short == n_long


def test_mine_loglik_gain_is_best_normalised_gold_difference(run_dir: Path, tiny_hf) -> None:  # type: ignore[no-untyped-def]
    ctxs = [{"id": f"c{j}", "title": f"Doc {j}", "text": t} for j, t in enumerate(
        ["paris is the capital of france", "london is a city in england", "the nile is a river"])]
    golds = ["Paris", "the city of paris", "paris"]  # the third normalises like the first: scored once
    write_jsonl(run_dir / "ret.jsonl", [{"id": "q1", "question": "what is the capital of france", "answers": golds,
                                         "ctxs": ctxs}])
    cfg = MineConfig(retrieval=run_dir / "ret.jsonl", out_dir=run_dir / "mine", backend="hf", model="unused",
                     label_rule="loglik", ranks=[1, 2, 3], agreement_questions=0, progress=False,
                     cache_dir=run_dir / "cache")
    pref = json.loads(run(cfg, backend=tiny_hf).preferences.read_text().splitlines()[0])
    used = scoring_golds(golds, 3)
    assert used == ["Paris", "the city of paris"]

    def best(prompt) -> float:  # type: ignore[no-untyped-def]
        vals = []
        for g in used:
            s, n = tiny_hf.loglik([prompt], [g])[0]
            vals.append(s / n)
        return max(vals)

    cb = best(qa_prompt(pref["question"], []))
    assert pref["closed_book"]["loglik"] == pytest.approx(cb, abs=1e-4)
    for probe, ctx in zip(pref["probes"], ctxs, strict=True):
        from dpa_rag.data.schema import format_passage

        with_passage = best(qa_prompt(pref["question"], [format_passage(ctx["title"], ctx["text"])]))
        assert probe["loglik"] == pytest.approx(with_passage, abs=1e-4)
        assert probe["gain"] == pytest.approx(with_passage - cb, abs=1e-4)
        assert probe["category"] == categorize_gain(probe["gain"], 0.5, 0.5)
        assert "answer" not in probe  # no generation without agreement questions


def test_gain_thresholds_and_categorize() -> None:
    assert categorize_gain(0.6) == ALIGNED and categorize_gain(-0.6) == UNALIGNED and categorize_gain(0.2) == NEUTRAL
    assert categorize_gain(0.2, positive=0.1) == ALIGNED
    assert categorize({"loglik": -3.0}, {"loglik": -1.0}, "loglik") == ALIGNED
    assert categorize({}, {"gain": -1.0}, "loglik") == UNALIGNED
    with pytest.raises(ValueError):
        categorize_gain(0.0, positive=-1)


class KilledScorer(FakeGenerator):
    """The fake backend, killed when asked for its ``die_at``-th loglik batch."""

    def __init__(self, die_at: int | None = None) -> None:
        super().__init__()
        self.die_at = die_at
        self.loglik_batches = 0

    def loglik(self, prompts, continuations):  # type: ignore[no-untyped-def]
        self.loglik_batches += 1
        if self.die_at is not None and self.loglik_batches >= self.die_at:
            raise KeyboardInterrupt("simulated kill")
        return super().loglik(prompts, continuations)


def _cfg(run_dir: Path, out: str, cache: str, **kw: object) -> MineConfig:
    base = {"retrieval": city_retrieval(run_dir / "ret.jsonl", n=8, has_answer=True), "out_dir": run_dir / out,
            "backend": "fake", "cache_dir": run_dir / cache, "label_rule": "loglik", "ranks": [1], "probe_top": 4,
            "batch_size": 4, "chunk_size": 3, "progress": False, "agreement_questions": 4}
    return MineConfig(**{**base, **kw})


def test_mine_loglik_stats_agreement_and_cache(run_dir: Path) -> None:
    backend = KilledScorer()
    path = run(_cfg(run_dir, "mine", "cache"), backend=backend)
    prefs = [json.loads(x) for x in path.preferences.read_text().splitlines()]
    assert all(len(p["probes"]) == 4 for p in prefs)  # probe_top 4 probes every rank
    cats = {p["category"] for pref in prefs for p in pref["probes"]}
    assert cats == {ALIGNED, NEUTRAL}  # the fake: a passage holding the answer gains 1.9 nats/token; others 0
    neutral = [p for pref in prefs for p in pref["probes"] if not p["ctx"]["has_answer"]]
    assert neutral and all(p["gain"] == pytest.approx(0.0) for p in neutral)
    assert [("answer" in prefs[i]["probes"][0]) for i in range(6)] == [True] * 4 + [False] * 2
    stats = json.loads((run_dir / "mine" / "stats.json").read_text())
    assert stats["overall"]["counts"] == {"aligned": 16, "unaligned": 0, "neutral": 16}
    assert stats["mean_gain"]["answer_bearing"] == pytest.approx(1.9) and stats["mean_gain"]["other"] == 0.0
    assert stats["agreement"]["probes"] == 16
    assert "Agreement with the hit rule" in (run_dir / "mine" / "summary.md").read_text()
    # a second run with a fresh output folder costs no model call
    again = KilledScorer(die_at=1)
    second = run(_cfg(run_dir, "mine2", "cache"), backend=again)
    assert second.preferences.read_bytes() == path.preferences.read_bytes()


def test_kill_during_loglik_mining_resumes_to_identical_output(run_dir: Path) -> None:
    clean = run(_cfg(run_dir, "clean", "cache-clean"), backend=KilledScorer())
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(run_dir, "resumed", "cache-resumed"), backend=KilledScorer(die_at=8))
    partial = (run_dir / "resumed" / "preferences.jsonl").read_text().splitlines()
    assert 0 < len(partial) < 8
    resumed = run(_cfg(run_dir, "resumed", "cache-resumed"), backend=KilledScorer())
    assert resumed.preferences.read_bytes() == clean.preferences.read_bytes()


def test_backend_without_loglik_fails_clearly() -> None:
    class NoScores:
        model_id = "x"

        def generate(self, prompts, params):  # type: ignore[no-untyped-def]
            return ["a"] * len(prompts)

    with pytest.raises(LoglikUnsupported, match="cannot score"):
        CachedGenerator(NoScores(), None).loglik(["p"], ["a"])


def test_utility_metrics_by_hand() -> None:
    from dpa_rag.reranker.evaluation import utility_metrics

    lists = [{"question": "q", "ctxs": [
        {"text": "a", "rank": 1, "gain": -1.0, "category": "unaligned", "has_answer": False},
        {"text": "b", "rank": 2, "gain": 2.0, "category": "aligned", "has_answer": True},
        {"text": "c", "rank": 3, "gain": 1.0, "category": "aligned", "has_answer": True}]}]
    retr = utility_metrics(lists, "retriever", k_values=(1, 3))
    oracle = utility_metrics(lists, "oracle", k_values=(1, 3))
    model = utility_metrics(lists, [[0.1, 0.2, 0.9]], k_values=(1, 3))  # c, b, a
    import math

    idcg = 2.0 + 1.0 / math.log2(3)
    assert retr["ndcg@1"] == 0.0 and retr["mrr_aligned"] == 0.5 and retr["top1_gain"] == -1.0
    assert retr["ndcg@3"] == pytest.approx((2.0 / math.log2(3) + 1.0 / 2.0) / idcg)
    assert oracle["ndcg@1"] == 1.0 and oracle["ndcg@3"] == pytest.approx(1.0) and oracle["top1_gain"] == 2.0
    assert model["ndcg@1"] == pytest.approx(0.5) and model["mrr_aligned"] == 1.0 and model["top1_has_answer"] == 1.0


def test_graded_preferences_build_ranked_data_and_utility_report(run_dir: Path, tiny_bert_dir: Path) -> None:
    from dpa_rag.data.reranker_records import load_reranker_train
    from dpa_rag.mining.reranker_data import RerankerDataConfig
    from dpa_rag.mining.reranker_data import run as build
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.train import run as train_reranker

    retrieval = city_retrieval(run_dir / "ret.jsonl", n=10, has_answer=True)
    prefs = run(MineConfig(retrieval=retrieval, out_dir=run_dir / "mine", backend="fake", label_rule="loglik",
                           probe_top=4, agreement_questions=0, progress=False, cache_dir=run_dir / "cache"))
    data = build(RerankerDataConfig(preferences=prefs.preferences, out_dir=run_dir / "data", train_fraction=0.6,
                                    valid_fraction=0.2, test_fraction=0.2))
    stats = json.loads(data.stats.read_text())
    assert stats["pool"] == "ranked" and stats["graded"] is True
    train = load_reranker_train(data.train)
    assert len(train) == stats["split_questions"]["train"]  # every question with 2 probes of different gain trains
    for rec in train:  # best gain first: the answer-bearing passages lead the rank list
        assert "is the city" in rec.rank_list[0] and rec.positive[0] != rec.negative[0]
    lists = [json.loads(x) for x in data.valid_lists.read_text().splitlines()]
    assert lists and all(len(r["ctxs"]) == 4 and all("gain" in c for c in r["ctxs"]) for r in lists)
    out = train_reranker(TrainRerankerConfig(
        train=str(data.train), utility_valid=str(data.valid_lists),
        utility_test=str(data.test_lists), backbone=str(tiny_bert_dir), kind="bi-encoder",
        out_dir=str(run_dir / "rr"), epochs=1, batch_size=2, max_length=64, device="cpu",
        metric_for_best_model="utility_ndcg_at_3",
    ))
    report = json.loads(out.utility_metrics.read_text())
    assert list(report) == ["retriever order", "oracle (largest gain first)", "untrained model", "aligned reranker"]
    assert report["oracle (largest gain first)"]["ndcg@1"] == pytest.approx(1.0)
    assert "Utility ranking on held-out questions" in (out.model / "README.md").read_text()
    valid = json.loads(out.valid_metrics.read_text())
    assert "eval_utility_ndcg@3" in valid  # metric_for_best_model's older spelling utility_ndcg_at_3 still picks it


def test_review_fixes_article_golds_all_aligned_pool_short_lists_and_relabel() -> None:
    from dpa_rag.data.schema import Preference
    from dpa_rag.io import DataError
    from dpa_rag.mining.common import relabel
    from dpa_rag.mining.reranker_data import build_list_record, build_train_record

    assert scoring_golds(["A", "a", "b"], 3) == ["A", "b"]  # an all-article gold is still scored (once)

    def probe(rank: int, text: str, gain: float, cat: str) -> dict:
        return {"rank": rank, "ctx": {"title": "t", "text": text}, "gain": gain, "category": cat}

    raw = {"id": "q", "question": "q?", "answers": ["x"], "closed_book": {"loglik": -5.0},
           "probes": [probe(1, "one", 2.0, ALIGNED), probe(2, "two", 1.0, ALIGNED)]}
    pref = Preference.model_validate(raw)
    record, info = build_train_record(pref, 1, 1, 2, pool="ranked")
    assert record is not None and "one" in record["positive"][0] and "two" in record["negative"][0]
    same = Preference.model_validate({**raw, "probes": [probe(1, "dup", 2.0, ALIGNED), probe(2, "dup", 1.0, ALIGNED)]})
    assert build_list_record(same) is None  # one distinct passage: no ranking to evaluate
    with pytest.raises(DataError, match="label_rule stored"):
        relabel([pref], "hit")


def test_extra_top_k_is_validated(tmp_path: Path) -> None:
    from dpa_rag.pipeline.config import PipelineConfig

    base = {"questions": str(tmp_path / "q.jsonl"), "corpus": [str(tmp_path / "c.jsonl")], "retrieve_top_k": 5}
    assert PipelineConfig(**base, extra_top_k=[1, 5]).extra_top_k == [1, 5]
    for bad in ([0], [6]):
        with pytest.raises(ValueError, match="extra_top_k"):
            PipelineConfig(**base, extra_top_k=bad)
