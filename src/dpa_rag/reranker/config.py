"""Configs of ``dpa-rag train-reranker`` and ``dpa-rag rerank`` (every field is a CLI option and a YAML key).

Every flag of the authors' README command (``--pretrained_model_path --train_data_path --valid_data_path
--test_data_path --gpu --outdir --tensorboard_log_dir --cls_loss --rank_loss --scl_loss``) is accepted as an extra
option name. ``--cls_loss/--rank_loss/--scl_loss`` switch the point/pair/contrastive losses: bare (their script's
``store_true``) or with ``True``/``False``. ``--gpu=N`` trains on GPU N; without that GPU, one warning and the CPU.
Their command without ``--pretrained_model_path`` trains their cross-encoder backbone (:data:`AUTHORS_BACKBONE`) when
it is in the local Hugging Face cache, else our default backbone (:func:`apply_authors_backbone`).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, Field, PrivateAttr, field_validator, model_validator

from dpa_rag.config import ConfigSection, DeviceOption, Runtime, StageConfig
from dpa_rag.data.loaders import dedupe_ids_field
from dpa_rag.models import DEFAULT_ENCODER
from dpa_rag.reranker.kinds import kind_names
from dpa_rag.reranker.losses.registry import align_loss_names, authors_flags, default_losses

__all__ = ["AUTHORS_BACKBONE", "RerankConfig", "TrainRerankerConfig", "apply_authors_backbone", "apply_gpu_flag",
           "parse_bool", "parse_loss_weights"]

AUTHORS_BACKBONE = "BAAI/bge-reranker-large"  # the authors' cross-encoder (their README: your/pretrained/bge/path)

_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}


def parse_bool(value: str | bool, name: str = "value") -> bool:
    """``True``/``False`` strings (any case, also 1/0, yes/no) → bool; anything else is a ``ValueError``."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{name}: expected True or False, got {value!r}")


def check_kind(value: str) -> str:
    """``auto`` or a registered reranker kind (:mod:`dpa_rag.reranker.kinds`)."""
    if value != "auto" and value not in kind_names():
        raise ValueError(f"reranker kind must be one of auto, {', '.join(kind_names())}; got {value!r}")
    return value


def parse_loss_weights(text: str) -> dict[str, float]:
    """``"point=1,pair=0.5,contrastive=0.5"`` → ``{"point": 1.0, ...}``."""
    out: dict[str, float] = {}
    for part in text.replace(";", ",").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"loss weights must look like point=1,pair=0.5; got {text!r}")
        out[name.strip()] = float(value)
    return out


class AlignmentSection(ConfigSection):
    """Preference alignment: which losses, how they are weighted, the contrastive loss's settings. The authors'
    ``--cls_loss/--rank_loss/--scl_loss`` switches are accepted aliases that edit ``losses``."""

    losses: list[str] = Field(
        default_factory=default_losses,
        description=f"Losses: {', '.join(align_loss_names())} (comma-separated or repeated; registered in "
        "reranker/losses/registry.py).",
    )
    weighting: Literal["mgda", "mgda-ub", "equal", "fixed"] = Field("mgda", description="Loss weighting strategy.")
    loss_weights: str | None = Field(None, description="Weights for --weighting fixed, e.g. point=1,pair=0.5.")
    contrastive_anchor: Literal["pairs", "query"] = Field(
        "pairs", description="Contrastive anchors: every pair representation (authors' code) or the query alone."
    )
    temperature: float = Field(0.07, gt=0, description="Contrastive temperature τ (= τ_base).")
    listwise_temperature: float = Field(
        1.0, gt=0, description="Listwise loss: T of its target distribution softmax(rank_gains / T) (smaller: more "
        "mass on the best-gain passage)."
    )

    @field_validator("losses", mode="before")
    @classmethod
    def _split_losses(cls, v: object) -> object:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            out: list[str] = []
            for item in v:
                out += [x for x in str(item).replace(",", " ").split() if x]
            bad = [x for x in out if x not in align_loss_names()]
            if bad:
                raise ValueError(f"unknown loss(es) {bad}; choose from {', '.join(align_loss_names())}")
            return list(dict.fromkeys(out))
        return v


