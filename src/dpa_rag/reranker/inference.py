"""Reranker inference: score (query, passage) pairs fast, for rerank, evaluation and training alike.

:func:`predict_logits` tokenises all pairs once, sorts them by token length (stable), runs length-bucketed batches
under ``torch.inference_mode`` and returns the logits in input order (each kind scores its own way:
:meth:`dpa_rag.reranker.kinds.base.RerankerKind.predict_logits`). :func:`resolve_batch_size` and
:func:`resolve_dtype` turn the ``batch_size``/``dtype`` options into values. :mod:`dpa_rag.reranker.rerank`
re-exports all three.

:func:`score_pairs` turns the logits into the inference score (:func:`dpa_rag.reranker.model.inference_scores`, or a
bi-encoder's cosine); :func:`score_lists` scores per-question passage lists in one call and splits the scores back
(:func:`split_scores`); :func:`record_lists` gives a retrieval file's lists. ``Reranker.rerank``, ``PairEvaluator``
and ``train-reranker``'s held-out reports all score through these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dpa_rag.config import DTYPES, normalize_dtype
from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.models import pick_dtype
from dpa_rag.reranker.kinds import kind_of_model

__all__ = [
    "CPU_BATCH_SIZE",
    "GPU_BATCH_SIZE",
    "predict_logits",
    "record_lists",
    "resolve_batch_size",
    "resolve_dtype",
    "score_lists",
    "score_pairs",
    "split_scores",
]

def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """``auto`` (bf16 only where it is faster, see :func:`dpa_rag.models.pick_dtype`), ``float32``, ``bfloat16``,
    ``float16`` (or their short names, :func:`dpa_rag.config.normalize_dtype`)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = normalize_dtype(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return pick_dtype(name, device)


CPU_BATCH_SIZE = 16
GPU_BATCH_SIZE = 64


def resolve_batch_size(batch_size: int | None, device: str | torch.device) -> int:
    """Pairs per forward: ``batch_size`` if set, else :data:`CPU_BATCH_SIZE` on a CPU and 64 elsewhere.

    On a CPU, small length-sorted forwards keep activations in cache and carry less padding: MiniLM on 256 real NQ
    pairs scored 22.5 / 20.4 / 17.2 pairs/s in forwards of 16 / 32 / 64 in a side test (on the demo's shorter pairs
    the three were within 8%).
    """
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        return batch_size
    return CPU_BATCH_SIZE if torch.device(device).type == "cpu" else GPU_BATCH_SIZE


def predict_logits(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int | None = None,
    max_length: int = 512,
) -> torch.Tensor:
    """Logits ``[N, num_labels]`` (float32, CPU) of ``(query, passage)`` pairs, in input order, by the model's kind
    (:meth:`~dpa_rag.reranker.kinds.base.RerankerKind.predict_logits`).

    Identical pairs are scored once. The model is put in eval mode for the call and restored afterwards.
    ``batch_size``: pairs per forward (default: :func:`resolve_batch_size` for the model's device).
    """
    kind = kind_of_model(model)
    batch_size = resolve_batch_size(batch_size, next(model.parameters()).device)
    return kind.predict_logits(model, tokenizer, pairs, batch_size, max_length)


def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int | None = None,
    max_length: int = 512,
    score: str = "prob",
) -> list[float]:
    """Inference scores of ``(query, passage)`` pairs, in input order.

    ``score``: ``prob``/``z1`` for a two-class head (a 1-logit head, and a bi-encoder's scaled cosine, score with
    the logit; :func:`dpa_rag.reranker.model.inference_scores`), or ``cosine``: a bi-encoder's plain cosine
    similarity (what ``Reranker`` ranks a bi-encoder by; the same order as its logit).
    """
    kind = kind_of_model(model)
    batch_size = resolve_batch_size(batch_size, next(model.parameters()).device)
    return kind.score_pairs(model, tokenizer, pairs, batch_size, max_length, score)


def split_scores(scores: Sequence[float], sizes: Sequence[int]) -> list[list[float]]:
    """Flat scores cut back into consecutive lists of ``sizes`` (one per question).

    Raises:
        ValueError: the sizes do not add up to the number of scores.
    """
    if sum(sizes) != len(scores):
        raise ValueError(f"{len(scores)} scores for lists of {sum(sizes)} items")
    out, pos = [], 0
    for n in sizes:
        out.append(list(scores[pos : pos + n]))
        pos += n
    return out


def score_lists(
    model: nn.Module,
    tokenizer: Any,
    lists: Sequence[tuple[str, Sequence[str]]],
    batch_size: int | None = None,
    max_length: int = 512,
    score: str = "prob",
) -> list[list[float]]:
    """Scores of every query's passages, ``[(query, [passage, ...]), ...]`` → ``[[score, ...], ...]``: all pairs
    scored in one :func:`score_pairs` call (length-bucketed together), then split back per query."""
    pairs = [(q, p) for q, passages in lists for p in passages]
    flat = score_pairs(model, tokenizer, pairs, batch_size, max_length, score)
    return split_scores(flat, [len(passages) for _, passages in lists])


def record_lists(records: Sequence[RetrievalRecord]) -> list[tuple[str, list[str]]]:
    """A retrieval file's lists for :func:`score_lists`: each question with its rendered passages, in file order."""
    return [(r.question, [c.render() for c in r.ctxs]) for r in records]
