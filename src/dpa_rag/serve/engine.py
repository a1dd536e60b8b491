"""The served system: retriever, reranker and readers behind micro-batchers, with async retrieve/rerank/answer.

:func:`load_scorer` is the one place that turns a reranker folder into a scorer (anything with
``score(query, docs)``; ``score_pairs(pairs)`` is used when present so requests with different queries share one
call). Readers are :class:`~dpa_rag.generation.CachedGenerator`\\ s built from generator options; the reader prompt
is the same :class:`~dpa_rag.prompts.PromptTemplate` the ``answer`` stage uses, so a served answer equals the batch
pipeline's answer for the same passages.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dpa_rag.data.schema import Ctx
from dpa_rag.generation import GenerationParams, GeneratorOptions, build_generator
from dpa_rag.prompts import PromptTemplate, clean_answer, load_template
from dpa_rag.retrieval.base import Retriever
from dpa_rag.serve.batching import MicroBatcher
from dpa_rag.serve.config import ServeConfig
from dpa_rag.serve.metrics import Metrics
from dpa_rag.serve.plan import ServePlan

__all__ = ["ALIGNED_MODEL", "BASE_MODEL", "Engine", "Reader", "Scorer", "load_scorer"]

logger = logging.getLogger(__name__)

ALIGNED_MODEL = "dpa-rag"  # retrieve → aligned reranker → self-aligned reader
BASE_MODEL = "dpa-rag-base"  # retrieve → base reader (vanilla RAG)


class Scorer(Protocol):
    """What the server needs from a reranker."""

    def score(self, query: str, docs: Sequence[str]) -> list[float]: ...


def load_scorer(model_path: str, **options: Any) -> Scorer:
    """The reranker at ``model_path`` (``Reranker`` keyword arguments in ``options``)."""
    from dpa_rag.reranker.rerank import Reranker

    return Reranker(model_path, **options)


def score_pairs(scorer: Scorer, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Scores of ``(query, text)`` pairs in order: one ``score_pairs`` call if the scorer has it, else per query."""
    if hasattr(scorer, "score_pairs"):
        return list(scorer.score_pairs(pairs))  # type: ignore[attr-defined]
    out: list[float] = [0.0] * len(pairs)
    by_query: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(pairs):
        by_query.setdefault(q, []).append(i)
    for q, idx in by_query.items():
        for i, s in zip(idx, scorer.score(q, [pairs[i][1] for i in idx]), strict=True):
            out[i] = float(s)
    return out


def to_unit(score: float, mode: str) -> float:
    """A score in ``[0, 1]``: probabilities as they are, logits through the sigmoid (order is unchanged)."""
    if mode == "prob":
        return score
    return 1.0 / (1.0 + math.exp(-score)) if score >= 0 else math.exp(score) / (1.0 + math.exp(score))


@dataclass
class Reader:
    """One served reader: its public model id, its generator options and its micro-batcher."""

    model_id: str
    options: GeneratorOptions
    batcher: MicroBatcher
    aligned: bool


