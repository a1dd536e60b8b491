"""Split questions into a training pool (mining, reranker and LLM training) and a held-out evaluation set.

The split is by question id with a seeded shuffle; with an explicit evaluation file, questions that also appear in it
(same normalised text) are removed from the training pool, so nothing the system is scored on is ever trained on.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from dpa_rag.config import StageConfig
from dpa_rag.data.loaders import dedupe_ids_field, load_questions
from dpa_rag.data.schema import Question
from dpa_rag.eval.metrics import normalize_answer
from dpa_rag.io import write_json, write_jsonl
from dpa_rag.stage import StageOutputs, stage_recorder

__all__ = [
    "EVAL_QUESTIONS", "SPLIT_INFO", "TRAIN_QUESTIONS", "Config", "Outputs", "SplitConfig", "SplitOutputs", "run",
]

TRAIN_QUESTIONS = "train_questions.jsonl"
EVAL_QUESTIONS = "eval_questions.jsonl"
SPLIT_INFO = "split.json"


class SplitConfig(StageConfig):
    """Options of the pipeline's question split."""

    questions: Path = Field(description="Questions with gold answers (any layout load_questions reads).")
    eval_questions: Path | None = Field(None, description="Explicit held-out questions; default: split `questions`.")
    out_dir: Path = Field(description="Folder for train_questions.jsonl and eval_questions.jsonl.")
    eval_fraction: float = Field(0.4, gt=0.0, lt=1.0, description="Share of questions held out (no eval file).")
    train_limit: int | None = Field(None, ge=1, description="Keep at most N training questions.")
    eval_limit: int | None = Field(None, ge=1, description="Keep at most N evaluation questions.")
    seed: int = Field(42, description="Seed of the shuffle.")
    dedupe_ids: bool = dedupe_ids_field()


@dataclasses.dataclass(frozen=True)
class SplitOutputs(StageOutputs):
    """What the split writes: the training pool, the held-out questions and the counts."""

    FILES: ClassVar[dict[str, str]] = {
        "train_questions": TRAIN_QUESTIONS, "eval_questions": EVAL_QUESTIONS, "info": SPLIT_INFO,
    }
    train_questions: Path
    eval_questions: Path
    info: Path


Config = SplitConfig
Outputs = SplitOutputs


def run(cfg: SplitConfig) -> SplitOutputs:
    """Write ``train_questions.jsonl``, ``eval_questions.jsonl`` and ``split.json``."""
    rec = stage_recorder("split", cfg, cfg.out_dir, [cfg.questions, cfg.eval_questions])
    pool = load_questions(cfg.questions, dedupe_ids=cfg.dedupe_ids or None)
    if cfg.eval_questions is not None:
        held = load_questions(cfg.eval_questions, dedupe_ids=cfg.dedupe_ids or None)
        held_texts = {normalize_answer(q.question) for q in held}
        train = [q for q in pool if normalize_answer(q.question) not in held_texts]
        dropped = len(pool) - len(train)
    else:
        unique: dict[str, Question] = {}  # the same question twice in the file must not end up on both sides
        for q in pool:
            unique.setdefault(normalize_answer(q.question), q)
        pool = list(unique.values())
        order = list(range(len(pool)))
        random.Random(cfg.seed).shuffle(order)
        n_eval = max(1, round(len(pool) * cfg.eval_fraction))
        eval_idx = set(order[:n_eval])
        held = [q for i, q in enumerate(pool) if i in eval_idx]
        train = [q for i, q in enumerate(pool) if i not in eval_idx]
        dropped = 0
    if cfg.train_limit is not None:
        train = train[: cfg.train_limit]
    if cfg.eval_limit is not None:
        held = held[: cfg.eval_limit]
    if not train or not held:
        raise ValueError(f"split left {len(train)} training and {len(held)} evaluation questions; need both > 0")
    out = SplitOutputs.at(cfg.out_dir)
    write_jsonl(out.train_questions, train)
    write_jsonl(out.eval_questions, held)
    write_json(out.info, {"train": len(train), "eval": len(held), "train_dropped_as_in_eval": dropped})
    rec.finish(outputs=list(SplitOutputs.FILES.values()), train=len(train), eval=len(held))
    return out
