"""Relevance warm-up: a short pass that teaches the head plain relevance before preference alignment.

A backbone without a reranking head starts from a random head; the authors' 20-record files cannot teach relevance,
so the aligned reranker can end up worse than BM25 order (FlagEmbedding #858, #291). The warm-up trains, for the
SAME training questions only, each question's answer-bearing passages (``has_answer``) against retrieved passages
without the answer: listwise softmax cross-entropy over ``[positive, negative_1..n]`` on the ranking score (the
logit, or ``z_1`` of the two-class head). It needs a DPR-style retrieval file of the training questions
(``--warmup-retrieval``); without one it is skipped with a log line.

Distilled warm-up (``warmup_target`` ``bi-encoder`` or ``bm25``, method.md §13): no labels. A teacher scores every
passage of each question's retrieved list; the cross-encoder learns the teacher's order with a list-wise KL
divergence ``KL(softmax(t / T) || softmax(s))`` (``t`` = teacher scores, ``T`` = ``warmup_temperature``, ``s`` = the
student's ranking scores at temperature 1) over up to ``warmup_list_size`` passages per list: the teacher's top
half plus a seeded random sample of the rest. Teachers:

* ``bi-encoder``: the backbone itself loaded as a sentence-transformers embedding model (or ``warmup_teacher``);
  ``t`` = cosine of query and passage embeddings (default ``T`` = 0.05, sentence-transformers' scale 20).
* ``bm25``: one BM25 index (bm25s, English stop words, no stemming) over the distinct passages of all lists in the
  file, each list's passages scored for its question; ``t`` = the scores standardised within the list (mean 0,
  std 1; default ``T`` = 1). The file's own ``ctx.score`` is not used: it is whatever the retriever was (often
  dense), not BM25.

The two losses are :class:`~dpa_rag.reranker.losses.relevance.RelevanceCELoss` and
:class:`~dpa_rag.reranker.losses.distill.DistillKLLoss` (registered for their targets in
:mod:`dpa_rag.reranker.losses.registry`), trained by the one :class:`~dpa_rag.reranker.trainer.RerankerTrainer`.

Questions: every question of ``--warmup-retrieval`` (it holds the training split's retrieval), not only those with a
reranker record, EXCEPT the held-out questions of ``--eval-retrieval`` (its questions that are not reranker
training queries, the ones the ranking report is computed on): a question is used when it is a reranker training
query or is not in ``--eval-retrieval`` at all (normalised match; repeated questions once).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from dpa_rag.data.reranker_records import RerankerTrainRecord
from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.eval.metrics import normalize_answer
from dpa_rag.reranker.losses.distill import DistillCollator, distill_kl_loss
from dpa_rag.reranker.losses.relevance import WarmupCollator

__all__ = [
    "DEFAULT_TEMPERATURE",
    "WARMUP_TARGETS",
    "DistillCollator",
    "DistillExample",
    "RelevanceExample",
    "WarmupCollator",
    "bi_encoder_teacher_scores",
    "bm25_teacher_scores",
    "build_distill_examples",
    "build_warmup_examples",
    "distill_kl_loss",
    "make_warmup_dataset",
    "resolve_warmup_target",
    "select_distill_questions",
]

WARMUP_TARGETS = ("auto", "has-answer", "bi-encoder", "bm25")
# default teacher temperature per target: cosine scores (sentence-transformers' scale 20) / standardised BM25 scores
DEFAULT_TEMPERATURE = {"bi-encoder": 0.05, "bm25": 1.0}

logger = logging.getLogger(__name__)


@dataclass
class RelevanceExample:
    """One question, one answer-bearing passage and its retrieved negatives (rendered passages)."""

    query: str
    positive: str
    negatives: list[str]


def build_warmup_examples(
    train: Sequence[RerankerTrainRecord], retrieval: Sequence[RetrievalRecord], negatives: int = 3
) -> list[RelevanceExample]:
    """Warm-up examples from the retrieval records whose question is a training question (normalised match).

    Each answer-bearing passage becomes one example with the first ``negatives`` retrieved passages without the
    answer (retriever order); questions lacking either side are skipped.
    """
    wanted = {normalize_answer(r.query) for r in train}
    out: list[RelevanceExample] = []
    matched = 0
    for rec in retrieval:
        if normalize_answer(rec.question) not in wanted:
            continue
        matched += 1
        pos = [c.render() for c in rec.ctxs if c.has_answer]
        neg = [c.render() for c in rec.ctxs if c.has_answer is False][:negatives]
        if not pos or not neg:
            continue
        out += [RelevanceExample(rec.question, p, neg) for p in pos]
    logger.info("relevance warm-up: %d examples from %d of %d training questions", len(out), matched, len(wanted))
    return out


class _Examples(Dataset):
    def __init__(self, examples: Sequence[RelevanceExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> RelevanceExample:
        return self.examples[i]


def make_warmup_dataset(examples: Sequence[Any]) -> Dataset:
    """Examples as a map-style dataset for the warm-up's :class:`~dpa_rag.reranker.trainer.RerankerTrainer`."""
    return _Examples(examples)


# --- distilled warm-up --------------------------------------------------------------------------------------------


