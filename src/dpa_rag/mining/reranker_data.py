"""``dpa-rag build-reranker-data``: reranker training and evaluation files in the authors' format (method.md §3).

From ``preferences.jsonl`` (``dpa-rag mine``), questions are split by group (an augmented rewrite follows its
original) into train/valid/test. Per train question (original or rewrite):

* ``positive`` = ``n_positive`` aligned passages (largest F1 gain first), ``negative`` = ``n_negative`` unaligned
  passages (largest F1 loss first). Pools never borrow from other questions; a question with no aligned or no unaligned
  passage is dropped (counted by reason); a pool smaller than its group size is filled by repeating its own passages
  (method.md §12 #4, counted). A passage (by rendered text) is never both positive and negative.
* ``rank_list`` = ``rank_list_size`` passages spanning the graded preference order (method.md §12 #5): aligned by
  F1 gain desc, then both-correct, then both-wrong (each by retriever rank), then unaligned by F1 loss asc. Evenly
  spaced picks keep the best and the worst; a shorter list repeats entries in place (counted).
* ``classification`` = ``positive[0]`` with label 1 or ``negative[0]`` with label 2; labels are balanced across the
  records and their order is shuffled with ``seed``.

Valid/test files hold one ``(question, passage)`` pair per aligned (category 1) or unaligned (category 2) probe.

Graded preferences (``mine --label-rule loglik``): each probe has a ``gain`` (the reader's log-probability change);
it replaces the F1 change everywhere above, the rank list is all probes by gain (best first), and ``pool: ranked``
(the default for such files) lets every question with two probes of different gain train: missing positives ← the
best-gain probe, missing negatives ← the worst-gain one. ``valid_lists.jsonl``/``test_lists.jsonl`` keep, per
held-out original question, every probed passage with its gain, category and retriever rank: the utility-ranking
evaluation of ``train-reranker --utility-eval`` (nDCG against the gains, MRR of aligned passages, top-1 gain).
Graded training records also carry ``rank_gains`` (the gain of each ``rank_list`` passage, in order): the target of
the listwise loss (``train-reranker --losses listwise``).

``labels: relevance`` is the control of the reader's preference signal: the *training* split's probes are relabelled
from the passages' ``has_answer`` (gain 1 / aligned with the answer string, 0 / unaligned without) before the records
are built, so the same questions, passages, losses and selection train on plain relevance instead; the held-out
valid/test files keep the reader's labels, so both trainings are chosen and judged alike.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from dpa_rag.config import StageConfig
from dpa_rag.data.reranker_records import load_reranker_pairs, load_reranker_train
from dpa_rag.data.schema import Preference, Probe
from dpa_rag.io import write_json, write_jsonl
from dpa_rag.mining.common import (
    inherit_augmented,
    load_augmented,
    load_preferences,
    relabel,
    resolve_preferences,
    split_by_group,
)
from dpa_rag.mining.labels import ALIGNED, AUTHORS_CATEGORY, BOTH_CORRECT, BOTH_WRONG, UNALIGNED, normalize_rule
from dpa_rag.stage import StageOutputs, stage_recorder

GAINS_KEY = "rank_gains"  # = dpa_rag.reranker.losses.listwise.GAINS_KEY (kept torch-free here)

__all__ = [
    "GAINS_KEY", "SPLITS_FILE", "STATS_FILE", "TEST_FILE", "TEST_LISTS", "TRAIN_FILE", "VALID_FILE", "VALID_LISTS",
    "Config",
    "Outputs",
    "RerankerDataConfig",
    "RerankerDataOutputs",
    "assign_classification",
    "build_list_record",
    "build_pair_records",
    "build_train_record",
    "ordered_split",
    "relevance_labels",
    "check_group_sizes",
    "graded_order",
    "has_gains",
    "render_probe",
    "run",
    "spread",
]

logger = logging.getLogger(__name__)
SPLITS = ("train", "valid", "test")
TRAIN_FILE = "train.jsonl"  # the authors' training format (query, classification, rank_list, positive, negative)
VALID_FILE = "valid.jsonl"  # (question, ctx, category) pairs
TEST_FILE = "test.jsonl"
VALID_LISTS = "valid_lists.jsonl"  # held-out probed lists with the reader's gains (graded rules)
TEST_LISTS = "test_lists.jsonl"
SPLITS_FILE = "splits.json"
STATS_FILE = "stats.json"
_FLAGS = ("padded_positive", "padded_negative", "padded_rank_list", "borrowed_positive", "borrowed_negative")


class RerankerDataConfig(StageConfig):
    """Options of ``dpa-rag build-reranker-data``."""

    preferences: Path = Field(..., description="preferences.jsonl from `dpa-rag mine` (or its output folder).")
    out_dir: Path = Field(
        Path("runs/reranker-data"), description="Output folder (train/valid/test.jsonl, splits.json, stats.json)."
    )
    n_positive: int = Field(2, ge=1, description="Positives (aligned passages) per training record.")
    n_negative: int = Field(2, ge=1, description="Negatives (unaligned passages) per training record.")
    rank_list_size: int = Field(4, ge=2, description="Passages per rank_list (most preferred first).")
    train_fraction: float = Field(0.8, ge=0.0, le=1.0, description="Share of questions in train.")
    valid_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of questions in valid.")
    test_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Share of questions in test.")
    seed: int = Field(42, description="Seed of the split and of the classification label order.")
    label_rule: Literal["stored", "hit", "f1-delta"] = Field(
        "stored", description="Use the categories stored by `mine`, or recompute them with hit or f1-delta."
    )
    include_augmented: Path | None = Field(
        None,
        description="Augmented questions (JSONL: id, question, origin_id, strategy); rewrites inherit their "
        "original's passages, categories and golds.",
    )
    pool: Literal["auto", "strict", "graded", "ranked"] = Field(
        "auto",
        description="strict: positives = aligned, negatives = unaligned only; graded: a question lacking one side "
        "fills it from both-correct (positives) or both-wrong (negatives) passages (needed with the hit rule); "
        "ranked (graded loglik preferences): from the best-gain / worst-gain probe; auto: ranked for loglik "
        "preferences, strict otherwise.",
    )
    augmented_in_eval: bool = Field(
        False, description="Also write pairs of augmented rewrites into valid/test (default: originals only)."
    )
    labels: Literal["reader", "relevance"] = Field(
        "reader",
        description="Training labels: reader (the mined preferences) or relevance (the control: train-split probes "
        "relabelled from has_answer, gain 1/0; valid/test keep the reader's labels).",
    )
    valid_questions: int | None = Field(
        None, ge=1, description="Ordered split: the first N question groups in file order are valid (give with "
        "--test-questions; the fractions are then ignored). The held-out questions stay the same as more questions "
        "are mined (a learning curve compares like with like); the file order should already be random (the "
        "pipeline's split step shuffles).",
    )
    test_questions: int | None = Field(
        None, ge=1, description="Ordered split: the next N question groups are test; the rest, in file order, train."
    )
    limit_train: int | None = Field(
        None, ge=1, description="Keep only the first N training questions of the split (a learning curve; the "
        "valid/test questions do not change)."
    )

    @field_validator("label_rule", mode="before")
    @classmethod
    def _rule(cls, v: Any) -> Any:
        return normalize_rule(v) if isinstance(v, str) and v != "stored" else v

    @model_validator(mode="after")
    def _fractions(self) -> RerankerDataConfig:
        total = self.train_fraction + self.valid_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train/valid/test fractions must sum to 1, got {total:g}")
        if (self.valid_questions is None) != (self.test_questions is None):
            raise ValueError("the ordered split needs both valid_questions and test_questions")
        return self


@dataclasses.dataclass(frozen=True)
class RerankerDataOutputs(StageOutputs):
    """What ``build-reranker-data`` writes: training records, held-out pairs and lists, the split, stats."""

    FILES: ClassVar[dict[str, str]] = {
        "train": TRAIN_FILE,
        "valid": VALID_FILE,
        "test": TEST_FILE,
        "valid_lists": VALID_LISTS,
        "test_lists": TEST_LISTS,
        "splits": SPLITS_FILE,
        "stats": STATS_FILE,
    }
    train: Path
    valid: Path
    test: Path
    valid_lists: Path
    test_lists: Path
    splits: Path
    stats: Path


Config = RerankerDataConfig
Outputs = RerankerDataOutputs


def check_group_sizes(n_positive: int, n_negative: int, rank_list_size: int) -> None:
    """Raise ``ValueError`` unless ``n_positive ≥ 1``, ``n_negative ≥ 1`` and ``rank_list_size ≥ 2``."""
    if n_positive < 1:
        raise ValueError(f"n_positive must be at least 1, got {n_positive}")
    if n_negative < 1:
        raise ValueError(f"n_negative must be at least 1, got {n_negative}")
    if rank_list_size < 2:
        raise ValueError(f"rank_list_size must be at least 2 (a ranking needs a pair), got {rank_list_size}")


def render_probe(probe: Probe) -> str:
    """The probe's passage as the authors render it: ``"Title: … Content: …"`` (the on-disk form of a passage in
    the reranker files)."""
    return probe.render()


def _delta(pref: Preference, probe: Probe) -> float:
    if probe.gain is not None:
        return float(probe.gain)
    return float(probe.f1) - float(pref.closed_book.f1)


def has_gains(prefs: list[Preference]) -> bool:
    """Whether the preferences are graded (every probe has a ``gain``: ``mine --label-rule loglik``)."""
    probes = [p for pref in prefs for p in pref.probes]
    return bool(probes) and all(p.gain is not None for p in probes)


def _distinct(probes: list[Probe]) -> list[Probe]:
    seen: set[str] = set()
    out = []
    for p in probes:
        text = render_probe(p)
        if text not in seen:
            seen.add(text)
            out.append(p)
    return out


def graded_order(pref: Preference) -> list[Probe]:
    """All probes of a question, most preferred first (distinct passages; see the module docstring)."""
    probes = pref.probes
    if pref.graded:
        return _distinct(sorted(probes, key=lambda p: (-float(p.gain), p.rank)))

    def by(cat: str, key: Any) -> list[Probe]:
        return sorted((p for p in probes if p.category == cat), key=key)

    ordered = (
        by(ALIGNED, lambda p: (-_delta(pref, p), p.rank))
        + by(BOTH_CORRECT, lambda p: p.rank)
        + by(BOTH_WRONG, lambda p: p.rank)
        + by(UNALIGNED, lambda p: (-_delta(pref, p), p.rank))
    )
    return _distinct(ordered)


def relevance_labels(pref: Preference) -> Preference:
    """The control's labels: every probe's gain is 1.0 if its passage contains a gold answer (``has_answer``) else 0.0,
    category aligned/unaligned alike (the closed-book answer plays no part).

    Raises:
        ValueError: a probe whose passage has no ``has_answer`` (retrieve with answers to get it).
    """
    probes = []
    for p in pref.probes:
        if p.ctx.has_answer is None:
            raise ValueError(f"question {pref.id}: labels 'relevance' needs has_answer on every probed passage "
                             f"(rank {p.rank} has none)")
        hit = bool(p.ctx.has_answer)
        probes.append(p.model_copy(update={"gain": 1.0 if hit else 0.0, "category": ALIGNED if hit else UNALIGNED}))
    return pref.model_copy(update={"probes": probes})


def spread(items: list[Any], size: int) -> list[Any]:
    """``size`` items evenly spaced over ``items`` (first and last kept, order kept; repeats when too few)."""
    if not items:
        raise ValueError("cannot pick from an empty list")
    if size == 1:
        return [items[0]]
    m = len(items)
    return [items[round(i * (m - 1) / (size - 1))] for i in range(size)]


def _fill(pool: list[str], n: int) -> list[str]:
    return [pool[i % len(pool)] for i in range(n)]


def build_train_record(
    pref: Preference,
    n_positive: int = 2,
    n_negative: int = 2,
    rank_list_size: int = 4,
    pool: str = "strict",
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """One authors'-format training record (without ``classification``) for a question, or ``None``.

    ``pool="strict"`` takes positives from aligned and negatives from unaligned passages only (the paper's D⁺/D⁻).
    Under the ``hit`` rule one closed-book answer is either right (only unaligned/both-correct possible) or wrong
    (only aligned/both-wrong possible), so no question has both; ``pool="graded"`` then fills the empty side from the
    next grade: missing positives ← both-correct passages, missing negatives ← both-wrong passages.

    Returns:
        ``(record, info)``: ``record`` has ``query``, ``rank_list``, ``positive``, ``negative`` (plus ``id``);
        ``info`` says why it was dropped (``"drop"``) or what was padded/removed.
    """
    check_group_sizes(n_positive, n_negative, rank_list_size)
    graded = graded_order(pref)
    probes = pref.probes
    aligned = sorted((p for p in probes if p.category == ALIGNED), key=lambda p: (-_delta(pref, p), p.rank))
    unaligned = sorted((p for p in probes if p.category == UNALIGNED), key=lambda p: (_delta(pref, p), p.rank))
    pos = list(dict.fromkeys(render_probe(p) for p in aligned))  # largest F1 gain first
    neg_all = list(dict.fromkeys(render_probe(p) for p in unaligned))  # largest F1 loss first
    info: dict[str, Any] = {"borrowed_positive": False, "borrowed_negative": False}
    if pool == "graded":
        if not pos and neg_all:
            pos = list(dict.fromkeys(render_probe(p) for p in graded if p.category == BOTH_CORRECT))
            info["borrowed_positive"] = bool(pos)
        if not neg_all and pos:
            neg_all = list(dict.fromkeys(render_probe(p) for p in graded if p.category == BOTH_WRONG))
            info["borrowed_negative"] = bool(neg_all)
    elif pool == "ranked":
        if not all(p.gain is not None for p in probes):
            raise ValueError(f"question {pref.id}: pool 'ranked' needs graded preferences (mine with loglik)")
        if len(graded) >= 2 and float(graded[0].gain) > float(graded[-1].gain):
            if not pos:
                pos = [render_probe(graded[0])]
                info["borrowed_positive"] = True
            if not neg_all:  # e.g. every probe aligned: the worst-gain one is the negative, not a positive
                worst = render_probe(graded[-1])
                neg_all = [worst]
                pos = [t for t in pos if t != worst] or pos
                info["borrowed_negative"] = True
    elif pool != "strict":
        raise ValueError(f"pool must be 'strict', 'graded' or 'ranked', got {pool!r}")
    neg = [t for t in neg_all if t not in set(pos)]
    info["conflicts"] = len(neg_all) - len(neg)
    if not pos or not neg:
        info["drop"] = "no_positive_nor_negative" if not (pos or neg) else "no_positive" if not pos else "no_negative"
        return None, info
    info["padded_positive"] = len(pos) < n_positive
    info["padded_negative"] = len(neg) < n_negative
    info["padded_rank_list"] = len(graded) < rank_list_size
    picks = spread(graded, rank_list_size)
    record = {
        "query": pref.question,
        "rank_list": [render_probe(p) for p in picks],
        "positive": _fill(pos, n_positive),
        "negative": _fill(neg, n_negative),
        "id": pref.id,
    }
    if pref.graded:
        record[GAINS_KEY] = [float(p.gain) for p in picks]
    if set(record["positive"]) & set(record["negative"]):  # cannot happen; guards future edits
        raise AssertionError(f"question {pref.id}: a passage is both positive and negative")
    return record, info


def assign_classification(records: list[dict[str, Any]], seed: int) -> None:
    """Give each record a ``classification`` in place: labels 1/2 balanced, their order shuffled with ``seed``."""
    labels = [1 + (i % 2) for i in range(len(records))]
    random.Random(seed).shuffle(labels)
    for rec, label in zip(records, labels, strict=True):
        text = rec["positive"][0] if label == 1 else rec["negative"][0]
        rec["classification"] = {"text": text, "label": label}


def build_pair_records(pref: Preference) -> list[dict[str, Any]]:
    """The valid/test pairs of a question: one per aligned (category 1) or unaligned (category 2) passage."""
    out, seen = [], set()
    cb = pref.closed_book
    for p in sorted(pref.probes, key=lambda p: p.rank):
        if p.category not in AUTHORS_CATEGORY:
            continue
        text = render_probe(p)
        if text in seen:
            continue
        seen.add(text)
        rec: dict[str, Any] = {"question": pref.question, "reference": list(pref.answers), "ctx": text}
        if cb.answer is not None and p.answer is not None:
            rec["before"] = {"answer": cb.answer, "em": int(cb.hit), "f1": float(cb.f1)}
            rec["after"] = {"answer": p.answer, "em": int(p.hit), "f1": float(p.f1)}
        rec.update({"category": AUTHORS_CATEGORY[p.category], "id": pref.id, "rank": p.rank})
        if p.gain is not None:
            rec["gain"] = float(p.gain)
        out.append(rec)
    return out


def build_list_record(pref: Preference) -> dict[str, Any] | None:
    """A held-out question's probed passages with their gains (retriever order), or ``None`` without gains."""
    probes = sorted(pref.probes, key=lambda p: p.rank)
    if not pref.graded or len(_distinct(probes)) < 2:
        return None
    ctxs = []
    for p in _distinct(probes):
        c = p.ctx
        ctxs.append({"id": c.id if "id" in c.model_fields_set else None, "title": c.title, "text": c.text,
                     "rank": p.rank, "gain": float(p.gain), "category": p.category,
                     "has_answer": c.has_answer})
    return {"id": pref.id, "question": pref.question, "answers": list(pref.answers), "ctxs": ctxs}


def _group_id(pref: Preference) -> str:
    return pref.origin_id or pref.id


def ordered_split(prefs: list[Preference], n_valid: int, n_test: int) -> dict[str, list[Preference]]:
    """The first ``n_valid`` question groups (an original with its rewrites; in order of first appearance) are valid,
    the next ``n_test`` test, the rest train.

    Raises:
        ValueError: fewer than ``n_valid + n_test + 1`` groups.
    """
    groups = list(dict.fromkeys(_group_id(p) for p in prefs))
    if len(groups) <= n_valid + n_test:
        raise ValueError(f"the ordered split holds out {n_valid} + {n_test} questions but there are only "
                         f"{len(groups)}: nothing is left to train on")
    where = {g: "valid" if i < n_valid else "test" if i < n_valid + n_test else "train" for i, g in enumerate(groups)}
    parts: dict[str, list[Preference]] = {s: [] for s in SPLITS}
    for p in prefs:
        parts[where[_group_id(p)]].append(p)
    return parts


def _order_train(rec: dict[str, Any]) -> dict[str, Any]:
    keys = ("query", "classification", "rank_list", GAINS_KEY, "positive", "negative", "id")
    return {k: rec[k] for k in keys if k in rec}


def run(cfg: RerankerDataConfig) -> RerankerDataOutputs:
    """Build ``train.jsonl``, ``valid.jsonl``, ``test.jsonl``, ``splits.json`` and ``stats.json``."""
    check_group_sizes(cfg.n_positive, cfg.n_negative, cfg.rank_list_size)
    out_dir = Path(cfg.out_dir)
    pref_path = resolve_preferences(cfg.preferences)
    rec = stage_recorder("build-reranker-data", cfg, out_dir, [pref_path, cfg.include_augmented])
    prefs = load_preferences(pref_path)
    if cfg.label_rule != "stored":
        prefs = relabel(prefs, cfg.label_rule)
    augmented, orphans = [], 0
    if cfg.include_augmented is not None:
        augmented, orphans = inherit_augmented(prefs, load_augmented(cfg.include_augmented))
    everything = prefs + augmented
    aug_ids = {a.id for a in augmented}
    fractions = [cfg.train_fraction, cfg.valid_fraction, cfg.test_fraction]
    if cfg.valid_questions is not None and cfg.test_questions is not None:
        parts = ordered_split(everything, cfg.valid_questions, cfg.test_questions)
    else:
        parts = dict(zip(SPLITS, split_by_group(everything, fractions, cfg.seed), strict=True))
    offered = len(parts["train"])
    if cfg.limit_train is not None:  # whole groups (an original with its rewrites), in split order
        keep = set(list(dict.fromkeys(_group_id(p) for p in parts["train"]))[: cfg.limit_train])
        parts["train"] = [p for p in parts["train"] if _group_id(p) in keep]
    if cfg.labels == "relevance":
        parts["train"] = [relevance_labels(p) for p in parts["train"]]

    graded = has_gains(prefs) or cfg.labels == "relevance"
    pool = cfg.pool if cfg.pool != "auto" else ("ranked" if graded else "strict")
    train_stats: Counter[str] = Counter()
    train: list[dict[str, Any]] = []
    for pref in parts["train"]:
        record, info = build_train_record(pref, cfg.n_positive, cfg.n_negative, cfg.rank_list_size, pool)
        train_stats["conflicts_removed"] += info["conflicts"]
        if record is None:
            train_stats[f"dropped_{info['drop']}"] += 1
            continue
        for key in _FLAGS:
            train_stats[key] += int(info[key])
        train.append(record)
    assign_classification(train, cfg.seed)
    train = [_order_train(r) for r in train]

    pairs: dict[str, list[dict[str, Any]]] = {}
    for split in ("valid", "test"):
        chosen = [p for p in parts[split] if cfg.augmented_in_eval or p.id not in aug_ids]
        pairs[split] = [pair for p in chosen for pair in build_pair_records(p)]

    lists: dict[str, list[dict[str, Any]]] = {}
    for split in ("valid", "test"):
        chosen = [p for p in parts[split] if p.id not in aug_ids]
        lists[split] = [r for r in (build_list_record(p) for p in chosen) if r is not None]

    out = RerankerDataOutputs.at(out_dir)
    write_jsonl(out.train, train)
    for split in ("valid", "test"):
        write_jsonl(getattr(out, split), pairs[split])
    list_outputs = []
    if graded:
        for split in ("valid", "test"):
            write_jsonl(getattr(out, f"{split}_lists"), lists[split])
            list_outputs.append(RerankerDataOutputs.FILES[f"{split}_lists"])
    # self-check: what we wrote loads with the authors' field names
    if train:
        load_reranker_train(out.train)
    for split in ("valid", "test"):
        if pairs[split]:
            load_reranker_pairs(getattr(out, split))
        else:
            logger.warning("%s.jsonl is empty (no aligned/unaligned pairs among its questions)", split)
    if not train:
        logger.warning("train.jsonl is empty: no train question has both an aligned and an unaligned passage")

    write_json(
        out.splits,
        {
            "seed": cfg.seed,
            "ordered": cfg.valid_questions is not None,
            "fractions": {"train": cfg.train_fraction, "valid": cfg.valid_fraction, "test": cfg.test_fraction},
            **{s: [p.id for p in parts[s]] for s in SPLITS},
        },
    )
    label_counts = Counter(r["classification"]["label"] for r in train)
    stats = {
        "label_rule": cfg.label_rule,
        "labels": cfg.labels,
        "train_questions_offered": offered,
        "pool": pool,
        "graded": graded,
        "held_out_lists": {s: len(lists[s]) for s in ("valid", "test")} if graded else None,
        "group_sizes": {
            "n_positive": cfg.n_positive, "n_negative": cfg.n_negative, "rank_list_size": cfg.rank_list_size
        },
        "questions": len(prefs),
        "augmented": len(augmented),
        "augmented_orphans": orphans,
        "split_questions": {s: len(parts[s]) for s in SPLITS},
        "train": {
            "kept": len(train),
            "dropped": {k[len("dropped_"):]: v for k, v in sorted(train_stats.items()) if k.startswith("dropped_")},
            "padded_positive": train_stats["padded_positive"],
            "padded_negative": train_stats["padded_negative"],
            "padded_rank_list": train_stats["padded_rank_list"],
            "borrowed_positive_from_both_correct": train_stats["borrowed_positive"],
            "borrowed_negative_from_both_wrong": train_stats["borrowed_negative"],
            "conflicts_removed": train_stats["conflicts_removed"],
            "classification_labels": {"1": label_counts.get(1, 0), "2": label_counts.get(2, 0)},
        },
        **{
            s: {
                "pairs": len(pairs[s]),
                "aligned": sum(p["category"] == 1 for p in pairs[s]),
                "unaligned": sum(p["category"] == 2 for p in pairs[s]),
            }
            for s in ("valid", "test")
        },
    }
    write_json(out.stats, stats)
    rec.finish(
        outputs=[TRAIN_FILE, VALID_FILE, TEST_FILE, SPLITS_FILE, STATS_FILE, *list_outputs],
        train=len(train),
        valid=len(pairs["valid"]),
        test=len(pairs["test"]),
    )
    logger.info("reranker data: %d train records, %d/%d valid/test pairs → %s",
                len(train), len(pairs["valid"]), len(pairs["test"]), out_dir)
    return out
