"""``dpa-rag build-llm-data``: the reader's pre-aligned and SFT training sets (method.md §7, §12 #13, #14).

* **Pre-aligned set** — per question (original or augmented rewrite) with at least one preference passage: one
  preference passage d* (aligned or unaligned, drawn at random) plus ``k − 1`` other passages of the *same*
  question's retrieval list (or, without a retrieval file, its other probed passages), shuffled. The prompt is the QA
  prompt over the ``k`` numbered passages followed by a judgement question about passage ``[i]`` (= d*); the target is
  ``"Passage [i] is Positive knowledge for the question."`` (aligned) or ``"… Negative knowledge …"`` (unaligned).
  Draws use a per-question RNG seeded with ``(seed, question id)``, so adding questions never changes the others.
* **SFT set** — per question of a retrieval file (the pipeline passes the reranked one): the QA prompt over its first
  ``k`` passages → the first gold answer (or all golds joined with ``", "``).

Both are written as LLaMA-Factory alpaca JSON (``[{"instruction", "input", "output", "system"}]`` plus a
``dataset_info.json`` entry) and as chat-messages JSONL (``{"messages": [...]}``, read by TRL's ``SFTTrainer``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from dpa_rag.config import StageConfig
from dpa_rag.data.loaders import dedupe_ids_field, load_retrieval
from dpa_rag.data.schema import Ctx, Passage, Preference, Question, RetrievalRecord
from dpa_rag.eval.metrics import passage_has_answer
from dpa_rag.io import write_json, write_jsonl
from dpa_rag.mining.common import (
    inherit_augmented,
    load_augmented,
    load_preferences,
    mine_config,
    mine_config_retrieval,
    relabel,
    resolve_preferences,
)
from dpa_rag.mining.labels import ALIGNED, AUTHORS_CATEGORY, normalize_rule
from dpa_rag.mining.prompts import judge_prompt, judge_target, qa_prompt
from dpa_rag.prompts import DEFAULT_TEMPLATE, finished_line
from dpa_rag.stage import StageOutputs, stage_recorder

__all__ = [
    "DATASET_INFO", "PREALIGN_ALPACA", "PREALIGN_FILE", "SFT_ALPACA", "SFT_FILE", "STATS_FILE", "VALID_FILE",
    "Config", "LLMDataConfig", "LLMDataOutputs", "Outputs", "dataset_info", "held_out_ids", "prealign_example", "run",
    "sft_example", "to_alpaca",
]

logger = logging.getLogger(__name__)
PREALIGN_FILE = "prealign.jsonl"  # chat messages (train-llm --stage prealign)
VALID_FILE = "valid.jsonl"  # held-out training-split questions with their passages (train-llm --valid)
PREALIGN_ALPACA = "prealign.json"  # the same examples, LLaMA-Factory alpaca JSON
SFT_FILE = "sft.jsonl"
SFT_ALPACA = "sft.json"
DATASET_INFO = "dataset_info.json"  # LLaMA-Factory's dataset registry
STATS_FILE = "stats.json"
OUTPUTS = [PREALIGN_ALPACA, PREALIGN_FILE, SFT_ALPACA, SFT_FILE, DATASET_INFO, STATS_FILE]


class LLMDataConfig(StageConfig):
    """Options of ``dpa-rag build-llm-data``."""

    preferences: Path = Field(..., description="preferences.jsonl from `dpa-rag mine` (or its output folder).")
    retrieval: Path | None = Field(
        None,
        description="Retrieval (or reranked) file whose first k passages feed the SFT set and whose lists supply "
        "the pre-aligned set's other passages (default: the file `mine` read, from its config.yaml).",
    )
    out_dir: Path = Field(Path("runs/llm-data"), description="Output folder.")
    k: int = Field(3, ge=1, description="Passages per prompt (3; 2 for WebQSP).")
    seed: int = Field(42, description="Seed of the pre-aligned draws (per question: seed and question id).")
    sft_answer: Literal["first", "all"] = Field(
        "first", description="SFT target: the first gold answer, or all golds joined with ', ' (WebQSP)."
    )
    label_rule: Literal["stored", "hit", "f1-delta"] = Field(
        "stored", description="Use the categories stored by `mine`, or recompute them with hit or f1-delta."
    )
    include_augmented: Path | None = Field(
        None,
        description="Augmented questions (JSONL: id, question, origin_id, strategy); rewrites inherit their "
        "original's passages, categories and golds.",
    )
    dataset_prefix: str = Field("dpa_rag", description="Prefix of the dataset names in dataset_info.json.")
    valid_fraction: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Hold out this share of the questions (seeded by question id; their rewrites go with them) from "
        "both sets and write them with their passages to valid.jsonl, for train-llm's held-out validation.",
    )
    valid_max: int | None = Field(None, ge=1, description="At most this many held-out validation questions.")
    template: str = Field(
        DEFAULT_TEMPLATE, description="The answer step's prompt template (qa, dpa, plain or a YAML file): the SFT "
        "prompts are the prompts the reader will answer."
    )
    chat: bool = Field(True, description="Chat messages (the answer step's --chat); --no-chat: plain-text prompts.")
    closed_book: Literal["none", "self"] = Field(
        "none",
        description="Closed-book SFT examples: none, or self (each mined question's closed-book prompt with the "
        "reader's own closed-book answer, as it wrote it, as the target: a regulariser toward the base reader, so "
        "learning to answer briefly from passages does not cost the answers it had without them; answers the token "
        "budget cut mid-sentence are left out).",
    )
    sft_filter: Literal["all", "has-answer"] = Field(
        "all",
        description="SFT questions to keep: all, or has-answer (only those whose first k passages contain a gold "
        "answer: a target the passages do not support teaches the reader to guess).",
    )
    dedupe_ids: bool = dedupe_ids_field()

    @field_validator("label_rule", mode="before")
    @classmethod
    def _rule(cls, v: Any) -> Any:
        return normalize_rule(v) if isinstance(v, str) and v != "stored" else v


@dataclasses.dataclass(frozen=True)
class LLMDataOutputs(StageOutputs):
    """What ``build-llm-data`` writes: pre-aligned and SFT examples (chat JSONL + alpaca JSON), registry, stats."""

    FILES: ClassVar[dict[str, str]] = {
        "prealign": PREALIGN_FILE,
        "prealign_alpaca": PREALIGN_ALPACA,
        "sft": SFT_FILE,
        "sft_alpaca": SFT_ALPACA,
        "dataset_info": DATASET_INFO,
        "stats": STATS_FILE,
        "valid": VALID_FILE,
    }
    prealign: Path
    prealign_alpaca: Path
    sft: Path
    sft_alpaca: Path
    dataset_info: Path
    stats: Path
    valid: Path

    @classmethod
    def written(cls, cfg: Any) -> set[str] | None:
        """``valid.jsonl`` only when questions are held out."""
        names = set(cls.FILES.values())
        return names if cfg.valid_fraction > 0 else names - {VALID_FILE}


Config = LLMDataConfig
Outputs = LLMDataOutputs


def _rng(seed: int, qid: str) -> random.Random:
    return random.Random(f"{seed}:{qid}")


def _key(p: Ctx | Passage | str) -> str:
    """A passage's identity in the pre-aligned draws: its rendered text (a string is taken as rendered)."""
    return p if isinstance(p, str) else p.render()


