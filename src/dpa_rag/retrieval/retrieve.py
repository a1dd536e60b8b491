"""The ``retrieve`` stage: rank an index's passages for every question; write DPR-style records and metrics.

Output ``retrieval.jsonl``: ``{"id", "question", "answers", "ctxs": [{"id", "title", "text", "score",
"has_answer"}]}``, ctxs best first (ties by passage order in the index). ``has_answer`` is DPR's whole-word answer
match on the passage text (:func:`dpa_rag.eval.metrics.has_answer`). ``retrieval_metrics.json`` has answer hit@k and
MRR over the questions that have gold answers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from dpa_rag.config import Runtime, StageConfig
from dpa_rag.data.loaders import dedupe_ids_field, load_questions
from dpa_rag.data.schema import Ctx, Passage, Question, RetrievalRecord
from dpa_rag.eval.metrics import normalize_answer
from dpa_rag.eval.ranking import ranking_metrics
from dpa_rag.io import write_json, write_jsonl
from dpa_rag.retrieval.base import Hit, Retriever
from dpa_rag.retrieval.index import load_index
from dpa_rag.stage import StageOutputs, stage_recorder

__all__ = [
    "METRICS_FILE",
    "RETRIEVAL_FILE",
    "AnswerMatcher",
    "Config",
    "Outputs",
    "RetrieveConfig",
    "RetrieveOutputs",
    "retrieval_metrics",
    "retrieve_questions",
    "run",
]

logger = logging.getLogger(__name__)

RETRIEVAL_FILE = "retrieval.jsonl"
METRICS_FILE = "retrieval_metrics.json"
HIT_KS = (1, 3, 5, 10, 20, 50, 100)


class RetrieveConfig(Runtime, StageConfig):
    """Configuration of ``dpa-rag retrieve``."""

    index_dir: Path = Field(description="Index folder written by `dpa-rag index`.")
    questions: Path = Field(
        description="Questions file: ours/DPR (answers), NQ-open (answer), FlashRAG (golden_answers), authors' files."
    )
    out_dir: Path = Field(Path("runs/retrieve"), description="Folder for retrieval.jsonl and retrieval_metrics.json.")
    method: Literal["bm25", "dense", "hybrid"] = Field("bm25", description="Retriever; hybrid = RRF of bm25 + dense.")
    top_k: int = Field(100, ge=1, description="Passages kept per question.")
    rrf_k: int = Field(60, ge=0, description="Reciprocal-rank-fusion constant (hybrid).")
    fusion_depth: int = Field(100, ge=1, description="Candidates each side contributes to the fusion (hybrid).")
    batch_size: int = Field(64, ge=1, description="Questions per search batch (and query encoding batch; the query "
                            "encoder's --device and --dtype: auto = the dtype the passages were encoded with).")
    ef_search: int = Field(128, ge=1, description="HNSW search depth (hnsw indexes only).")
    query_encoder: str | None = Field(
        None, description="Dense query encoder instead of the one recorded in the index (default: the recorded one)."
    )
    limit: int | None = Field(None, ge=1, description="Only the first N questions.")
    dedupe_ids: bool = dedupe_ids_field()
    progress: bool = Field(True, description="Show progress bars.")


@dataclasses.dataclass(frozen=True)
class RetrieveOutputs(StageOutputs):
    """What ``retrieve`` writes: DPR-style records and their answer hit@k / MRR."""

    FILES: ClassVar[dict[str, str]] = {"retrieval": RETRIEVAL_FILE, "metrics": METRICS_FILE}
    retrieval: Path
    metrics: Path


Config = RetrieveConfig
Outputs = RetrieveOutputs


class AnswerMatcher:
    """DPR ``has_answer`` (whole normalised tokens, as :func:`dpa_rag.eval.metrics.has_answer`), with each passage
    normalised once however many questions retrieve it."""

    def __init__(self, passages: Sequence[Passage]) -> None:
        self.passages = passages
        self._norm: dict[int, str] = {}

    def __call__(self, passage_idx: int, golds: Sequence[str]) -> bool:
        text = self._norm.get(passage_idx)
        if text is None:
            text = self._norm[passage_idx] = f" {normalize_answer(self.passages[passage_idx].text)} "
        return any(g and f" {g} " in text for g in golds)


def retrieve_questions(
    retriever: Retriever,
    questions: Sequence[Question],
    top_k: int,
    batch_size: int = 64,
    progress: bool = True,
) -> list[RetrievalRecord]:
    """Search for every question and build DPR-style records (ctxs best first, with ``has_answer``)."""
    from tqdm.auto import tqdm

    passages = retriever.passages
    match = AnswerMatcher(passages)
    out: list[RetrievalRecord] = []
    with tqdm(total=len(questions), desc="retrieve", unit="q", disable=not progress) as bar:
        for start in range(0, len(questions), batch_size):
            batch = questions[start : start + batch_size]
            results: list[list[Hit]] = retriever.search([q.question for q in batch], top_k)
            for q, hits in zip(batch, results, strict=True):
                golds = [normalize_answer(a) for a in q.answers]
                ctxs = [
                    Ctx(
                        id=passages[i].id, title=passages[i].title, text=passages[i].text,
                        score=round(float(s), 6), has_answer=match(i, golds),
                    )
                    for i, s in hits
                ]
                extra = {"category": q.model_extra["category"]} if "category" in (q.model_extra or {}) else {}
                out.append(RetrievalRecord(id=q.id, question=q.question, answers=q.answers, ctxs=ctxs,
                                           origin_id=q.origin_id, **extra))
            bar.update(len(batch))
    return out


def retrieval_metrics(records: Sequence[RetrievalRecord], top_k: int | None = None) -> dict[str, Any]:
    """Answer ``hit@k`` (k in 1, 3, 5, 10, 20, 50, 100 up to ``top_k``) and ``mrr``, over questions with gold answers
    (:func:`dpa_rag.eval.ranking.ranking_metrics`, the key scheme of every ranking metric).

    Args:
        records: retrieval records whose ctxs carry ``has_answer``.
        top_k: largest k to report (default: the longest ctxs list).
    """
    scored = [r for r in records if r.answers]
    depth = top_k if top_k is not None else max((len(r.ctxs) for r in records), default=0)
    ks = [k for k in HIT_KS if k <= depth]
    if depth and depth not in ks and depth < HIT_KS[-1]:
        ks.append(depth)
    ranked = ranking_metrics([[bool(c.has_answer) for c in r.ctxs] for r in scored], ks=ks)
    # n_questions counts every record here; the means are over the n_with_answers ones
    metrics: dict[str, Any] = {"n_questions": len(records), "n_with_answers": len(scored)}
    metrics.update({f"hit@{k}": ranked[f"hit@{k}"] for k in ks})
    metrics["mrr"] = ranked["mrr"]
    return metrics


def run(cfg: RetrieveConfig) -> RetrieveOutputs:
    """Stage entry point: write ``retrieval.jsonl`` and ``retrieval_metrics.json``."""
    rec = stage_recorder("retrieve", cfg, cfg.out_dir, [cfg.questions, cfg.index_dir])
    with rec.timer("load"):
        questions = load_questions(
            cfg.questions, require_answers=False, limit=cfg.limit, dedupe_ids=cfg.dedupe_ids or None
        )
        index = load_index(cfg.index_dir)
        retriever = index.retriever(
            cfg.method, rrf_k=cfg.rrf_k, fusion_depth=cfg.fusion_depth,
            device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size, ef_search=cfg.ef_search,
            query_encoder=cfg.query_encoder,
        )
    with rec.timer("search"):
        records = retrieve_questions(retriever, questions, cfg.top_k, cfg.batch_size, cfg.progress)
    out = RetrieveOutputs.at(cfg.out_dir)
    write_jsonl(out.retrieval, records)
    metrics = {"method": cfg.method, "top_k": cfg.top_k, **retrieval_metrics(records, cfg.top_k)}
    write_json(out.metrics, metrics)
    logger.info(
        "retrieve (%s): %s",
        cfg.method,
        ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "method"),
    )
    rec.finish(outputs=[RETRIEVAL_FILE, METRICS_FILE], questions=len(records), passages=len(index.passages), **{
        k: v for k, v in metrics.items() if k.startswith("hit@") or k == "mrr"
    })
    return out
