"""Reranker inference (cross- and bi-encoders): score (query, passage) pairs fast, rerank DPR-style retrieval records.

:func:`predict_logits` (from :mod:`dpa_rag.reranker.inference`, re-exported here) tokenises all pairs once, sorts
them by token length (stable), runs length-bucketed batches under ``torch.inference_mode`` and returns the logits
in input order. :class:`Reranker` wraps a trained reranker folder (or any ``CrossEncoder``-compatible model:
bundled alias, hub id or folder) for the answer stage:
``score(query, docs)`` and ``rerank(records, top_k)``. Reranked records keep the DPR layout: ``ctxs`` sorted by the
reranker score (ties by retriever rank), cut to ``top_k``, each with ``score`` = reranker score and the retriever's
``retriever_score``/``retriever_rank`` (1-based) kept. A model trained with retriever fusion (``train-reranker``
picks a weight on held-out questions, see :mod:`dpa_rag.reranker.fusion`) sorts by the fused score; ``score`` is then
the fused score and ``reranker_score`` the model's own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch

from dpa_rag.data.loaders import load_retrieval
from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.reranker.config import RerankConfig
from dpa_rag.reranker.fusion import fuse, resolve_alpha, safe_ranks
from dpa_rag.reranker.inference import (
    CPU_BATCH_SIZE,
    GPU_BATCH_SIZE,
    predict_logits,
    record_lists,
    resolve_batch_size,
    resolve_dtype,
    score_pairs,
    split_scores,
)
from dpa_rag.stage import ChunkLog, StageOutputs, resume_state, stage_recorder

__all__ = [
    "CPU_BATCH_SIZE",
    "GPU_BATCH_SIZE",
    "Reranker",
    "predict_logits",
    "resolve_batch_size",
    "resolve_dtype",
    "run",
    "Config",
    "Outputs",
    "RERANKED_FILE",
    "RerankOutputs",
]

logger = logging.getLogger(__name__)


class Reranker:
    """A trained reranker of any kind (:mod:`dpa_rag.reranker.kinds`) for inference.

    Args:
        model_path: a folder written by ``dpa-rag train-reranker`` (``model/``), any ``CrossEncoder``-compatible
            checkpoint (hub id or folder) or a bundled alias.
        device: ``auto`` (cuda, mps, cpu), or a torch device string.
        dtype: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (weights and compute).
        batch_size: pairs per forward (default: 16 on a CPU, 64 elsewhere; see :func:`resolve_batch_size`).
        max_length: truncation length of a pair.
        score: for two-class models: ``prob`` (softmax(z)_1) or ``z1``; default: the one saved with the model
            (``prob`` if none). 1-logit models always score with the raw logit (sigmoid is monotone).
        fusion: how :meth:`rerank` blends in the retriever's rank: ``saved`` (the weight chosen at training, if
            any; none = pure reranker), ``off`` (pure reranker) or a reranker weight in ``[0, 1]`` as a number
            or string (``0`` = retriever order).
        kind: ``auto`` (see :func:`dpa_rag.reranker.kinds.resolve_kind`: a bi-encoder for sentence-transformers
            embedding models and folders saved as bi-encoder rerankers, else a cross-encoder) or a registered kind
            (``cross-encoder``, ``bi-encoder``; :mod:`dpa_rag.reranker.kinds`).

    Example:
        >>> rr = Reranker("runs/reranker/model")
        >>> rr.score("who wrote hamlet", ["Title: Hamlet Content: ...", "Title: Paris Content: ..."])
    """

    def __init__(
        self,
        model_path: str,
        device: str = "auto",
        dtype: str | torch.dtype = "auto",
        batch_size: int | None = None,
        max_length: int = 512,
        score: str | None = None,
        fusion: str | float = "saved",
        kind: str = "auto",
    ) -> None:
        from dpa_rag.models import pick_device
        from dpa_rag.reranker.kinds import get_kind, resolve_kind

        self.device = pick_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.kind = resolve_kind(model_path, kind)
        self.batch_size = resolve_batch_size(batch_size, self.device)
        self.max_length = max_length
        self.model, self.tokenizer, self.score_mode, saved = get_kind(self.kind).load(
            model_path, self.device, self.dtype, max_length, score)
        self.fusion_alpha = resolve_alpha(fusion, saved.get("retriever_fusion"))
        logger.info("reranker %s (%s) on %s (%s), score %s, retriever fusion %s", model_path, self.kind,
                    self.device, self.dtype, self.score_mode,
                    "off" if self.fusion_alpha is None else f"alpha={self.fusion_alpha:g}")

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Scores of ``(query, passage)`` pairs, in input order (a bi-encoder's: the cosine similarity)."""
        return score_pairs(self.model, self.tokenizer, pairs, self.batch_size, self.max_length, self.score_mode)

    def score(self, query: str, docs: Sequence[str]) -> list[float]:
        """Scores of ``docs`` (rendered passages) for ``query``, in input order."""
        return self.score_pairs([(query, d) for d in docs])

    def rerank(self, records: Sequence[RetrievalRecord], top_k: int | None = None) -> list[RetrievalRecord]:
        """Rerank each record's ``ctxs`` (all records' pairs are scored together) and keep the ``top_k`` best."""
        lists = record_lists(records)
        per = split_scores(self.score_pairs([(q, p) for q, passages in lists for p in passages]),
                           [len(passages) for _, passages in lists])
        out = []
        for rec, s in zip(records, per, strict=True):
            n = len(rec.ctxs)
            given = [(c.model_extra or {}).get("retriever_rank", i + 1) for i, c in enumerate(rec.ctxs)]
            key = s if self.fusion_alpha is None else fuse(s, safe_ranks(given), self.fusion_alpha)
            order = sorted(range(n), key=lambda i: -key[i])  # stable: ties keep retriever order
            ctxs = []
            for i in order[: top_k if top_k else n]:
                c = rec.ctxs[i]
                extra = c.model_extra or {}
                update = {
                    "score": float(key[i]),
                    "retriever_score": extra.get("retriever_score", c.score),
                    "retriever_rank": given[i],
                }
                if self.fusion_alpha is not None:
                    update["reranker_score"] = float(s[i])
                ctxs.append(c.model_copy(update=update))
            out.append(rec.model_copy(update={"ctxs": ctxs}))
        return out


