"""Configs of ``dpa-rag train-reranker`` and ``dpa-rag rerank`` (every field is a CLI option and a YAML key).

Every flag of the authors' README command (``--pretrained_model_path --train_data_path --valid_data_path
--test_data_path --gpu --outdir --tensorboard_log_dir --cls_loss --rank_loss --scl_loss``) is accepted as an extra
option name. ``--cls_loss/--rank_loss/--scl_loss`` switch the point/pair/contrastive losses: bare (their script's
``store_true``) or with ``True``/``False``. ``--gpu=N`` trains on GPU N; without that GPU, one warning and the CPU.
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from dpa_rag.config import DeviceOption, Runtime, StageConfig
from dpa_rag.data.loaders import dedupe_ids_field
from dpa_rag.models import DEFAULT_ENCODER
from dpa_rag.reranker.loss_names import LOSS_NAMES

__all__ = ["RerankConfig", "TrainRerankerConfig", "apply_gpu_flag", "parse_bool", "parse_loss_weights"]

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


class TrainRerankerConfig(DeviceOption, StageConfig):
    """``dpa-rag train-reranker``: align a cross-encoder with the reader's preferences (method.md §6)."""

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
    cls_loss: str | None = Field(None, description="Authors' flag (bare or True/False) switches the point-wise loss.",
                                 json_schema_extra={"cli": ["--cls_loss"], "flag_value": "True"})
    rank_loss: str | None = Field(None, description="Authors' flag (bare or True/False) switches the pair-wise loss.",
                                  json_schema_extra={"cli": ["--rank_loss"], "flag_value": "True"})
    scl_loss: str | None = Field(None, description="Authors' flag (bare or True/False) switches the contrastive loss.",
                                 json_schema_extra={"cli": ["--scl_loss"], "flag_value": "True"})
    losses: list[str] = Field(
        default_factory=lambda: list(LOSS_NAMES),
        description=f"Losses: {', '.join(LOSS_NAMES)} (comma-separated or repeated).",
    )
    weighting: Literal["mgda", "mgda-ub", "equal", "fixed"] = Field("mgda", description="Loss weighting strategy.")
    loss_weights: str | None = Field(None, description="Weights for --weighting fixed, e.g. point=1,pair=0.5.")
    backbone: str = Field(
        DEFAULT_ENCODER, description="Encoder: bundled alias, hub id or folder.",
        json_schema_extra={"cli": ["--pretrained_model_path"]},
    )
    kind: Literal["auto", "cross-encoder", "bi-encoder"] = Field(
        "auto",
        description="Reranker kind: auto = bi-encoder (scaled cosine, starts at the dense retriever's quality) for "
        "sentence-transformers embedding backbones such as the bundled MiniLM, cross-encoder for everything else "
        "(bge-reranker, ms-marco cross-encoders, plain encoders: the paper's choice).",
    )
    bi_scale: float = Field(20.0, gt=0, description="Bi-encoder: initial scale s of the cosine (learned).")
    head: Literal["single", "two-class"] = Field(
        "single", description="single = 1 relevance logit (CrossEncoder-compatible); two-class = the authors' head."
    )
    score: Literal["prob", "z1"] = Field("prob", description="Two-class inference score: softmax(z)_1 or z_1.")
    contrastive_anchor: Literal["pairs", "query"] = Field(
        "pairs", description="Contrastive anchors: every pair representation (authors' code) or the query alone."
    )
    temperature: float = Field(0.07, gt=0, description="Contrastive temperature τ (= τ_base).")
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
    warmup_relevance: bool = Field(
        True, description="Relevance warm-up before alignment (needs --warmup-retrieval; skipped otherwise)."
    )
    warmup_retrieval: str | None = Field(
        None, description="Retrieval file (DPR-style, has_answer) of the training questions for the warm-up."
    )
    warmup_epochs: float = Field(1.0, gt=0, description="Epochs of the relevance warm-up.")
    warmup_lr: float = Field(2e-5, gt=0, description="Learning rate of the relevance warm-up.")
    warmup_negatives: int = Field(3, ge=1, description="Retrieved negatives per positive in the warm-up.")
    warmup_target: Literal["auto", "has-answer", "bi-encoder", "bm25"] = Field(
        "auto",
        description="What the cross-encoder's warm-up learns: has-answer = answer-bearing vs other passages of the "
        "reranker training questions (listwise CE); bi-encoder / bm25 = distilled, label-free: the teacher's order "
        "over every --warmup-retrieval list (listwise KL to softmax(teacher / --warmup-temperature); held-out "
        "--eval-retrieval questions excluded). auto = bi-encoder for an embedding backbone (e.g. the bundled "
        "MiniLM, or when --warmup-teacher is set), has-answer otherwise.",
    )
    warmup_teacher: str | None = Field(
        None, description="Distilled warm-up with bi-encoder: the teacher (sentence-transformers model: alias, hub "
        "id or folder; default: the backbone itself loaded as a bi-encoder).",
    )
    warmup_temperature: float | None = Field(
        None, gt=0, description="Distilled warm-up: teacher temperature T (default 0.05 for the bi-encoder's "
        "cosine, 1.0 for BM25 scores standardised within each list).",
    )
    warmup_list_size: int = Field(
        8, ge=2, description="Distilled warm-up: passages per list (the teacher's top half + random others).",
    )
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

    @field_validator("losses", mode="before")
    @classmethod
    def _split_losses(cls, v: object) -> object:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            out: list[str] = []
            for item in v:
                out += [x for x in str(item).replace(",", " ").split() if x]
            bad = [x for x in out if x not in LOSS_NAMES]
            if bad:
                raise ValueError(f"unknown loss(es) {bad}; choose from {', '.join(LOSS_NAMES)}")
            return list(dict.fromkeys(out))
        return v

    @field_validator("cls_loss", "rank_loss", "scl_loss")
    @classmethod
    def _bool_string(cls, v: str | None) -> str | None:
        if v is not None:
            parse_bool(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _authors_switches(cls, data: object) -> object:
        """Their script trains only the losses whose switch is given (``store_true``): with any of the three flags
        and no ``losses``, start from none, so ``--cls_loss --scl_loss`` trains point + contrastive."""
        flags = {"cls_loss": "point", "rank_loss": "pair", "scl_loss": "contrastive"}
        if isinstance(data, dict) and "losses" not in data and any(data.get(f) is not None for f in flags):
            chosen = []
            for flag, name in flags.items():
                try:
                    if data.get(flag) is not None and parse_bool(data[flag]):
                        chosen.append(name)
                except ValueError:
                    pass  # reported by _bool_string
            data = {**data, "losses": chosen}
        return data

    def enabled_losses(self) -> list[str]:
        """The losses to train: ``losses``, switched on/off by the authors' flags where given."""
        chosen = list(self.losses)
        for flag, name in ((self.cls_loss, "point"), (self.rank_loss, "pair"), (self.scl_loss, "contrastive")):
            if flag is None:
                continue
            if parse_bool(flag) and name not in chosen:
                chosen.append(name)
            elif not parse_bool(flag) and name in chosen:
                chosen.remove(name)
        chosen = [x for x in LOSS_NAMES if x in chosen]
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
    kind: Literal["auto", "cross-encoder", "bi-encoder"] = Field(
        "auto", description="Reranker kind (auto: detected from the model folder)."
    )
    records_per_chunk: int = Field(64, ge=1, description="Questions scored together (bounds memory).")
    dedupe_ids: bool = dedupe_ids_field()
    limit: int | None = Field(None, description="Only the first N questions.")

    @field_validator("fusion", mode="before")
    @classmethod
    def _check_fusion(cls, v: object) -> str:
        from dpa_rag.reranker.fusion import normalize_fusion

        return normalize_fusion(v)  # YAML reads `off` as False and `0.3` as a float