def resolve_warmup_target(target: str, backbone: str, teacher: str | None = None) -> str:
    """``has-answer``, ``bi-encoder`` or ``bm25``. ``auto``: ``bi-encoder`` when a ``teacher`` is given or the
    backbone is an embedding model (the same detection as ``--kind auto``: a sentence-transformers folder without a
    classification head, e.g. the bundled MiniLM), ``has-answer`` otherwise (plain encoders, cross-encoder
    checkpoints)."""
    if target not in WARMUP_TARGETS:
        raise ValueError(f"warm-up target must be one of {', '.join(WARMUP_TARGETS)}; got {target!r}")
    if target != "auto":
        return target
    if teacher:
        return "bi-encoder"
    from dpa_rag.reranker.kinds import get_kind, resolve_kind

    return "bi-encoder" if get_kind(resolve_kind(backbone, "auto")).embeds else "has-answer"


def select_distill_questions(
    retrieval: Sequence[RetrievalRecord], train: Sequence[RerankerTrainRecord],
    eval_records: Sequence[RetrievalRecord] | None = None,
) -> tuple[list[RetrievalRecord], dict[str, int]]:
    """The retrieval records to distil on, and counts.

    Kept: a question that is a reranker training query, or that is not in ``eval_records`` at all (normalised
    match); dropped: the held-out questions of the ranking report (in ``eval_records``, not a training query),
    repeated questions (first kept) and lists of fewer than two passages.
    """
    train_q = {normalize_answer(r.query) for r in train}
    eval_q = {normalize_answer(r.question) for r in eval_records or []}
    held_out = eval_q - train_q
    kept: list[RetrievalRecord] = []
    seen: set[str] = set()
    counts = {"questions": len(retrieval), "held_out_excluded": 0, "repeated": 0, "short_lists": 0,
              "training_queries": 0}
    for rec in retrieval:
        key = normalize_answer(rec.question)
        if key in held_out:
            counts["held_out_excluded"] += 1
            continue
        if key in seen:
            counts["repeated"] += 1
            continue
        seen.add(key)
        if len(rec.ctxs) < 2:
            counts["short_lists"] += 1
            continue
        counts["training_queries"] += key in train_q
        kept.append(rec)
    counts["kept"] = len(kept)
    return kept, counts


def bi_encoder_teacher_scores(
    teacher: str, records: Sequence[RetrievalRecord], max_length: int | None = None, device: str | None = None,
    batch_size: int = 32,
) -> list[list[float]]:
    """Cosine of query and passage embeddings of the sentence-transformers model ``teacher``, per list."""
    from dpa_rag.reranker.biencoder import load_biencoder, score_bi

    model = load_biencoder(teacher, device=device, max_length=max_length)
    pairs = [(r.question, c.render()) for r in records for c in r.ctxs]
    flat = score_bi(model, pairs, batch_size=batch_size, max_length=max_length, cosine=True).tolist()
    del model
    return _split(flat, records)


def bm25_teacher_scores(records: Sequence[RetrievalRecord]) -> list[list[float]]:
    """BM25 scores of each list's passages for its question, the index built over the distinct passages of all
    lists (bm25s, English stop words, no stemming), standardised within each list (mean 0, std 1)."""
    from dpa_rag.data.schema import Passage
    from dpa_rag.retrieval.bm25 import BM25Retriever

    where: dict[tuple[str, str], int] = {}
    passages: list[Passage] = []
    for r in records:
        for c in r.ctxs:
            key = (c.title, c.text)
            if key not in where:
                where[key] = len(passages)
                passages.append(Passage(id=str(len(passages)), title=c.title, text=c.text))
    index = BM25Retriever.build(passages, show_progress=False)
    out = []
    for r in records:
        all_scores = index.scores(r.question)
        out.append(_standardise([float(all_scores[where[(c.title, c.text)]]) for c in r.ctxs]))
    return out


def _split(flat: Sequence[float], records: Sequence[RetrievalRecord]) -> list[list[float]]:
    per, pos = [], 0
    for r in records:
        per.append(list(flat[pos : pos + len(r.ctxs)]))
        pos += len(r.ctxs)
    return per


def _standardise(xs: Sequence[float]) -> list[float]:
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
    return [(x - mean) / std if std > 1e-12 else 0.0 for x in xs]


@dataclass
class DistillExample:
    """One question, up to ``list_size`` of its retrieved passages (rendered) and the teacher's score of each."""

    query: str
    passages: list[str]
    teacher: list[float]


def build_distill_examples(
    records: Sequence[RetrievalRecord], scores: Sequence[Sequence[float]], list_size: int = 8, seed: int = 42,
) -> list[DistillExample]:
    """One example per list: all its passages when it has at most ``list_size``, else the teacher's top
    ``ceil(list_size / 2)`` plus a random sample (seeded) of the rest, in the list's own order."""
    rng = random.Random(seed)
    out = []
    for rec, sc in zip(records, scores, strict=True):
        idx = list(range(len(rec.ctxs)))
        if len(idx) > list_size:
            by_teacher = sorted(idx, key=lambda i: -sc[i])  # stable: ties in retriever order
            top = by_teacher[: (list_size + 1) // 2]
            rest = rng.sample(by_teacher[len(top):], list_size - len(top))
            idx = sorted(top + rest)
        out.append(DistillExample(rec.question, [rec.ctxs[i].render() for i in idx], [float(sc[i]) for i in idx]))
    return out
