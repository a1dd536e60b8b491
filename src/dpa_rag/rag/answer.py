"""The reader stage: answer each question from its top-k passages (baseline RAG, method.md §8), or closed-book.

* :func:`answer_records` — the core: records → prompts → generator (cached) → prediction dicts.
* :func:`run` — the ``dpa-rag answer`` stage: load a retrieval (or questions) file, optionally rerank, answer,
  write ``predictions.jsonl`` and ``metrics.json``.

Prediction record: ``{"id", "question", "answers", "prediction", "raw_output", "ctx_ids", "ctx_has_answer",
"scores": {"hit", "hit_word", "em", "f1"}}`` (+ ``category`` when the input has one). ``scores`` is ``null`` for
questions without gold answers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator

from dpa_rag.config import StageConfig
from dpa_rag.data.loaders import dedupe_ids_field, load_questions, load_retrieval
from dpa_rag.data.schema import RetrievalRecord
from dpa_rag.eval.evaluate import evaluate_predictions
from dpa_rag.eval.metrics import passage_has_answer, score_answer
from dpa_rag.generation import CachedGenerator, GenerationParams, Generator, GeneratorOptions, build_generator
from dpa_rag.io import write_json, write_jsonl
from dpa_rag.prompts import DEFAULT_TEMPLATE, PromptTemplate, clean_answer, load_template
from dpa_rag.stage import StageOutputs, stage_recorder

__all__ = [
    "METRICS_FILE", "PREDICTIONS_FILE", "AnswerConfig", "AnswerOutputs", "Config", "Outputs", "answer_records",
    "build_prompts", "run",
]

logger = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"


class AnswerConfig(GeneratorOptions, StageConfig):
    """Options of ``dpa-rag answer`` (plus the generator options)."""

    result_neutral: ClassVar[frozenset[str]] = GeneratorOptions.result_neutral | {"reranker_batch_size"}

    retrieval: Path | None = Field(
        None, description="DPR-style retrieval file (question, answers, ctxs), any layout load_retrieval reads."
    )
    questions: Path | None = Field(None, description="Questions file for closed-book answering (no retrieval).")
    top_k: int = Field(3, ge=0, description="Passages shown to the reader (method: 3; 2 for WebQSP); 0 = closed-book.")
    reranker: Path | None = Field(None, description="Reranker model folder: rerank the candidates, then keep top-k.")
    rerank_depth: int = Field(100, ge=1, description="Retrieved candidates the reranker scores per question.")
    reranker_batch_size: int | None = Field(
        None, ge=1, description="Reranker pairs per forward (default: 16 on CPU, 64 on GPUs)."
    )
    reranker_max_length: int = Field(512, ge=8, description="Reranker max tokens per (question, passage) pair.")
    reranker_fusion: str = Field(
        "saved",
        description="Blend in the retriever rank: saved (weight chosen at training), off, or a reranker weight 0-1.",
    )
    template: str = Field(DEFAULT_TEMPLATE, description="Prompt template: qa, dpa, plain, or a YAML file path.")
    chat: bool = Field(True, description="Send chat messages (model's chat template); --no-chat: plain text.")
    limit: int | None = Field(None, ge=1, description="Answer only the first N questions.")
    dedupe_ids: bool = dedupe_ids_field()
    out_dir: Path = Field(description="Folder for predictions.jsonl, metrics.json, config.yaml and manifest.json.")
    progress: bool = Field(True, description="Show a progress bar.")

    @model_validator(mode="after")
    def _check_inputs(self) -> AnswerConfig:
        if self.retrieval is None and self.questions is None:
            raise ValueError("give a retrieval file (--retrieval) or, for closed-book answering, --questions")
        if self.retrieval is not None and self.questions is not None:
            raise ValueError("give either --retrieval or --questions, not both")
        return self

    @field_validator("reranker_fusion", mode="before")
    @classmethod
    def _check_fusion(cls, v: object) -> str:
        from dpa_rag.reranker.fusion import normalize_fusion

        return normalize_fusion(v)  # YAML reads `off` as False and `0.3` as a float


@dataclasses.dataclass(frozen=True)
class AnswerOutputs(StageOutputs):
    """What ``answer`` writes: one prediction per question (answer, golds, passages shown) and the scores."""

    FILES: ClassVar[dict[str, str]] = {"predictions": PREDICTIONS_FILE, "metrics": METRICS_FILE}
    predictions: Path
    metrics: Path


Config = AnswerConfig
Outputs = AnswerOutputs


def build_prompts(
    records: Sequence[RetrievalRecord], template: PromptTemplate, top_k: int, chat: bool = True
) -> list[str | list[dict[str, str]]]:
    """One prompt per record from its first ``top_k`` passages (closed-book when ``top_k`` is 0 or none are left)."""
    prompts: list[str | list[dict[str, str]]] = []
    for rec in records:
        ctxs = rec.ctxs[:top_k] if top_k > 0 else []
        prompts.append(template.render(rec.question, ctxs) if chat else template.render_text(rec.question, ctxs))
    return prompts


def answer_records(
    records: Sequence[RetrievalRecord],
    generator: CachedGenerator | Generator,
    template: PromptTemplate,
    top_k: int,
    params: GenerationParams,
    chat: bool = True,
    desc: str = "answer",
) -> list[dict[str, Any]]:
    """Answer each record from its first ``top_k`` passages and score the answers.

    Args:
        records: questions with ranked passages (already reranked if wanted); passages beyond ``top_k`` are ignored.
        generator: a :class:`~dpa_rag.generation.CachedGenerator` (cache, batching, progress) or a bare backend.
        template: the reader prompt.
        top_k: passages per prompt; 0 = closed-book.
        params: decoding parameters.
        chat: chat messages (default) or plain text prompts.
        desc: progress bar label.

    Returns:
        One prediction dict per record, in order (layout in the module docstring).
    """
    prompts = build_prompts(records, template, top_k, chat)
    if isinstance(generator, CachedGenerator):
        raw = generator.generate(prompts, params, desc=desc)
    else:
        raw = generator.generate(prompts, params)
    out = []
    if len(raw) != len(records):
        raise RuntimeError(f"generator returned {len(raw)} outputs for {len(records)} prompts")
    for rec, output in zip(records, raw, strict=True):
        ctxs = rec.ctxs[:top_k] if top_k > 0 else []
        pred = clean_answer(output)
        item: dict[str, Any] = {
            "id": rec.id,
            "question": rec.question,
            "answers": list(rec.answers),
            "prediction": pred,
            "raw_output": output,
            "ctx_ids": [c.id for c in ctxs],
            "ctx_has_answer": [passage_has_answer(c, rec.answers) for c in ctxs],
            "scores": score_answer(pred, rec.answers) if rec.answers else None,
        }
        category = (rec.model_extra or {}).get("category")
        if category is not None:
            item["category"] = category
        out.append(item)
    return out


def _load_records(cfg: AnswerConfig) -> list[RetrievalRecord]:
    if cfg.retrieval is not None:
        return load_retrieval(cfg.retrieval, limit=cfg.limit, dedupe_ids=cfg.dedupe_ids or None)
    assert cfg.questions is not None
    questions = load_questions(cfg.questions, require_answers=False, limit=cfg.limit,
                               dedupe_ids=cfg.dedupe_ids or None)
    return [RetrievalRecord(**q.model_dump(exclude_none=True), ctxs=[]) for q in questions]


def _rerank(cfg: AnswerConfig, records: list[RetrievalRecord]) -> list[RetrievalRecord]:
    from dpa_rag.reranker.rerank import Reranker

    reranker = Reranker(
        str(cfg.reranker),
        device=cfg.device,
        dtype=cfg.dtype,
        batch_size=cfg.reranker_batch_size,
        max_length=cfg.reranker_max_length,
        fusion=cfg.reranker_fusion,
    )
    candidates = [r.model_copy(update={"ctxs": r.ctxs[: cfg.rerank_depth]}) for r in records]
    return list(reranker.rerank(candidates, top_k=cfg.top_k))


def run(cfg: AnswerConfig, backend: Generator | None = None) -> AnswerOutputs:
    """Run the answer stage.

    Args:
        cfg: the stage configuration.
        backend: use this generation backend instead of building ``cfg.backend`` (tests, the pipeline); it still
            goes through the on-disk cache when ``cfg.use_cache``.
    """
    out_dir = Path(cfg.out_dir)
    template = load_template(cfg.template)
    template_file = Path(cfg.template) if Path(cfg.template).suffix in (".yaml", ".yml") else None
    records = _load_records(cfg)
    rec = stage_recorder("answer", cfg, out_dir, [cfg.retrieval, cfg.questions, cfg.reranker, template_file])
    if cfg.questions is not None and cfg.top_k > 0:
        logger.info("no retrieval file: answering closed-book")
    if cfg.reranker is not None and cfg.top_k > 0 and cfg.retrieval is not None:
        with rec.timer("rerank"):
            records = _rerank(cfg, records)
    generator = build_generator(cfg, backend=backend, progress=cfg.progress)
    with rec.timer("generate"):
        predictions = answer_records(
            records, generator, template, cfg.top_k, cfg.generation_params(), chat=cfg.chat, desc="answer"
        )
    out = AnswerOutputs.at(out_dir)
    write_jsonl(out.predictions, predictions)
    metrics = evaluate_predictions(predictions)
    write_json(out.metrics, metrics)
    logger.info(
        "answer: %d questions, Hits@1 %.2f, EM %.2f, F1 %.2f (%d generated, %d from cache)",
        len(predictions),
        metrics["hits@1"],
        metrics["em"],
        metrics["f1"],
        generator.calls,
        generator.hits,
    )
    rec.finish(
        outputs=list(AnswerOutputs.FILES.values()),
        questions=len(predictions),
        generated=generator.calls,
        cache_hits=generator.hits,
        template=template.name,
    )
    return out