class WarmupSection(ConfigSection):
    """The relevance warm-up before alignment (``reranker/warmup.py``); flat keys ``warmup_<name>``."""

    flat_prefix: ClassVar[str] = "warmup_"

    relevance: bool = Field(
        True, description="Relevance warm-up before alignment (needs --warmup-retrieval; skipped otherwise)."
    )
    retrieval: str | None = Field(
        None, description="Retrieval file (DPR-style, has_answer) of the training questions for the warm-up."
    )
    epochs: float = Field(1.0, gt=0, description="Epochs of the relevance warm-up.")
    lr: float = Field(2e-5, gt=0, description="Learning rate of the relevance warm-up.")
    negatives: int = Field(3, ge=1, description="Retrieved negatives per positive in the warm-up.")
    target: Literal["auto", "has-answer", "bi-encoder", "bm25"] = Field(
        "auto",
        description="What the cross-encoder's warm-up learns: has-answer = answer-bearing vs other passages of the "
        "reranker training questions (listwise CE); bi-encoder / bm25 = distilled, label-free: the teacher's order "
        "over every --warmup-retrieval list (listwise KL to softmax(teacher / --warmup-temperature); held-out "
        "--eval-retrieval questions excluded). auto = bi-encoder for an embedding backbone (e.g. the bundled "
        "MiniLM, or when --warmup-teacher is set), has-answer otherwise.",
    )
    teacher: str | None = Field(
        None, description="Distilled warm-up with bi-encoder: the teacher (sentence-transformers model: alias, hub "
        "id or folder; default: the backbone itself loaded as a bi-encoder).",
    )
    temperature: float | None = Field(
        None, gt=0, description="Distilled warm-up: teacher temperature T (default 0.05 for the bi-encoder's "
        "cosine, 1.0 for BM25 scores standardised within each list).",
    )
    list_size: int = Field(
        8, ge=2, description="Distilled warm-up: passages per list (the teacher's top half + random others).",
    )


class HeldOutSection(ConfigSection):
    """Held-out reports (answer ranking of ``eval_retrieval``'s held-out questions, utility lists) and the
    retriever-fusion weight chosen on them."""

    eval_retrieval: str | None = Field(
        None,
        description="Retrieval file of held-out questions (training questions in it are dropped): report MRR/hit@k "
        "vs the retriever order and the backbone, and choose the retriever-fusion weight.",
    )
    utility_valid: str | None = Field(
        None,
        description="Held-out lists with the reader's gains (build-reranker-data valid_lists.jsonl): scored at every "
        "evaluation (utility_ndcg@k, utility_mrr_aligned, utility_top1_gain; pick one with "
        "--metric-for-best-model).",
    )
    utility_test: str | None = Field(
        None,
        description="Held-out lists for the utility report (test_lists.jsonl; default: --utility-valid): retriever "
        "order, oracle, untrained model and the aligned reranker → utility_metrics.json and the model card.",
    )
    retriever_fusion: bool = Field(
        True,
        description="Choose a weight for blending the reranker score with the retriever rank on --eval-retrieval "
        "(0 = retriever order ... 1 = reranker), saved with the model and used by rerank/answer.",
    )


SECTIONS: dict[str, type[ConfigSection]] = {"alignment": AlignmentSection, "warmup": WarmupSection,
                                            "held_out": HeldOutSection}


def _authors_cli_options() -> dict[str, dict[str, Any]]:
    """The authors' loss switches as command-line options (not fields: aliases that edit ``alignment.losses``)."""
    return {flag: {"description": f"Authors' flag (bare or True/False) switches the {name} loss.",
                   "cli": [f"--{flag}"], "flag_value": "True"} for flag, name in authors_flags().items()}


def _fold(data: dict[str, Any]) -> dict[str, Any]:
    """Flat keys into their sections (flat wins over a nested value given with it), then the authors' switches into
    ``alignment.losses``: their script trains only the losses whose switch is given (``store_true``), so with a
    switch and no ``losses`` the list starts empty; with ``losses``, the switches add or remove single losses."""
    data = dict(data)
    for key, section in SECTIONS.items():
        flat = section.flat_keys()
        moved = {flat[k]: data.pop(k) for k in list(data) if k in flat}
        if moved:
            base = data.get(key) or {}
            base = base.model_dump() if isinstance(base, BaseModel) else dict(base)
            data[key] = {**base, **moved}
    switches = {f: data.pop(f) for f in list(authors_flags()) if f in data and data[f] is not None}
    for f in authors_flags():
        data.pop(f, None)
    if switches:
        align = data.get("alignment") or {}
        align = align.model_dump() if isinstance(align, BaseModel) else dict(align)
        given = AlignmentSection._split_losses(align["losses"]) if "losses" in align else []
        chosen = list(given)
        for flag, name in authors_flags().items():
            if flag in switches:
                on = parse_bool(switches[flag], f"--{flag}")
                if on and name not in chosen:
                    chosen.append(name)
                elif not on and name in chosen:
                    chosen.remove(name)
        data["alignment"] = {**align, "losses": chosen}
    return data