RERANKED_FILE = "reranked.jsonl"


@dataclasses.dataclass(frozen=True)
class RerankOutputs(StageOutputs):
    """What ``rerank`` writes: the retrieval records re-sorted by the reranker, cut to ``top_k`` (DPR layout)."""

    FILES: ClassVar[dict[str, str]] = {"reranked": RERANKED_FILE}
    reranked: Path


Config = RerankConfig
Outputs = RerankOutputs


def run(cfg: RerankConfig) -> RerankOutputs:
    """``dpa-rag rerank``: rerank ``cfg.input`` with ``cfg.model`` into ``out_dir/reranked.jsonl``."""
    out_dir = Path(cfg.out_dir)
    rec = stage_recorder("rerank", cfg, out_dir, [cfg.input])
    records = load_retrieval(cfg.input, limit=cfg.limit, dedupe_ids=cfg.dedupe_ids or None)
    reranker = Reranker(cfg.model, cfg.device, cfg.dtype, cfg.batch_size, cfg.max_length, cfg.score, cfg.fusion,
                        kind=cfg.kind)
    out = RerankOutputs.at(out_dir)
    n_pairs = sum(len(r.ctxs) for r in records)
    # finished chunks go to reranked.partial.jsonl: a killed run resumes at its first unfinished chunk
    state = resume_state(cfg, [cfg.input, cfg.model])
    per = cfg.records_per_chunk
    with rec.timer("rerank"), ChunkLog(out_dir, "reranked", state, [r.id for r in records], per) as log:
        for start in range(log.start, len(records), per):
            log.append(reranker.rerank(records[start : start + per], cfg.top_k))
            logger.info("reranked %d/%d questions", min(start + per, len(records)), len(records))
    log.finish(rename_to=out.reranked)
    rec.finish(outputs=list(RerankOutputs.FILES.values()), questions=len(records), pairs=n_pairs)
    return out