class Engine:
    """Retrieval, reranking and reading for the HTTP app; model calls run on the batchers' worker threads.

    Args:
        cfg: the server options (batching, limits).
        plan: what to serve (see :func:`dpa_rag.serve.plan.make_plan`).
        retriever: a loaded retriever (default: loaded from ``plan.index_dir``).
        scorer: a loaded reranker (default: :func:`load_scorer` on ``plan.reranker``; ``None`` plan = no reranker).
        generators: loaded backends by model id (``dpa-rag``, ``dpa-rag-base``), e.g. fakes in tests.
        metrics: the registry the batchers record into.
    """

    def __init__(
        self,
        cfg: ServeConfig,
        plan: ServePlan,
        retriever: Retriever | None = None,
        scorer: Scorer | None = None,
        generators: dict[str, Any] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        from dpa_rag.retrieval.index import load_index

        self.cfg = cfg
        self.plan = plan
        self.metrics = metrics or Metrics()
        window = cfg.batch_window_ms / 1000.0
        if retriever is None:
            retriever = load_index(plan.index_dir).retriever(plan.retriever, device=cfg.device or "auto")
        self.retriever = retriever
        self.passages = retriever.passages
        if scorer is None and plan.reranker is not None:
            scorer = load_scorer(**plan.reranker)
        self.scorer = scorer
        self.score_mode = str(getattr(scorer, "score_mode", "prob"))
        self.fusion_alpha: float | None = getattr(scorer, "fusion_alpha", None)

        def batcher(name: str, fn: Any, max_batch: int) -> MicroBatcher:
            return MicroBatcher(name, fn, max_batch=max_batch, window_s=window, max_queue=cfg.max_queue,
                                enabled=cfg.micro_batching, metrics=self.metrics)

        self.search_batcher = batcher("retriever", self._search, 64)
        self.rerank_batcher = (
            batcher("reranker", lambda pairs: score_pairs(self.scorer, pairs), cfg.max_batch_pairs)
            if scorer is not None else None
        )
        self.template: PromptTemplate = load_template(plan.template)
        generators = generators or {}
        base = self._reader(BASE_MODEL, plan.base_reader, generators.get(BASE_MODEL), aligned=False)
        if plan.aligned_reader is None and ALIGNED_MODEL not in generators:
            full = Reader(ALIGNED_MODEL, base.options, base.batcher, aligned=False)  # one model serves both ids
        else:
            full = self._reader(ALIGNED_MODEL, plan.aligned_reader or plan.base_reader, generators.get(ALIGNED_MODEL),
                                aligned=plan.aligned_reader is not None)
        self.readers = {ALIGNED_MODEL: full, BASE_MODEL: base}

    def _reader(self, model_id: str, opts: GeneratorOptions, backend: Any, aligned: bool) -> Reader:
        gen = build_generator(opts, backend=backend, progress=False)

        def generate(items: list[tuple[Any, GenerationParams]]) -> list[str]:
            out: list[str] = [""] * len(items)
            groups: dict[GenerationParams, list[int]] = {}
            for i, (_, params) in enumerate(items):
                groups.setdefault(params, []).append(i)
            for params, idx in groups.items():  # one backend call per distinct decoding setting
                for i, text in zip(idx, gen.generate([items[i][0] for i in idx], params), strict=True):
                    out[i] = text
            return out

        batcher = MicroBatcher(
            f"reader:{model_id}", generate, max_batch=self.cfg.max_batch_prompts,
            window_s=self.cfg.batch_window_ms / 1000.0, max_queue=self.cfg.max_queue,
            enabled=self.cfg.micro_batching, metrics=self.metrics,
        )
        return Reader(model_id, opts, batcher, aligned)

    def _search(self, items: list[tuple[str, int]]) -> list[list[tuple[int, float]]]:
        depth = max(k for _, k in items)
        hits = self.retriever.search([q for q, _ in items], depth)
        return [h[:k] for h, (_, k) in zip(hits, items, strict=True)]

    @property
    def batchers(self) -> list[MicroBatcher]:
        out = [self.search_batcher, *([self.rerank_batcher] if self.rerank_batcher else [])]
        for r in self.readers.values():
            if r.batcher not in out:
                out.append(r.batcher)
        return out

    async def rerank(self, query: str, texts: Sequence[str]) -> list[float]:
        """The reranker's score of each text for ``query``, in input order."""
        if self.rerank_batcher is None:
            raise LookupError("this server has no reranker (started with --reranker none)")
        return await self.rerank_batcher.submit([(query, t) for t in texts])

    async def retrieve(self, query: str, top_k: int, rerank: bool, candidates: int | None = None) -> list[dict]:
        """The ``top_k`` passages for ``query``: the retriever's, or the reranker's order over ``candidates``.

        Each passage: ``rank``, ``id``, ``title``, ``text``, ``score`` (what it is sorted by), ``retriever_score``,
        ``retriever_rank``; reranked passages also carry ``reranker_score`` (equal to ``score`` unless the
        reranker was trained with retriever fusion).
        """
        if rerank and self.rerank_batcher is None:
            raise LookupError("this server has no reranker (started with --reranker none)")
        depth = max(candidates or self.plan.candidates, top_k) if rerank else top_k
        hits = (await self.search_batcher.submit([(query, depth)]))[0]
        rows = [
            {"id": self.passages[i].id, "title": self.passages[i].title, "text": self.passages[i].text,
             "retriever_score": round(float(s), 6), "retriever_rank": r}
            for r, (i, s) in enumerate(hits, start=1)
        ]
        if not rerank:
            for row in rows:
                row["score"] = row["retriever_score"]
            return [{"rank": i, **row} for i, row in enumerate(rows[:top_k], start=1)]
        from dpa_rag.reranker.fusion import fuse

        rendered = [self.passages[i].render() for i, _ in hits]
        scores = await self.rerank(query, rendered) if rows else []
        key = scores if self.fusion_alpha is None else fuse(scores, [r["retriever_rank"] for r in rows],
                                                             self.fusion_alpha)
        order = sorted(range(len(rows)), key=lambda j: -key[j])  # stable: ties keep the retriever order
        out = []
        for rank, j in enumerate(order[:top_k], start=1):
            out.append({"rank": rank, **rows[j], "score": float(key[j]), "reranker_score": float(scores[j])})
        return out

    def reader(self, model: str) -> Reader:
        """The reader serving ``model`` (``KeyError`` for an unknown id)."""
        return self.readers[model]

    async def answer(
        self,
        question: str,
        model: str = ALIGNED_MODEL,
        top_k: int | None = None,
        rerank: bool | None = None,
        params: GenerationParams | None = None,
    ) -> dict[str, Any]:
        """Retrieve (and, for ``dpa-rag``, rerank) then read: ``answer``, ``raw_output``, ``passages``, …"""
        reader = self.reader(model)
        top_k = self.plan.top_k if top_k is None else top_k
        if rerank is None:
            rerank = model == ALIGNED_MODEL and self.rerank_batcher is not None
        passages = await self.retrieve(question, top_k, rerank) if top_k > 0 else []
        ctxs = [Ctx(id=p["id"], title=p["title"], text=p["text"]) for p in passages]
        prompt = (self.template.render(question, ctxs) if self.plan.chat
                  else self.template.render_text(question, ctxs))
        params = params or reader.options.generation_params()
        (raw,) = await reader.batcher.submit([(prompt, params)])
        return {
            "model": model, "answer": clean_answer(raw), "raw_output": raw, "reranked": rerank,
            "reader": reader.options.model, "aligned_reader": reader.aligned, "passages": passages,
        }

    def info(self) -> dict[str, Any]:
        """What is served, for ``/health``."""
        return {
            "source": self.plan.source,
            "index": str(self.plan.index_dir),
            "passages": len(self.passages),
            "retriever": self.plan.retriever,
            "reranker": None if self.plan.reranker is None else self.plan.reranker.get("model_path"),
            "reranker_aligned": self.plan.reranker_aligned,
            "readers": {k: {"model": r.options.model, "backend": r.options.backend, "aligned": r.aligned}
                        for k, r in self.readers.items()},
            "top_k": self.plan.top_k,
            "candidates": self.plan.candidates,
            "batching": {b.name: b.stats() for b in self.batchers},
        }

    async def aclose(self) -> None:
        for b in self.batchers:
            await b.aclose()
