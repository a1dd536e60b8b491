"""Decide what to serve: the index, the retriever, the reranker and the two readers.

A pipeline run folder (``dpa-rag run`` / ``dpa-rag demo``) is read through
:class:`~dpa_rag.pipeline.run_folder.RunFolder` (paths inside it follow the folder wherever it now is): ``index/``
(the index), ``train-reranker/model`` (the aligned reranker; reranking options from ``rerank-eval/config.yaml``),
``answer-<retriever>/config.yaml`` (the base reader's generator options) and ``answer-full/config.yaml`` or
``answer-aligned-reader/config.yaml`` (the self-aligned reader). A step counts only when its ``manifest.json`` says
``complete``. Explicit options win over the run; without either, the bundled defaults are served.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpa_rag.config import ConfigError
from dpa_rag.generation import GeneratorOptions
from dpa_rag.models import DEFAULT_ENCODER, DEFAULT_READER
from dpa_rag.retrieval.index import INDEX_INFO
from dpa_rag.serve.config import ServeConfig

__all__ = ["ServePlan", "make_plan", "sample_index"]

logger = logging.getLogger(__name__)

DEFAULT_RERANKER = DEFAULT_ENCODER


@dataclass
class ServePlan:
    """The resolved parts of a server.

    Attributes:
        index_dir: the index folder.
        retriever: ``bm25``, ``dense`` or ``hybrid``.
        reranker: ``Reranker`` keyword arguments (``model_path``, ``max_length``, …), or ``None``.
        reranker_aligned: the reranker was trained by the run (not a bundled/base model).
        base_reader: generator options of the base reader (model ``dpa-rag-base``).
        aligned_reader: generator options of the self-aligned reader (model ``dpa-rag``); ``None`` = the base one.
        template: reader prompt template name or file; ``chat``: chat messages or plain text.
        top_k: passages shown to the reader; ``candidates``: retrieved candidates the reranker scores.
        source: where the parts came from (for ``/health`` and the log; no filesystem path).
        eval_questions: the run's held-out questions with gold answers (the page shows the gold answer).
        run: the :class:`~dpa_rag.pipeline.run_folder.RunFolder` served, if any.
        promotion: the run's promotion-gate decisions per component (``promoted``, ``reason``); a component that
            was not promoted is not served (the base reader / no reranker instead).
    """

    index_dir: Path
    retriever: str = "bm25"
    reranker: dict[str, Any] | None = None
    reranker_aligned: bool = False
    base_reader: GeneratorOptions = field(default_factory=lambda: GeneratorOptions(model=DEFAULT_READER))
    aligned_reader: GeneratorOptions | None = None
    template: str = "qa"
    chat: bool = True
    top_k: int = 3
    candidates: int = 20
    source: str = "bundled defaults"
    eval_questions: Path | None = None
    run: Any = None
    promotion: dict[str, dict[str, Any]] = field(default_factory=dict)


def _generator_options(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k in GeneratorOptions.model_fields}


def sample_index(cache_dir: Path | None = None) -> Path:
    """A BM25 index of the bundled sample corpus, built once under the cache folder."""
    from dpa_rag.generation.cache import default_cache_dir
    from dpa_rag.retrieval.index import INDEX_INFO, IndexConfig, build_index
    from dpa_rag.sample import sample_path

    out = (cache_dir or default_cache_dir()) / "serve-sample-index"
    if not (out / INDEX_INFO).exists():
        logger.info("indexing the bundled sample corpus (BM25) into %s (once)", out)
        build_index(IndexConfig(corpus=[sample_path("corpus.jsonl")], out_dir=out, kind="bm25", progress=False))
    return out


def _from_run(root: Path) -> dict[str, Any]:
    """The parts a finished pipeline run provides (keys of :class:`ServePlan`), read through
    :class:`~dpa_rag.pipeline.run_folder.RunFolder` (paths inside the run follow the folder wherever it now is)."""
    from dpa_rag.pipeline.run_folder import RunFolder

    run = RunFolder.open(root)
    pipe = run.config
    out: dict[str, Any] = {"source": f"run {root.name}", "run": run}
    index_dir = run.index_dir() if "index" in run.steps() else None
    if index_dir is None:
        raise ConfigError(f"{root / 'index'}: the index step has not finished (no complete manifest.json)")
    out["index_dir"] = index_dir
    out["retriever"] = pipe.retriever
    out["top_k"] = pipe.top_k
    out["candidates"] = pipe.retrieve_top_k
    base = run.answer_config("retriever")
    reader_opts = {"cache_dir": str(run.cache_dir), **run.values(pipe.generator("reader") or {})}
    if base is not None:
        reader_opts = _generator_options(base)
        out["template"] = base.get("template", "qa")
        out["chat"] = bool(base.get("chat", True))
    out["base_reader"] = GeneratorOptions.model_validate(reader_opts)
    decisions = run.promotion()
    out["promotion"] = {k: {"promoted": bool(d.get("promoted")), "reason": str(d.get("reason", ""))}
                        for k, d in decisions.items()}
    model_dir = run.reranker_model() if pipe.reranker else None
    if model_dir is not None and not decisions.get("reranker", {}).get("promoted", True):
        logger.warning("%s: the aligned reranker was not promoted (%s); serving the retriever's order", root,
                       decisions["reranker"].get("reason"))
        out["reranker"] = None
    elif model_dir is not None:
        rerank_cfg = run.rerank_options()
        out["reranker"] = {
            "model_path": str(model_dir),
            **{k: rerank_cfg[k] for k in ("max_length", "batch_size", "score", "fusion") if rerank_cfg.get(k)},
        }
        out["reranker_aligned"] = True
    else:
        logger.warning("%s: no finished aligned reranker; serving without a reranker", root)
        out["reranker"] = None
    aligned = run.answer_config("full") or run.answer_config("aligned_reader")
    sft = run.sft_model() if pipe.train_llm else None
    if not decisions.get("reader", {}).get("promoted", True):
        logger.warning("%s: the self-aligned reader was not promoted (%s); model dpa-rag uses the base reader", root,
                       decisions["reader"].get("reason"))
    elif aligned is not None:
        out["aligned_reader"] = GeneratorOptions.model_validate(_generator_options(aligned))
    elif sft is not None:
        out["aligned_reader"] = GeneratorOptions.model_validate({**reader_opts, "model": str(sft)})
    else:
        logger.warning("%s: no finished self-aligned reader; model dpa-rag uses the base reader", root)
    out["eval_questions"] = run.eval_questions()
    return out


def make_plan(cfg: ServeConfig) -> ServePlan:
    """Resolve ``cfg`` into the parts to load (nothing is loaded here except the sample index, built once)."""
    parts: dict[str, Any] = _from_run(Path(cfg.run)) if cfg.run is not None else {}
    if cfg.index is not None:
        parts["index_dir"] = Path(cfg.index)
    if "index_dir" not in parts:
        parts["index_dir"] = sample_index(cfg.cache_dir)
    explicit = cfg.run is None and (cfg.index is not None or cfg.reranker is not None or cfg.reader is not None)
    if cfg.run is None:
        parts["source"] = "explicit options" if explicit else "bundled defaults"
        parts["reranker"] = {"model_path": DEFAULT_RERANKER}
    if cfg.retriever is not None:
        parts["retriever"] = cfg.retriever
    if cfg.reranker is not None:
        parts["reranker"] = None if cfg.reranker.lower() == "none" else {"model_path": cfg.reranker}
        parts["reranker_aligned"] = False
    if parts.get("reranker") is not None:
        extra = {"max_length": cfg.reranker_max_length, "batch_size": cfg.reranker_batch_size, "device": cfg.device,
                 "dtype": cfg.dtype}
        parts["reranker"] = {**parts["reranker"], **{k: v for k, v in extra.items() if v is not None}}
    override: dict[str, Any] = {"use_cache": cfg.use_cache}
    for key in ("backend", "base_url", "device", "dtype", "max_new_tokens", "cache_dir"):
        if getattr(cfg, key) is not None:
            override[key] = getattr(cfg, key)
    base = parts.get("base_reader") or GeneratorOptions(model=DEFAULT_READER)
    if cfg.base_reader is not None:
        base = base.model_copy(update={"model": cfg.base_reader})
    parts["base_reader"] = GeneratorOptions.model_validate({**base.model_dump(), **override})
    aligned = parts.get("aligned_reader")
    if cfg.reader is not None:
        aligned = (aligned or parts["base_reader"]).model_copy(update={"model": cfg.reader})
    if aligned is not None:
        aligned = GeneratorOptions.model_validate({**aligned.model_dump(), **override})
        if aligned == parts["base_reader"]:
            aligned = None
    parts["aligned_reader"] = aligned
    for key in ("top_k", "candidates"):
        if getattr(cfg, key) is not None:
            parts[key] = getattr(cfg, key)
    if cfg.questions is not None:
        parts["eval_questions"] = Path(cfg.questions)
    elif parts["source"] == "bundled defaults":
        from dpa_rag.sample import sample_path

        parts["eval_questions"] = sample_path("questions.jsonl")
    parts["candidates"] = max(parts.get("candidates", 20), parts.get("top_k", 3))
    plan = ServePlan(**parts)
    if not (plan.index_dir / INDEX_INFO).exists():
        raise FileNotFoundError(f"{plan.index_dir}: not an index folder ({INDEX_INFO} missing; build it with "
                                "`dpa-rag index`)")
    return plan