class TrainRerankerConfig(DeviceOption, StageConfig):
    """``dpa-rag train-reranker``: align a reranker with the reader's preferences (method.md §6).

    Top level: the files, the model, and the ``TrainingArguments`` fields (same names, passed on by
    :mod:`dpa_rag.reranker.training_args`); sections ``alignment``, ``warmup`` and ``held_out``, whose keys are also
    accepted flat (``losses``, ``warmup_lr``, ``eval_retrieval``: every older key and flag works); the authors'
    ``cls_loss/rank_loss/scl_loss`` switches are accepted aliases that edit ``alignment.losses``.
    """

    cli_options: ClassVar[dict[str, dict[str, Any]]] = _authors_cli_options()

    result_neutral: ClassVar[frozenset[str]] = frozenset({
        "per_device_eval_batch_size", "gpu", "save_minutes", "resume_from_checkpoint",
    })

    train: str | None = Field(
        None, description="Training file (authors' format: query, classification, rank_list, positive, negative).",
        json_schema_extra={"cli": ["--train_data_path"]},
    )
    valid: str | None = Field(
        None, description="Validation pairs (question, ctx, category); picks the best checkpoint.",
        json_schema_extra={"cli": ["--valid_data_path"]},
    )
    test: str | None = Field(
        None, description="Test pairs, evaluated with the best checkpoint → test_metrics.json.",
        json_schema_extra={"cli": ["--test_data_path"]},
    )
    out_dir: str = Field("runs/reranker", description="Output folder.", json_schema_extra={"cli": ["--outdir"]})
    tensorboard_log_dir: str | None = Field(
        None, description="TensorBoard folder (default: OUT_DIR/tensorboard).",
        json_schema_extra={"cli": ["--tensorboard_log_dir"]},
    )
    backbone: str = Field(
        DEFAULT_ENCODER, description="Encoder: bundled alias, hub id or folder (minilm: an embedding model, a "
        f"bi-encoder under --kind auto; {AUTHORS_BACKBONE}: the paper's cross-encoder).",
        json_schema_extra={"cli": ["--pretrained_model_path"]},
    )
    kind: str = Field(
        "auto",
        description=f"Reranker kind: auto, {', '.join(kind_names())}. auto = bi-encoder (scaled cosine, starts at "
        "the dense retriever's quality) for sentence-transformers embedding backbones such as the bundled MiniLM, "
        "cross-encoder for everything else "
        "(bge-reranker, ms-marco cross-encoders, plain encoders: the paper's choice).",
    )
    bi_scale: float = Field(20.0, gt=0, description="Bi-encoder: initial scale s of the cosine (learned).")
    head: Literal["single", "two-class"] = Field(
        "single", description="single = 1 relevance logit (CrossEncoder-compatible); two-class = the authors' head."
    )
    score: Literal["prob", "z1"] = Field("prob", description="Two-class inference score: softmax(z)_1 or z_1.")
    num_train_epochs: float = Field(
        10.0, gt=0, description="Training epochs.", validation_alias=AliasChoices("num_train_epochs", "epochs"),
        json_schema_extra={"cli": ["--epochs"]},
    )
    per_device_train_batch_size: int = Field(
        4, ge=1, description="Training records per step (per device).",
        validation_alias=AliasChoices("per_device_train_batch_size", "batch_size"),
        json_schema_extra={"cli": ["--batch-size"]},
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Steps to accumulate before an optimiser step.")
    learning_rate: float = Field(
        1e-5, gt=0, description="Learning rate (AdamW, eps 1e-6, weight decay 0).",
        validation_alias=AliasChoices("learning_rate", "lr"), json_schema_extra={"cli": ["--lr"]},
    )
    lr_scheduler_type: str = Field(
        "constant", description="LR scheduler (HF name: constant, linear, cosine, ...).",
        validation_alias=AliasChoices("lr_scheduler_type", "scheduler"), json_schema_extra={"cli": ["--scheduler"]},
    )
    warmup_steps: int = Field(0, ge=0, description="LR warm-up steps.", json_schema_extra={"cli": ["--warmup"]})
    max_grad_norm: float = Field(0.0, ge=0, description="Gradient clipping norm (0 = off, like the authors).")
    max_length: int = Field(512, ge=8, description="Max tokens of a (query, passage) pair.")
    max_steps: int | None = Field(None, description="Stop after this many optimiser steps (quick runs).")
    bf16: bool = Field(False, description="bf16 mixed precision.")
    seed: int = Field(42, description="Random seed.")
    gpu: int | None = Field(
        None, ge=0,
        description="Authors' flag: train on GPU N (the process sees only that GPU); without it, a warning and CPU.",
    )
    eval_strategy: Literal["epoch", "steps"] = Field("epoch", description="When to evaluate and checkpoint.")
    eval_steps: int = Field(500, ge=1, description="Evaluation/checkpoint interval with --eval-strategy steps.")
    metric_for_best_model: str = Field("f1", description="Validation metric that picks the best checkpoint.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the best one is always kept).")
    logging_steps: int = Field(1, ge=1, description="Log loss, per-loss values and weights every N steps.")
    per_device_eval_batch_size: int | None = Field(
        None, ge=1, description="Pairs per forward in evaluation (default: 16 on CPU, 64 on GPUs).",
        validation_alias=AliasChoices("per_device_eval_batch_size", "eval_batch_size"),
        json_schema_extra={"cli": ["--eval-batch-size"]},
    )
    forward_chunk_size: int | None = Field(
        None,
        ge=0,
        description="Rows per encoder forward in a training step, each chunk cut to its own padding (default: 4 on "
        "CPU, where small chunks stay in cache and run ~1.5x faster; one forward on GPUs; 0 = one forward).",
    )
    fast_dropout: bool | None = Field(
        None,
        description="Dropout masks from 16-bit slices of 64-bit random words, and attention dropout outside SDPA "
        "(default: on for CPU training, where it made a MiniLM step 5-14% faster in three runs on 2 cores; off on "
        "GPUs). Same drop probability and scaling; nothing of it is saved with the model.",
    )
    resume_from_checkpoint: str | None = Field(
        "auto", description="auto: resume from the newest complete checkpoint of the same config and inputs; "
        "never: start over; last: the newest checkpoint whatever wrote it; or a checkpoint folder."
    )
    save_minutes: float = Field(
        30.0, ge=0, description="Also checkpoint every N minutes of training (0: only on the --eval-strategy "
        "schedule; a SIGTERM/SIGINT always saves one)."
    )
    alignment: AlignmentSection = Field(default_factory=AlignmentSection, description="Preference alignment.")
    warmup: WarmupSection = Field(default_factory=WarmupSection, description="Relevance warm-up.")
    held_out: HeldOutSection = Field(default_factory=HeldOutSection, description="Held-out reports and fusion.")

    _kind = field_validator("kind")(classmethod(lambda cls, v: check_kind(v)))
    _authors_switches: bool = PrivateAttr(False)  # built with the authors' --cls_loss/--rank_loss/--scl_loss

    @model_validator(mode="wrap")
    @classmethod
    def _flat_keys(cls, data: object, handler: Any) -> Any:
        if not isinstance(data, dict):
            return handler(data)
        switched = any(data.get(f) is not None for f in authors_flags())
        cfg = handler(_fold(data))
        cfg._authors_switches = cfg._authors_switches or switched
        return cfg

    @property
    def authors_default_backbone(self) -> bool:
        """The authors' command (their loss switches) without a backbone (``--pretrained_model_path``)."""
        return self._authors_switches and "backbone" not in self.model_fields_set

    def __getattr__(self, name: str) -> Any:
        """The flat spelling of a section's field (``cfg.warmup_lr`` = ``cfg.warmup.lr``)."""
        for key, section in SECTIONS.items():
            field_name = section.flat_keys().get(name)
            if field_name is not None:
                return getattr(getattr(self, key), field_name)
        return super().__getattr__(name)  # type: ignore[misc]

    def enabled_losses(self) -> list[str]:
        """The losses to train (``alignment.losses``, the authors' switches applied), in registration order."""
        chosen = [x for x in align_loss_names() if x in self.alignment.losses]
        if not chosen:
            raise ValueError("no loss enabled (check --losses and --cls_loss/--rank_loss/--scl_loss)")
        return chosen


def apply_gpu_flag(cfg: TrainRerankerConfig) -> TrainRerankerConfig:
    """Resolve the authors' ``--gpu=N``: the process sees only GPU N (``CUDA_VISIBLE_DEVICES``, so the Trainer does
    not spread over the others) and trains on ``cuda``; without that GPU, one warning line and ``cpu``."""
    import os

    if cfg.gpu is None:
        return cfg
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not torch.cuda.is_initialized():
        ids = [x for x in visible.split(",") if x.strip()] if visible is not None else None
        if ids is None or cfg.gpu < len(ids):
            os.environ["CUDA_VISIBLE_DEVICES"] = ids[cfg.gpu] if ids is not None else str(cfg.gpu)
            if torch.cuda.is_available():
                return cfg.model_copy(update={"device": "cuda"})
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    elif cfg.gpu < torch.cuda.device_count():
        return cfg.model_copy(update={"device": f"cuda:{cfg.gpu}"})
    logging.getLogger(__name__).warning("--gpu=%d: no such GPU on this machine, training on the CPU", cfg.gpu)
    return cfg.model_copy(update={"device": "cpu"})


def apply_authors_backbone(cfg: TrainRerankerConfig) -> TrainRerankerConfig:
    """The authors' command without ``--pretrained_model_path``: their cross-encoder backbone
    (:data:`AUTHORS_BACKBONE`) when the local Hugging Face cache has it (no download, no network call); otherwise
    ``cfg`` unchanged (the bundled MiniLM, a bi-encoder under ``--kind auto``: training logs one line saying so)."""
    from dpa_rag.models import hub_cached

    if not cfg.authors_default_backbone or not hub_cached(AUTHORS_BACKBONE):
        return cfg
    logging.getLogger(__name__).info("the authors' command without --pretrained_model_path: training their "
                                     "cross-encoder backbone %s (found in the Hugging Face cache)", AUTHORS_BACKBONE)
    return cfg.model_copy(update={"backbone": AUTHORS_BACKBONE})


class RerankConfig(Runtime, StageConfig):
    """``dpa-rag rerank``: rescore a retrieval file with a reranker and keep the top-k."""

    result_neutral: ClassVar[frozenset[str]] = frozenset({"batch_size"})

    input: str = Field(..., description="DPR-style retrieval file (question, answers, ctxs).")
    model: str = Field(..., description="Reranker: a train-reranker model/ folder, CrossEncoder checkpoint or alias.")
    out_dir: str = Field("runs/rerank", description="Output folder (reranked.jsonl).")
    top_k: int = Field(3, ge=1, description="Passages kept per question.")
    batch_size: int | None = Field(None, ge=1, description="Pairs per forward (default: 16 on CPU, 64 on GPUs).")
    max_length: int = Field(512, ge=8, description="Max tokens of a pair.")
    score: Literal["prob", "z1"] | None = Field(None, description="Two-class score (default: saved with the model).")
    fusion: str = Field(
        "saved",
        description="Blend in the retriever rank: saved (weight chosen at training), off, or a reranker weight 0-1.",
    )
    kind: str = Field(
        "auto", description=f"Reranker kind: auto (detected from the model folder), {', '.join(kind_names())}."
    )
    records_per_chunk: int = Field(64, ge=1, description="Questions scored together (bounds memory).")
    dedupe_ids: bool = dedupe_ids_field()
    limit: int | None = Field(None, description="Only the first N questions.")

    _kind = field_validator("kind")(classmethod(lambda cls, v: check_kind(v)))

    @field_validator("fusion", mode="before")
    @classmethod
    def _check_fusion(cls, v: object) -> str:
        from dpa_rag.reranker.fusion import normalize_fusion

        return normalize_fusion(v)  # YAML reads `off` as False and `0.3` as a float