def _as_record(messages: list[dict[str, str]], chat: bool) -> dict[str, Any]:
    """A training record: chat messages, or (``chat=False``) the plain-text prompt the answer step sends a model
    without a chat template (system, blank line, user; :meth:`PromptTemplate.render_text`) and its completion."""
    if chat:
        return {"messages": messages}
    *prompt, answer = messages
    text = "\n\n".join(m["content"] for m in prompt if m["content"])
    return {"prompt": text, "completion": answer["content"]}


def prealign_example(
    pref: Preference, others: Sequence[Ctx | Passage | str], k: int, seed: int, chat: bool = True
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """One pre-aligned example ``{"messages", "positive", "index"}`` (``chat=False``: ``{"prompt", "completion",
    …}``) for a question, or ``None``.

    Args:
        pref: the question's preference record.
        others: candidate passages of the same question to fill the ``k − 1`` other slots (objects, or strings
            already rendered ``"Title: … Content: …"``); the same rendered text counts once.
        k: passages in the prompt.
        seed: base seed (combined with the question id).

    Returns:
        ``(example, info)``; ``info["skip"]`` says why there is none, ``info["short"]`` whether fewer than ``k − 1``
        other passages were available.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rng = _rng(seed, pref.id)
    candidates, seen = [], set()
    for p in sorted(pref.probes, key=lambda p: p.rank):
        text = p.render()
        if p.category in AUTHORS_CATEGORY and text not in seen:
            seen.add(text)
            candidates.append(p)
    if not candidates:
        return None, {"skip": "no_preference_passage"}
    star = rng.choice(candidates)
    star_text = star.render()
    by_text: dict[str, Ctx | Passage | str] = {}
    for o in others:
        by_text.setdefault(_key(o), o)
    pool = [o for t, o in by_text.items() if t != star_text]
    chosen = rng.sample(pool, min(k - 1, len(pool)))
    passages: list[Ctx | Passage | str] = [star.ctx, *chosen]
    rng.shuffle(passages)
    index = [_key(p) for p in passages].index(star_text) + 1
    positive = star.category == ALIGNED
    messages = judge_prompt(pref.question, passages, index)
    messages.append({"role": "assistant", "content": judge_target(index, positive)})
    return {**_as_record(messages, chat), "positive": positive, "index": index}, {"short": len(chosen) < k - 1}


def sft_example(
    question: str, passages: Sequence[Ctx | Passage | str], answers: list[str], answer_mode: str = "first",
    template: str = DEFAULT_TEMPLATE, chat: bool = True,
) -> dict[str, Any]:
    """One SFT example: the answer step's prompt (``template``, chat messages or plain text) over ``passages``
    (objects; a string is read as ``"Title: … Content: …"``) → the first gold (or all golds joined with ``", "``)."""
    if not answers:
        raise ValueError(f"no gold answer for question {question!r}")
    target = answers[0] if answer_mode == "first" else ", ".join(answers)
    messages = qa_prompt(question, passages, template)
    messages.append({"role": "assistant", "content": target})
    return _as_record(messages, chat)


def to_alpaca(record: dict[str, Any] | list[dict[str, str]]) -> dict[str, str]:
    """A ``[system, user, assistant]`` chat (or a plain ``{"prompt", "completion"}`` record) as a LLaMA-Factory
    alpaca record."""
    if isinstance(record, dict) and "prompt" in record:
        return {"instruction": record["prompt"], "input": "", "output": record["completion"], "system": ""}
    messages = record["messages"] if isinstance(record, dict) else record
    by_role = {m["role"]: m["content"] for m in messages}
    return {"instruction": by_role["user"], "input": "", "output": by_role["assistant"],
            "system": by_role.get("system", "")}


def dataset_info(prefix: str) -> dict[str, Any]:
    """LLaMA-Factory ``dataset_info.json`` entries for ``prealign.json`` and ``sft.json``."""
    columns = {"prompt": "instruction", "query": "input", "response": "output", "system": "system"}
    return {
        f"{prefix}_prealign": {"file_name": "prealign.json", "formatting": "alpaca", "columns": columns},
        f"{prefix}_sft": {"file_name": "sft.json", "formatting": "alpaca", "columns": columns},
    }


def held_out_ids(ids: Sequence[str], fraction: float, seed: int, at_most: int | None = None) -> set[str]:
    """The question ids held out for validation: the ``round(fraction · n)`` (at most ``at_most``) ids that come first
    when sorted by a seeded hash of the id, so the choice does not depend on the file's order.

    Example:
        >>> held_out_ids(["a", "b", "c", "d"], 0.5, seed=0) == held_out_ids(["d", "c", "b", "a"], 0.5, seed=0)
        True
    """
    import hashlib

    unique = list(dict.fromkeys(ids))
    n = round(fraction * len(unique))
    if at_most is not None:
        n = min(n, at_most)
    if fraction > 0 and len(unique) > 1:
        n = min(max(n, 1), len(unique) - 1)  # at least one held out, at least one to train on
    order = sorted(unique, key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
    return set(order[:n])


def _with_augmented_retrieval(records: list[RetrievalRecord], augmented: list[Question]) -> list[RetrievalRecord]:
    by_id = {r.id: r for r in records}
    out = []
    for a in augmented:
        orig = by_id.get(str(a.origin_id))
        if orig is not None:
            out.append(orig.model_copy(update={"id": a.id, "question": a.question, "origin_id": orig.id}))
    return out


def closed_book_target(pref: Preference, counts: Counter[str], max_new_tokens: int | None = None) -> str:
    """The target of a question's closed-book example: the reader's own closed-book answer, as it wrote it.

    From the raw completion (``mine`` keeps it) when the reader finished its first line (:func:`finished_line`, with
    the budget ``mine`` generated it with); an answer cut mid-sentence by the token budget gives no example (counted
    as ``closed_book_unfinished``): trained on, it taught the reader to stop mid-sentence, and it lost closed-book
    answers it had (README, NQ). Preferences mined before ``raw`` was kept fall back to the cleaned answer.
    """
    cb = pref.closed_book
    if cb is None:
        return ""
    if cb.raw is None:
        counts["closed_book_without_raw"] += int(bool(cb.answer))
        return (cb.answer or "").strip()
    line = finished_line(cb.raw, max_new_tokens)
    if line is None:
        counts["closed_book_unfinished"] += 1
        return ""
    return line


def run(cfg: LLMDataConfig) -> LLMDataOutputs:
    """Write the pre-aligned and SFT sets (alpaca JSON + chat JSONL), ``dataset_info.json``, ``stats.json``."""
    out_dir = Path(cfg.out_dir)
    pref_path = resolve_preferences(cfg.preferences)
    retrieval_path = cfg.retrieval or mine_config_retrieval(pref_path)
    if retrieval_path is None:
        raise ValueError("no retrieval file: pass --retrieval (the mine stage's config.yaml did not name one)")
    rec = stage_recorder("build-llm-data", cfg, out_dir, [pref_path, retrieval_path, cfg.include_augmented])
    prefs = load_preferences(pref_path)
    if cfg.label_rule != "stored":
        prefs = relabel(prefs, cfg.label_rule)
    retrieval = load_retrieval(retrieval_path, dedupe_ids=cfg.dedupe_ids or None)
    aug_raw = load_augmented(cfg.include_augmented) if cfg.include_augmented is not None else []
    aug_prefs, orphans = inherit_augmented(prefs, aug_raw)
    aug_retrieval = _with_augmented_retrieval(retrieval, aug_raw)

    held = held_out_ids([r.id for r in retrieval], cfg.valid_fraction, cfg.seed, cfg.valid_max)
    valid = [r for r in retrieval if r.id in held]
    ctx_lists: dict[str, list[Ctx]] = {r.id: list(r.ctxs) for r in retrieval}
    counts: Counter[str] = Counter()
    prealign: list[dict[str, Any]] = []
    for pref in prefs + aug_prefs:
        source = pref.origin_id or pref.id
        if source in held or pref.id in held:
            counts["prealign_held_out"] += 1
            continue
        others = ctx_lists.get(source) or ctx_lists.get(pref.id)
        if others is None:
            counts["prealign_others_from_probes"] += 1
            others = [p.ctx for p in sorted(pref.probes, key=lambda p: p.rank)]
        example, info = prealign_example(pref, others, cfg.k, cfg.seed, chat=cfg.chat)
        if example is None:
            counts[f"prealign_skipped_{info['skip']}"] += 1
            continue
        counts["prealign_short"] += int(info["short"])
        counts["prealign_positive" if example["positive"] else "prealign_negative"] += 1
        prealign.append({k: v for k, v in example.items() if k in ("messages", "prompt", "completion")})

    sft: list[dict[str, Any]] = []
    for r in retrieval + aug_retrieval:
        if r.id in held or (r.origin_id is not None and str(r.origin_id) in held):
            counts["sft_held_out"] += 1
            continue
        if not r.answers:
            counts["sft_skipped_no_answer"] += 1
            continue
        passages = r.ctxs[: cfg.k]
        if cfg.sft_filter == "has-answer" and not any(passage_has_answer(c, r.answers) for c in passages):
            counts["sft_skipped_answer_not_in_passages"] += 1
            continue
        counts["sft_short"] += int(len(passages) < cfg.k)
        sft.append(sft_example(r.question, passages, r.answers, cfg.sft_answer, cfg.template, cfg.chat))

    if cfg.closed_book == "self":
        budget = mine_config(pref_path).get("max_new_tokens")
        budget = budget if isinstance(budget, int) else None
        for pref in prefs:
            answer = "" if pref.id in held else closed_book_target(pref, counts, budget)
            if not answer:
                continue
            messages = qa_prompt(pref.question, [], cfg.template)
            messages.append({"role": "assistant", "content": answer})
            sft.append(_as_record(messages, cfg.chat))
            counts["closed_book_self"] += 1
        if counts["closed_book_without_raw"]:
            logger.warning(
                "%s was mined before `mine` kept the raw closed-book completions: %d closed-book examples use the "
                "cleaned answers, cut mid-sentence where the token budget ended them (which teaches the reader to "
                "stop mid-sentence); re-run `mine` (its generation cache makes it quick) to keep finished ones only",
                pref_path, counts["closed_book_without_raw"],
            )
    out = LLMDataOutputs.at(out_dir)
    write_json(out.prealign_alpaca, [to_alpaca(e) for e in prealign])
    write_jsonl(out.prealign, prealign)
    write_json(out.sft_alpaca, [to_alpaca(e) for e in sft])
    write_jsonl(out.sft, sft)
    write_json(out.dataset_info, dataset_info(cfg.dataset_prefix))
    outputs = list(OUTPUTS)
    if valid:
        write_jsonl(out.valid, [r.model_dump(mode="json", exclude_none=True) for r in valid])
        outputs.append(VALID_FILE)
    elif out.valid.exists():  # an earlier run's held-out questions would be stale now
        out.valid.unlink()
    stats = {
        "k": cfg.k,
        "label_rule": cfg.label_rule,
        "retrieval": str(retrieval_path),
        "questions": len(prefs),
        "augmented": len(aug_prefs),
        "augmented_orphans": orphans,
        "prealign": {
            "examples": len(prealign),
            "positive": counts["prealign_positive"],
            "negative": counts["prealign_negative"],
            "skipped_no_preference_passage": counts["prealign_skipped_no_preference_passage"],
            "fewer_than_k_passages": counts["prealign_short"],
            "others_from_probes": counts["prealign_others_from_probes"],
        },
        "sft": {
            "examples": len(sft),
            "augmented": len(aug_retrieval),
            "skipped_no_answer": counts["sft_skipped_no_answer"],
            "skipped_answer_not_in_passages": counts["sft_skipped_answer_not_in_passages"],
            "held_out": counts["sft_held_out"],
            "fewer_than_k_passages": counts["sft_short"],
            "filter": cfg.sft_filter,
            "closed_book_self": counts["closed_book_self"],
            "closed_book_skipped_unfinished": counts["closed_book_unfinished"],
        },
        "valid": {"questions": len(valid), "fraction": cfg.valid_fraction, "prealign_held_out":
                  counts["prealign_held_out"]},
    }
    write_json(out.stats, stats)
    rec.finish(outputs=outputs, prealign=len(prealign), sft=len(sft), valid=len(valid))
    logger.info("LLM data: %d pre-aligned, %d SFT examples, %d held-out validation questions → %s", len(prealign),
                len(sft), len(valid), out_dir)
    return out
