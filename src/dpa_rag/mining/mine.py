"""``dpa-rag mine``: preference knowledge extraction (method.md §2).

For every question of a retrieval file the reader answers once closed-book and once with each probed passage alone
(ranks 1, 25, 50, 100 by default). Each answer is scored (hit, F1) against the golds and each probed passage gets a
category (:mod:`dpa_rag.mining.labels`).

With ``label_rule: loglik`` (method.md §13) nothing is generated: the reader scores each gold answer teacher-forced
after the closed-book prompt and after each probed passage (one batched forward per prompt and gold, cached like
generations); a probe's ``loglik`` is the best length-normalised log-probability over the golds
(``loglik_max_golds``), its ``gain`` the difference to the closed-book value, and its category comes from the gain
thresholds. Being cheap, it can probe whole top-k lists (``probe_top``). The first ``agreement_questions`` questions
are also answered by generation, so ``stats.json``/``summary.md`` show how the loglik categories agree with the hit
rule's on the same probes.

Efficiency and resume: the prompts of a chunk of questions (``chunk_size`` × (1 + probes)) go to the reader in one
:meth:`~dpa_rag.generation.CachedGenerator.generate` call (batched by ``batch_size``, every batch cached on disk);
the finished chunk is appended to ``preferences.jsonl``. ``progress.json`` stores a fingerprint of the result-relevant
config and the input file; a restarted run with the same fingerprint keeps the finished questions and continues, a
different fingerprint starts over. When nothing is left to do the reader is never loaded.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator
from tqdm.auto import tqdm

from dpa_rag.config import StageConfig, config_hash
from dpa_rag.data.loaders import dedupe_ids_field, load_retrieval
from dpa_rag.data.schema import ClosedBook, Ctx, Preference, Probe, RetrievalRecord
from dpa_rag.eval.metrics import normalize_answer
from dpa_rag.generation import CachedGenerator, Generator, GeneratorOptions, build_generator
from dpa_rag.io import DataError, append_jsonl, file_sha256, read_json, read_resumable_jsonl, write_json, write_text
from dpa_rag.jobs import check_preempted
from dpa_rag.mining.common import preference_from
from dpa_rag.mining.labels import (
    LabelRule,
    categorize,
    categorize_gain,
    normalize_rule,
    rule_categories,
    score,
)
from dpa_rag.mining.prompts import clean_answer, qa_prompt
from dpa_rag.stage import RESULT_NEUTRAL_FIELDS, StageOutputs, stage_recorder

__all__ = [
    "PREFERENCES", "STATS", "SUMMARY", "Config", "MineConfig", "MineOutputs", "Outputs", "category_stats",
    "mine_records", "probe_ranks", "run", "summary_markdown",
]

logger = logging.getLogger(__name__)

PREFERENCES = "preferences.jsonl"
PROGRESS = "progress.json"
STATS = "stats.json"
SUMMARY = "summary.md"
# Fields that change neither the prompts nor the answers, so a resumed run may change them freely.
_RESUME_NEUTRAL = RESULT_NEUTRAL_FIELDS | {"batch_size", "chunk_size", "progress", "device"}
_CTX_FIELDS = ("id", "title", "text", "score", "has_answer")


class MineConfig(GeneratorOptions, StageConfig):
    """Options of ``dpa-rag mine`` (plus the reader options of :class:`~dpa_rag.generation.GeneratorOptions`)."""

    retrieval: Path = Field(
        ..., description="DPR-style retrieval file (question, answers, ctxs; top-100 per question)."
    )
    out_dir: Path = Field(Path("runs/mine"), description="Output folder (preferences.jsonl, stats.json, summary.md).")
    ranks: list[int] = Field(
        default_factory=lambda: [1, 25, 50, 100],
        description="1-based retriever ranks to probe; a shorter list is probed at the nearest existing ranks "
        "(duplicates removed).",
    )
    label_rule: LabelRule = Field(
        "hit",
        description="Category rule: hit (the paper: correct = gold substring of the answer), f1-delta (sign of the "
        "F1 change; reproduces the authors' released labels) or loglik (graded: the change in the reader's "
        "log-probability of the gold answer; no generation).",
    )
    probe_top: int | None = Field(
        None, ge=1, description="Also probe every rank 1..N (e.g. 20 with the cheap loglik rule)."
    )
    loglik_positive: float = Field(
        0.5, ge=0.0, description="loglik rule: gain (nats per answer token) above which a passage is aligned."
    )
    loglik_negative: float = Field(
        0.5, ge=0.0, description="loglik rule: a passage whose gain is below minus this is unaligned."
    )
    loglik_max_golds: int = Field(
        3, ge=1, description="loglik rule: score at most this many distinct gold answers per question (best counts)."
    )
    closed_book_answers: bool = Field(
        True, description="loglik rule: also generate every question's closed-book answer (one short generation per "
        "question; build-llm-data's closed-book examples use them)."
    )
    agreement_questions: int = Field(
        32, ge=0, description="loglik rule: also generate answers for the first N questions, to report agreement "
        "with the hit rule on the same probes (0 = none)."
    )
    chunk_size: int = Field(
        32, ge=1, description="Questions whose prompts go to the reader together (one cached call)."
    )
    limit: int | None = Field(None, ge=1, description="Mine only the first N questions.")
    dedupe_ids: bool = dedupe_ids_field()
    progress: bool = Field(True, description="Show a progress bar.")

    @field_validator("label_rule", mode="before")
    @classmethod
    def _rule(cls, v: Any) -> Any:
        return normalize_rule(v) if isinstance(v, str) else v

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one rank to probe is needed")
        if any(r < 1 for r in v):
            raise ValueError(f"ranks are 1-based, got {v}")
        return v


@dataclasses.dataclass(frozen=True)
class MineOutputs(StageOutputs):
    """What ``mine`` writes: one preference record per question, the label statistics and their summary."""

    FILES: ClassVar[dict[str, str]] = {"preferences": PREFERENCES, "stats": STATS, "summary": SUMMARY}
    OPEN: ClassVar[bool] = True  # also progress.json (resume state)
    preferences: Path
    stats: Path
    summary: Path


Config = MineConfig
Outputs = MineOutputs


def all_ranks(cfg: MineConfig) -> list[int]:
    """The configured ranks plus ``1..probe_top``."""
    return sorted(set(cfg.ranks) | set(range(1, (cfg.probe_top or 0) + 1)))


def scoring_golds(answers: Sequence[str], k: int) -> list[str]:
    """The first ``k`` gold answers that differ after normalisation (empty ones skipped), stripped."""
    out, seen = [], set()
    for a in answers:
        key = normalize_answer(a) or a.strip().lower()  # "A" normalises to "": still a gold to score
        if a.strip() and key not in seen:
            seen.add(key)
            out.append(a.strip())
        if len(out) == k:
            break
    return out


def probe_ranks(n_ctxs: int, ranks: Sequence[int]) -> list[int]:
    """The 1-based ranks to probe in a list of ``n_ctxs`` passages: each rank clamped to ``n_ctxs``, deduplicated,
    ascending. ``probe_ranks(10, [1, 25, 50, 100]) == [1, 10]``; an empty list has none."""
    if n_ctxs <= 0:
        return []
    return sorted({min(max(int(r), 1), n_ctxs) for r in ranks})


def _probe_ctx(ctx: Ctx) -> Ctx:
    """The passage as a probe stores it: ``id``, ``title``, ``text`` and, when known, ``score``/``has_answer``
    (other keys of the retrieval file's ctx are not kept)."""
    return Ctx(**{k: getattr(ctx, k) for k in _CTX_FIELDS if getattr(ctx, k) is not None})


def _preference(r: RetrievalRecord, before: ClosedBook, probes: list[Probe]) -> Preference:
    return Preference(id=r.id, question=r.question, answers=list(r.answers), origin_id=r.origin_id or None,
                      closed_book=before, probes=probes)


def mine_records(
    records: Sequence[RetrievalRecord],
    generator: CachedGenerator,
    cfg: MineConfig,
) -> list[Preference]:
    """Mine one chunk: all its prompts in one ``generate`` call, then one preference record per question."""
    if cfg.label_rule == "loglik":
        return mine_loglik(records, generator, cfg)
    prompts: list[list[dict[str, str]]] = []
    plan: list[list[int]] = []
    for r in records:
        ranks = probe_ranks(len(r.ctxs), all_ranks(cfg))
        plan.append(ranks)
        prompts.append(qa_prompt(r.question, []))
        prompts.extend(qa_prompt(r.question, [r.ctxs[k - 1]]) for k in ranks)
    outs = generator.generate(prompts, cfg.generation_params(), desc="mine")
    out: list[Preference] = []
    i = 0
    for r, ranks in zip(records, plan, strict=True):
        raw = outs[i]
        i += 1
        cb_answer = clean_answer(raw)
        before = ClosedBook(answer=cb_answer, **score(cb_answer, r.answers), raw=raw)
        probes = []
        for k in ranks:
            answer = clean_answer(outs[i])
            i += 1
            after = score(answer, r.answers)
            probes.append(Probe(rank=k, ctx=_probe_ctx(r.ctxs[k - 1]), answer=answer, **after,
                                category=categorize(before, after, cfg.label_rule)))
        out.append(_preference(r, before, probes))
    return out


def mine_loglik(
    records: Sequence[RetrievalRecord],
    generator: CachedGenerator,
    cfg: MineConfig,
    answer_ids: set[str] | None = None,
) -> list[Preference]:
    """Mine one chunk with the ``loglik`` rule: every (prompt, gold) pair scored in one cached ``loglik`` call.

    Questions in ``answer_ids`` are also answered by generation (closed-book and per probe), so their probes carry
    ``answer``/``hit``/``f1`` and the hit rule's category (``hit_category``) beside the loglik one; with
    ``closed_book_answers`` every other question is answered closed-book (its ``closed_book.answer``).
    """
    answer_ids = answer_ids or set()
    prompts: list[list[dict[str, str]]] = []
    conts: list[str] = []
    plan: list[tuple[list[int], list[str]]] = []
    gen_prompts: list[list[dict[str, str]]] = []
    for r in records:
        ranks = probe_ranks(len(r.ctxs), all_ranks(cfg))
        golds = scoring_golds(r.answers, cfg.loglik_max_golds)
        plan.append((ranks, golds))
        question_prompts = [qa_prompt(r.question, [])]
        question_prompts += [qa_prompt(r.question, [r.ctxs[k - 1]]) for k in ranks]
        for p in question_prompts:
            for g in golds:
                prompts.append(p)
                conts.append(g)
        if r.id in answer_ids:
            gen_prompts.extend(question_prompts)
        elif cfg.closed_book_answers:
            gen_prompts.append(question_prompts[0])
    scores = generator.loglik(prompts, conts, desc="mine (loglik)")
    answers = generator.generate(gen_prompts, cfg.generation_params(), desc="mine (answers)") if gen_prompts else []
    out: list[Preference] = []
    i = j = 0
    thresholds = (cfg.loglik_positive, cfg.loglik_negative)
    for r, (ranks, golds) in zip(records, plan, strict=True):
        values = []
        for _ in range(1 + len(ranks)):
            per_gold = [s / n for s, n in scores[i : i + len(golds)] if n > 0]
            i += len(golds)
            values.append(max(per_gold) if per_gold else float("-inf"))
        answered = r.id in answer_ids
        texts = answers[j : j + (1 + len(ranks) if answered else int(cfg.closed_book_answers))]
        j += len(texts)
        before = ClosedBook(loglik=values[0])
        if texts:
            cb = clean_answer(texts[0])
            before = ClosedBook(loglik=values[0], answer=cb, **score(cb, r.answers), raw=texts[0])
        probes = []
        for n, k in enumerate(ranks, start=1):
            gain = values[n] - values[0]
            probe: dict[str, Any] = {"rank": k, "ctx": _probe_ctx(r.ctxs[k - 1]), "loglik": values[n], "gain": gain,
                                     "category": categorize_gain(gain, *thresholds)}
            if answered:
                answer = clean_answer(texts[n])
                after = score(answer, r.answers)
                probe.update({"answer": answer, **after, "hit_category": categorize(before, after, "hit")})
            probes.append(Probe(**probe))
        out.append(_preference(r, before, probes))
    return out


def category_stats(prefs: Iterable[Preference], rule: str = "hit") -> dict[str, Any]:
    """Category counts and shares, overall and per probed rank, plus closed-book accuracy (where answers exist).

    Under the ``loglik`` rule also: the mean gain of answer-bearing and other passages, and the agreement with the
    hit rule on the probes that were also answered (``agreement``: confusion counts and the share of probes whose
    loglik category is aligned exactly when the hit rule's is, likewise unaligned).
    """
    cats = rule_categories(rule)
    overall: Counter[str] = Counter()
    per_rank: dict[int, Counter[str]] = {}
    n = answered = cb_hit = 0
    cb_f1 = 0.0
    confusion: Counter[tuple[str, str]] = Counter()
    gains: dict[str, list[float]] = {"answer_bearing": [], "other": []}
    for p in prefs:
        n += 1
        if p.closed_book.hit is not None:
            answered += 1
            cb_hit += int(p.closed_book.hit)
            cb_f1 += float(p.closed_book.f1 or 0.0)
        for probe in p.probes:
            overall[probe.category] += 1
            per_rank.setdefault(probe.rank, Counter())[probe.category] += 1
            if probe.hit_category is not None:
                confusion[(probe.category, probe.hit_category)] += 1
            if probe.gain is not None and probe.ctx.has_answer is not None:
                gains["answer_bearing" if probe.ctx.has_answer else "other"].append(float(probe.gain))

    def block(c: Counter[str]) -> dict[str, Any]:
        total = sum(c.values())
        return {
            "total": total,
            "counts": {k: c.get(k, 0) for k in cats},
            "shares": {k: (c.get(k, 0) / total if total else 0.0) for k in cats},
        }

    out: dict[str, Any] = {
        "n_questions": n,
        "closed_book": {"hit": cb_hit / answered if answered else 0.0, "f1": cb_f1 / answered if answered else 0.0,
                        "n_answered": answered},
        "overall": block(overall),
        "per_rank": {str(k): block(per_rank[k]) for k in sorted(per_rank)},
    }
    if any(gains.values()):
        out["mean_gain"] = {k: (sum(v) / len(v) if v else None) for k, v in gains.items()}
        out["mean_gain"].update({f"n_{k}": len(v) for k, v in gains.items()})
    if confusion:
        total = sum(confusion.values())
        neutral = ("both_correct", "both_wrong")
        same = sum(v for (a, b), v in confusion.items() if a == b or (a == "neutral" and b in neutral))
        out["agreement"] = {
            "probes": total,
            "agree": same / total,
            "confusion": {f"{a}|{b}": v for (a, b), v in sorted(confusion.items())},
        }
    return out


def summary_markdown(stats: dict[str, Any]) -> str:
    """A markdown table of category counts and shares per probed rank (and overall), plus, for the loglik rule, the
    mean gains and the agreement with the hit rule."""
    cats = list(stats["overall"]["counts"])
    head = "| rank | " + " | ".join(cats) + " | total |"
    cb = stats["closed_book"]
    cb_text = (f"closed-book hit {100 * cb['hit']:.1f}%, F1 {100 * cb['f1']:.1f}" if cb.get("n_answered", 1)
               else "no closed-book answers generated")
    lines = [
        "# Preference mining summary",
        "",
        f"Label rule: `{stats.get('label_rule', '?')}`; questions: {stats['n_questions']}; {cb_text}.",
        "",
        head,
        "|" + "---|" * (len(cats) + 2),
    ]
    rows = [*stats["per_rank"].items(), ("all", stats["overall"])]
    for name, b in rows:
        cells = [f"{b['counts'][k]} ({100 * b['shares'][k]:.1f}%)" for k in cats]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {b['total']} |")
    if "mean_gain" in stats:
        g = stats["mean_gain"]

        def fmt(v: float | None) -> str:
            return "–" if v is None else f"{v:+.3f}"

        lines += ["", f"Mean gain (nats per answer token): answer-bearing passages {fmt(g['answer_bearing'])} "
                  f"({g['n_answer_bearing']}), other passages {fmt(g['other'])} ({g['n_other']})."]
    if "agreement" in stats:
        a = stats["agreement"]
        lines += ["", f"## Agreement with the hit rule ({a['probes']} probes also answered by generation)", "",
                  f"Same verdict (aligned/aligned, unaligned/unaligned, neutral/both-*): {100 * a['agree']:.1f}%.", "",
                  "| loglik \\ hit | count |", "|---|---:|"]
        lines += [f"| {k.replace('|', ' / ')} | {v} |" for k, v in a["confusion"].items()]
    return "\n".join(lines) + "\n"


def _fingerprint(cfg: MineConfig) -> dict[str, str]:
    exclude = _RESUME_NEUTRAL & set(type(cfg).model_fields)
    return {"config_hash": config_hash(cfg, exclude=exclude), "retrieval_sha256": file_sha256(cfg.retrieval)}


def run(cfg: MineConfig, backend: Generator | None = None) -> MineOutputs:
    """Mine preferences for every question of ``cfg.retrieval``.

    Args:
        cfg: the stage config.
        backend: a ready backend (tests, notebooks); default: built from ``cfg`` only if something is left to do.
    """
    out_dir = Path(cfg.out_dir)
    rec = stage_recorder("mine", cfg, out_dir, [cfg.retrieval])
    with rec.timer("load"):
        records = load_retrieval(cfg.retrieval, limit=cfg.limit, dedupe_ids=cfg.dedupe_ids or None)
    no_gold = [r.id for r in records if not r.answers]
    if no_gold:
        logger.warning("%d question(s) without gold answers are skipped (e.g. %s)", len(no_gold), no_gold[0])
        records = [r for r in records if r.answers]

    prefs_path, progress_path = out_dir / PREFERENCES, out_dir / PROGRESS
    fingerprint = _fingerprint(cfg)
    try:
        previous = read_json(progress_path) if progress_path.exists() else None
    except DataError:
        previous = None
    if previous == fingerprint:
        done = [preference_from(d, f"{prefs_path}:{n}") for n, d in enumerate(read_resumable_jsonl(prefs_path), 1)]
        if done:
            logger.info("resuming: %d question(s) already mined in %s", len(done), prefs_path)
    else:
        if prefs_path.exists():
            logger.info("config or input changed since the last run: starting %s over", prefs_path)
            prefs_path.unlink()
        done = []
        write_json(progress_path, fingerprint)
    prefs_path.touch()  # exists even when nothing is mined (e.g. no question has golds)
    done_ids = {d.id for d in done}
    todo = [r for r in records if r.id not in done_ids]
    answer_ids = {r.id for r in records[: cfg.agreement_questions]}

    generator: CachedGenerator | None = None
    new: list[Preference] = []
    if todo:
        with rec.timer("load_reader"):
            generator = build_generator(cfg, backend=backend, progress=False)
        bar = tqdm(
            total=len(records), initial=len(records) - len(todo), desc="mine", unit="q", disable=not cfg.progress
        )
        try:
            with rec.timer("mine"), open(prefs_path, "a", encoding="utf-8") as fh:
                for start in range(0, len(todo), cfg.chunk_size):
                    chunk = todo[start : start + cfg.chunk_size]
                    if cfg.label_rule == "loglik":
                        mined = mine_loglik(chunk, generator, cfg, answer_ids)
                    else:
                        mined = mine_records(chunk, generator, cfg)
                    for m in mined:
                        append_jsonl(fh, m.dump())
                    new.extend(mined)
                    bar.update(len(chunk))
                    bar.set_postfix(calls=generator.calls, cache_hits=generator.hits)
                    fh.flush()
                    check_preempted(f"{len(done) + len(new)} mined question(s) are kept in {prefs_path}")
        finally:
            bar.close()

    by_id = {d.id: d for d in [*done, *new]}
    prefs = [by_id[r.id] for r in records if r.id in by_id]
    stats = category_stats(prefs, cfg.label_rule)
    stats.update(
        {
            "label_rule": cfg.label_rule,
            "ranks": list(cfg.ranks),
            "model": cfg.model,
            "backend": cfg.backend,
            "skipped_no_gold": len(no_gold),
            "resumed_questions": len(done_ids),
            "mined_questions": len(new),
            "calls": generator.calls if generator else 0,
            "cache_hits": generator.hits if generator else 0,
        }
    )
    write_json(out_dir / STATS, stats)
    write_text(out_dir / SUMMARY, summary_markdown(stats))
    rec.finish(
        outputs=list(MineOutputs.FILES.values()),
        questions=stats["n_questions"],
        probes=stats["overall"]["total"],
        calls=stats["calls"],
        cache_hits=stats["cache_hits"],
    )
    logger.info(
        "mined %d question(s) (%d resumed), %d reader call(s), %d cache hit(s) → %s",
        len(prefs), len(done_ids), stats["calls"], stats["cache_hits"], prefs_path,
    )
    return MineOutputs.at(out_dir)
