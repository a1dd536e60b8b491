"""The served system: retriever, reranker and readers behind micro-batchers, with async retrieve/rerank/answer.

:func:`load_scorer` is the one place that turns a reranker folder into a scorer (anything with
``score(query, docs)``; ``score_pairs(pairs)`` is used when present so requests with different queries share one
call). Readers are :class:`~dpa_rag.generation.CachedGenerator`\\ s built from generator options; the reader prompt
is the same :class:`~dpa_rag.prompts.PromptTemplate` the ``answer`` stage uses, so a served answer equals the batch
pipeline's answer for the same passages.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dpa_rag.data.schema import Ctx
from dpa_rag.eval.metrics import exact_match, hit, normalize_answer
from dpa_rag.generation import GenerationParams, GeneratorOptions, build_generator
from dpa_rag.prompts import PromptTemplate, clean_answer, load_template
from dpa_rag.reranker.calibration import Calibration, default_calibration, load_calibration
from dpa_rag.retrieval.base import Retriever
from dpa_rag.serve.batching import MicroBatcher
from dpa_rag.serve.config import ServeConfig
from dpa_rag.serve.metrics import Metrics
from dpa_rag.serve.plan import ServePlan
from dpa_rag.serve.usage import TokenCounter

__all__ = ["ALIGNED_MODEL", "BASE_MODEL", "Engine", "Reader", "Scorer", "load_scorer", "public_name",
           "scorer_calibration"]

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


def scorer_calibration(scorer: Any, model_path: str | None) -> Calibration:
    """The relevance mapping of a scorer: the fitted ``calibration.json`` saved with the model when there is one
    (for the score the scorer returns), else :func:`~dpa_rag.reranker.calibration.default_calibration`."""
    mode = str(getattr(scorer, "score_mode", "prob"))
    fitted = load_calibration(model_path) if model_path else None
    if fitted is not None and fitted.score == mode:
        return fitted
    if fitted is not None:
        logger.warning("%s: calibration.json was fitted on %s scores, the reranker scores with %s: not used",
                       model_path, fitted.score, mode)
    model = getattr(scorer, "model", None)
    if mode == "cosine" and model is not None and hasattr(model, "log_scale"):
        return default_calibration(mode, float(model.scale.detach()), float(model.bias.detach()))
    return default_calibration(mode)


def public_name(value: str | None, root: Path | None = None) -> str | None:
    """A model or folder named without the server's filesystem: a path inside the served run folder relative to
    it (``train-llm-sft/merged``), another local path by its last two parts, an alias or hub id as it is."""
    if value is None:
        return None
    p = Path(value)
    if root is not None:
        for base in (root, root.resolve()):
            with contextlib.suppress(ValueError):
                return p.relative_to(base).as_posix()
    if p.is_absolute() or (len(p.parts) > 1 and p.exists()):
        return "/".join(p.parts[-2:])
    return value


@dataclass
class Reader:
    """One served reader: its public model id, its generator options and its micro-batcher."""

    model_id: str
    options: GeneratorOptions
    batcher: MicroBatcher
    aligned: bool
    tokens: TokenCounter | None = None


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
        self.calibration = scorer_calibration(scorer, (plan.reranker or {}).get("model_path"))
        self.run_root: Path | None = getattr(plan.run, "root", None)
        self.questions = self._load_questions()
        self._gold = {normalize_answer(q.question): q.answers for q in self.questions}
        self._samples: list[dict[str, Any]] | None = None

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
            full = Reader(ALIGNED_MODEL, base.options, base.batcher, aligned=False,
                          tokens=base.tokens)  # one model serves both ids
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
        return Reader(model_id, opts, batcher, aligned, tokens=TokenCounter(opts.model))

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
        rerank = rerank and top_k > 0  # closed-book: nothing is retrieved, nothing reranked
        passages = await self.retrieve(question, top_k, rerank) if top_k > 0 else []
        ctxs = [Ctx(id=p["id"], title=p["title"], text=p["text"]) for p in passages]
        prompt = (self.template.render(question, ctxs) if self.plan.chat
                  else self.template.render_text(question, ctxs))
        params = params or reader.options.generation_params()
        (raw,) = await reader.batcher.submit([(prompt, params)])
        answer = clean_answer(raw)
        out: dict[str, Any] = {
            "model": model, "answer": answer, "raw_output": raw, "reranked": rerank,
            "reader": public_name(reader.options.model, self.run_root), "aligned_reader": reader.aligned,
            "passages": passages, "prompt": prompt,
        }
        gold = self.gold(question)
        if gold is not None:
            out["gold"] = {"answers": gold, "exact_match": bool(exact_match(answer, gold)), "hit": bool(hit(answer,
                                                                                                           gold))}
        return out

    def usage(self, model: str, prompt: Any, raw: str) -> dict[str, int] | None:
        """Prompt and completion tokens counted with the reader's tokenizer (``None``: it has none here)."""
        tokens = self.reader(model).tokens
        if tokens is None:
            return None
        n_in, n_out = tokens.prompt(prompt), tokens.completion(raw)
        if n_in is None or n_out is None:
            return None
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    def relevance(self, score: float) -> float:
        """A reranker score as a calibrated relevance in ``[0, 1]`` (see :mod:`dpa_rag.reranker.calibration`)."""
        return self.calibration(score)

    # --- gold answers and sample questions --------------------------------------------------------------------

    def _load_questions(self) -> list[Any]:
        from dpa_rag.data.loaders import load_questions

        path = self.plan.eval_questions
        if path is None:
            return []
        try:
            return load_questions(path, dedupe_ids=True)
        except Exception as exc:  # the page works without gold answers
            logger.warning("%s: cannot read the evaluation questions (%s); no gold answers shown", path, exc)
            return []

    def gold(self, question: str) -> list[str] | None:
        """The gold answers when ``question`` is one of the served run's evaluation questions."""
        return self._gold.get(normalize_answer(question)) or None

    async def samples(self, n: int = 6, scan: int = 40) -> list[dict[str, Any]]:
        """Up to ``n`` evaluation questions whose gold answer is in a passage the retriever finds for them (so the
        served corpus can answer them), with their gold answers; computed once."""
        if self._samples is None:
            picked: list[dict[str, Any]] = []
            pool = self.questions[:scan]
            if pool:
                depth = max(self.plan.candidates, self.plan.top_k)
                hits = await self.search_batcher.submit([(q.question, depth) for q in pool])
                for q, found in zip(pool, hits, strict=True):
                    texts = " ".join(self.passages[i].render() for i, _ in found)
                    if any(hit(texts, [a]) for a in q.answers):
                        picked.append({"question": q.question, "answers": q.answers})
                    if len(picked) >= n:
                        break
            self._samples = picked
        return self._samples

    def info(self, paths: bool = False) -> dict[str, Any]:
        """What is served, for ``/health``: models named without filesystem paths unless ``paths`` (the server's
        own log, or a client that sent the API key)."""
        name = (lambda v: v) if paths else (lambda v: public_name(v, self.run_root))
        model_path = None if self.plan.reranker is None else self.plan.reranker.get("model_path")
        out = {
            "source": self.plan.source,
            "passages": len(self.passages),
            "retriever": self.plan.retriever,
            "reranker": name(model_path),
            "reranker_aligned": self.plan.reranker_aligned,
            "relevance": {"score": self.calibration.score, "calibration": self.calibration.source},
            "readers": {k: {"model": name(r.options.model), "backend": r.options.backend, "aligned": r.aligned}
                        for k, r in self.readers.items()},
            "promotion": self.plan.promotion,
            "top_k": self.plan.top_k,
            "candidates": self.plan.candidates,
            "eval_questions": len(self.questions),
            "batching": {b.name: b.stats() for b in self.batchers},
        }
        if paths:
            out["index"] = str(self.plan.index_dir)
            if self.run_root is not None:
                out["run"] = str(self.run_root)
        return out

    async def aclose(self) -> None:
        for b in self.batchers:
            await b.aclose()
