"""``dpa-rag augment``: one LLM rewrite per strategy for every question (method.md §4).

All prompts of a chunk of questions go through the cached generator in one call (batched by ``batch_size``); each
finished chunk is appended to ``augmented.partial.jsonl``, so a killed run resumes where it stopped (done ids are
skipped) and the generation cache makes even the unfinished chunk cheap. At the end the outputs are written in input
order and the partial file is removed:

* ``augmented.jsonl`` — the authors' format (``instruction`` = original, ``back_instruction`` = rewrites) plus
  ``id``, ``answers``, ``strategies`` (aligned with ``back_instruction``) and ``failures`` (``{strategy: reason}``);
* ``questions_augmented.jsonl`` — one :class:`~dpa_rag.data.schema.Question` per rewrite, ``id`` =
  ``"<original id>::<strategy>"``, answers inherited, ``origin_id`` and ``strategy`` set.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field
from tqdm.auto import tqdm

from dpa_rag.augment.parser import normalize_question, parse_rewrite
from dpa_rag.augment.strategies import DEFAULT_STRATEGIES, load_templates, parse_mode, render_prompt
from dpa_rag.config import StageConfig, config_hash
from dpa_rag.data.loaders import dedupe_ids_field, load_questions
from dpa_rag.data.schema import Question
from dpa_rag.generation import CachedGenerator, GenerationParams, Generator, GeneratorOptions, build_generator
from dpa_rag.io import append_jsonl, read_json, read_resumable_jsonl, write_json, write_jsonl
from dpa_rag.stage import RESULT_NEUTRAL_FIELDS, StageOutputs, hash_inputs, stage_recorder

__all__ = [
    "AUGMENTED",
    "QUESTIONS_AUGMENTED",
    "AugmentConfig",
    "augment_questions",
    "augmented_to_questions",
    "rewrite_id",
    "run",
    "AugmentOutputs",
    "Config",
    "Outputs",
]

logger = logging.getLogger(__name__)

AUGMENTED = "augmented.jsonl"
QUESTIONS_AUGMENTED = "questions_augmented.jsonl"
_PARTIAL = "augmented.partial.jsonl"
_PARTIAL_STATE = "augmented.partial.json"


class AugmentConfig(GeneratorOptions, StageConfig):
    """Configuration of ``dpa-rag augment``."""

    input: Path = Field(description="Questions file (any layout load_questions reads: ours, NQ-open, DPR, FlashRAG…).")
    out_dir: Path = Field(description="Output folder (augmented.jsonl, questions_augmented.jsonl, manifest).")
    strategies: list[str] = Field(
        default_factory=lambda: list(DEFAULT_STRATEGIES),
        description="Rewrite strategies, one rewrite each: rephrasing, complexity, decomposition, constraint, sparql, "
        "or any name with a <name>.txt template in prompt_dir.",
    )
    prompt_dir: Path | None = Field(
        None, description="Folder of <strategy>.txt templates with a {question} placeholder; overrides bundled ones."
    )
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature (method.md §12 #7: ~0.7).")
    max_new_tokens: int = Field(128, ge=1, description="Maximum new tokens per rewrite (SPARQL needs room).")
    seed: int = Field(0, description="Sampling seed (part of the generation cache key).")
    limit: int | None = Field(None, ge=1, description="Only the first N questions.")
    chunk_size: int = Field(256, ge=1, description="Questions per resumable chunk (appended to the partial file).")
    keep_raw: bool = Field(False, description="Also store each raw model output in augmented.jsonl (`raw`).")
    dedupe_ids: bool = dedupe_ids_field()
    progress: bool = Field(True, description="Show progress bars.")


@dataclasses.dataclass(frozen=True)
class AugmentOutputs(StageOutputs):
    """What ``augment`` writes: one record per question with its rewrites, and the rewrites as questions."""

    FILES: ClassVar[dict[str, str]] = {"augmented": AUGMENTED, "questions": QUESTIONS_AUGMENTED}
    augmented: Path
    questions: Path


Config = AugmentConfig
Outputs = AugmentOutputs


def rewrite_id(origin_id: str, strategy: str) -> str:
    """The id of a rewrite: ``"<origin id>::<strategy>"``."""
    return f"{origin_id}::{strategy}"


def augment_questions(
    questions: Sequence[Question],
    generator: CachedGenerator,
    params: GenerationParams,
    templates: dict[str, str],
    keep_raw: bool = False,
) -> list[dict[str, Any]]:
    """Rewrite every question with every strategy in one batched, cached generator call.

    Args:
        questions: the original questions.
        generator: the cached generator (batching and caching happen there).
        params: decoding parameters.
        templates: ``{strategy: template}`` from :func:`~dpa_rag.augment.strategies.load_templates`, in order.
        keep_raw: add ``raw`` (``{strategy: model output}``) to each record.

    Returns:
        One augmentation record per question (format in the module docstring). A rewrite identical (up to case and
        punctuation) to an earlier strategy's rewrite of the same question is a ``duplicate`` failure.
    """
    names = list(templates)
    prompts = [render_prompt(templates[s], q.question) for q in questions for s in names]
    outputs = generator.generate(prompts, params, desc="augment") if prompts else []
    records: list[dict[str, Any]] = []
    for qi, q in enumerate(questions):
        rewrites: list[str] = []
        kept: list[str] = []
        failures: dict[str, str] = {}
        seen: set[str] = set()
        raw: dict[str, str] = {}
        for si, strategy in enumerate(names):
            out = outputs[qi * len(names) + si]
            raw[strategy] = out
            parsed = parse_rewrite(out, q.question, parse_mode(strategy))
            if parsed.text is None:
                failures[strategy] = parsed.failure or "empty"
                continue
            key = normalize_question(parsed.text)
            if key in seen:
                failures[strategy] = "duplicate"
                continue
            seen.add(key)
            rewrites.append(parsed.text)
            kept.append(strategy)
        rec: dict[str, Any] = {
            "id": q.id,
            "instruction": q.question,
            "back_instruction": rewrites,
            "answers": list(q.answers),
            "strategies": kept,
            "failures": failures,
        }
        if keep_raw:
            rec["raw"] = raw
        records.append(rec)
    return records


def augmented_to_questions(records: Iterable[dict[str, Any]]) -> list[Question]:
    """One :class:`Question` per rewrite of each augmentation record (answers inherited from the original)."""
    out: list[Question] = []
    for rec in records:
        strategies = rec.get("strategies") or [f"rewrite{i}" for i in range(len(rec["back_instruction"]))]
        for strategy, text in zip(strategies, rec["back_instruction"], strict=True):
            out.append(
                Question(
                    id=rewrite_id(rec["id"], strategy),
                    question=text,
                    answers=list(rec.get("answers", [])),
                    origin_id=rec["id"],
                    strategy=strategy,
                )
            )
    return out


def _resume_state(cfg: AugmentConfig) -> dict[str, Any]:
    return {
        "config_hash": config_hash(cfg, exclude=RESULT_NEUTRAL_FIELDS | {"chunk_size", "batch_size", "limit"}),
        "inputs": hash_inputs([cfg.input, cfg.prompt_dir]),
    }


def _load_partial(out_dir: Path, state: dict[str, Any]) -> list[dict[str, Any]]:
    partial, state_path = out_dir / _PARTIAL, out_dir / _PARTIAL_STATE
    if partial.exists() and state_path.exists() and read_json(state_path) == state:
        done = read_resumable_jsonl(partial)
        if done:
            logger.info("resuming: %d question(s) already augmented in %s", len(done), partial)
        return done
    if partial.exists():
        logger.warning("%s was written with another config or input; starting over", partial)
        partial.unlink()
    write_json(state_path, state)
    return []


def run(cfg: AugmentConfig, backend: Generator | None = None) -> AugmentOutputs:
    """Run the augment stage.

    Args:
        cfg: the stage configuration.
        backend: a generator to use instead of the one ``cfg`` names (tests, notebooks); still cached.
    """
    out_dir = Path(cfg.out_dir)
    templates = load_templates(cfg.strategies, cfg.prompt_dir)
    questions = load_questions(
        cfg.input, require_answers=False, limit=cfg.limit, dedupe_ids=cfg.dedupe_ids or None
    )
    rec = stage_recorder("augment", cfg, out_dir, inputs=[cfg.input, cfg.prompt_dir])
    done = {r["id"]: r for r in _load_partial(out_dir, _resume_state(cfg))}
    todo = [q for q in questions if q.id not in done]
    generator = build_generator(cfg, backend=backend, progress=cfg.progress)
    params = cfg.generation_params(seed=cfg.seed)
    logger.info(
        "augment: %d question(s) x %d strategies (%d to do) with %s", len(questions), len(templates), len(todo),
        generator.model_id,
    )
    bar = tqdm(total=len(questions), initial=len(questions) - len(todo), desc="augment", unit="q",
               disable=not cfg.progress)
    with rec.timer("generate"), open(out_dir / _PARTIAL, "a", encoding="utf-8") as fh:
        for start in range(0, len(todo), cfg.chunk_size):
            chunk = todo[start : start + cfg.chunk_size]
            for r in augment_questions(chunk, generator, params, templates, keep_raw=cfg.keep_raw):
                append_jsonl(fh, r)
                done[r["id"]] = r
            bar.update(len(chunk))
    bar.close()
    records = [done[q.id] for q in questions]
    out = AugmentOutputs.at(out_dir)
    write_jsonl(out.augmented, records)
    augmented = augmented_to_questions(records)
    write_jsonl(out.questions, augmented)
    (out_dir / _PARTIAL).unlink()
    (out_dir / _PARTIAL_STATE).unlink()
    kept = Counter(s for r in records for s in r["strategies"])
    failed = Counter(f"{s}:{why}" for r in records for s, why in r["failures"].items())
    rec.finish(
        outputs=list(AugmentOutputs.FILES.values()),
        questions=len(records),
        rewrites=len(augmented),
        kept_per_strategy=dict(kept),
        failures=dict(failed),
        cache_hits=generator.hits,
        generated=generator.calls,
    )
    logger.info("augment: %d rewrites for %d questions; failures: %s", len(augmented), len(records), dict(failed))
    return out
