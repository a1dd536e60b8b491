"""The cross-encoder reranker: any HF encoder with a sequence-classification head.

Two heads (method.md §6.1, §12 #9):

* ``single`` (default): one relevance logit (``num_labels=1``). The saved folder is a plain
  ``AutoModelForSequenceClassification`` checkpoint that ``sentence_transformers.CrossEncoder``, FlagEmbedding's
  ``FlagReranker`` and ``rerankers.Reranker`` load as is. Point-wise loss: BCE-with-logits; ranking score: the logit.
* ``two-class``: the authors' aligned/unaligned head (``num_labels=2``; label 1 = aligned). Point-wise loss: CE;
  ranking score during training: ``z_1`` (the raw aligned logit, as in the authors' code); inference score:
  ``softmax(z)_1`` by default or ``z_1`` (method.md §12 #12).

The model is built with ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=…)``: a checkpoint's
pretrained head is kept when its shape fits, a new one is created otherwise; the hidden size always comes from the
model config. :func:`encode_pairs` runs the encoder once with ``output_hidden_states=True`` and returns the logits,
the first-token (CLS) representations for the contrastive loss and the last hidden-state tensor(s) (the shared
representation that ``mgda-ub`` differentiates against).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dpa_rag.models import resolve_encoder

__all__ = [
    "CROSS_ENCODER_GUARD",
    "HEADS",
    "SCORE_MODES",
    "EncodeOutput",
    "encode_pairs",
    "head_of",
    "inference_scores",
    "load_reranker_model",
    "ranking_scores",
    "shared_parameters",
    "unwrap_model",
]

logger = logging.getLogger(__name__)

CROSS_ENCODER_GUARD = {
    "activation_fn": "torch.nn.dpa_rag_bi_encoder_reranker__load_with_SentenceTransformer_not_CrossEncoder",
}
"""Written by :class:`~dpa_rag.reranker.biencoder.BiEncoderReranker` to a saved bi-encoder's ``config.json`` as
``sentence_transformers``. A sentence-transformers folder loaded by ``CrossEncoder`` gets a new, random classification
head (it scores every pair about 0.5, with only a "Converting" log line); ``CrossEncoder`` imports this activation
from its config (a ``torch.`` path is trusted) and fails with an ``ImportError`` naming it. ``SentenceTransformer``,
``AutoModel`` and the hub ignore the key; an explicit ``CrossEncoder(path, activation_fn=...)`` still loads the folder,
and the cross-encoder kind drops the key from a backbone (:func:`load_reranker_model`)."""

HEADS = ("single", "two-class")
SCORE_MODES = ("prob", "z1", "logit")
Head = Literal["single", "two-class"]

# Key under which dpa-rag stores its head/score settings in the saved ``config.json``.
CONFIG_KEY = "dpa_rag"


def load_reranker_model(
    backbone: str,
    head: Head = "single",
    score: Literal["prob", "z1"] = "prob",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` for reranker training from a bundled alias, hub id or local folder.

    Args:
        backbone: ``minilm`` (bundled), a hub id or a folder with an HF encoder (with or without a head).
        head: ``single`` (1 logit) or ``two-class`` (aligned/unaligned, the authors' head).
        score: inference score of the two-class head: ``prob`` = softmax(z)_1, ``z1`` = the raw aligned logit.
        dtype: weights dtype (default fp32; use mixed precision for bf16 training).

    Raises:
        ValueError: an unknown head or score mode.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if score not in ("prob", "z1"):
        raise ValueError(f"score must be 'prob' or 'z1', got {score!r}")
    path = resolve_encoder(backbone)
    num_labels = 1 if head == "single" else 2
    config = AutoConfig.from_pretrained(path)
    had_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    kwargs: dict[str, Any] = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    if head == "two-class":
        kwargs["id2label"] = {0: "unaligned", 1: "aligned"}
        kwargs["label2id"] = {"unaligned": 0, "aligned": 1}
    else:
        kwargs["id2label"] = {0: "relevance"}
        kwargs["label2id"] = {"relevance": 0}
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype or torch.float32, **kwargs)
    if getattr(model.config, "sentence_transformers", None) == CROSS_ENCODER_GUARD:  # a bi-encoder folder as backbone
        del model.config.sentence_transformers
    setattr(model.config, CONFIG_KEY, {"head": head, "score": score if head == "two-class" else "logit"})
    tokenizer = AutoTokenizer.from_pretrained(path)
    logger.info(
        "reranker backbone %s: %s, hidden %d, head %s (%s)",
        backbone,
        type(model).__name__,
        model.config.hidden_size,
        head,
        "pretrained head kept where shapes fit" if had_head else "new head",
    )
    return model, tokenizer


def head_of(model: nn.Module) -> Head:
    """``single`` or ``two-class`` from the model config (``num_labels``)."""
    n = int(model.config.num_labels)
    if n == 1:
        return "single"
    if n == 2:
        return "two-class"
    raise ValueError(f"a reranker needs num_labels 1 or 2, the model has {n}")


def ranking_scores(logits: Tensor) -> Tensor:
    """Training-time ranking score ``s``: the logit (1-logit head) or ``z_1`` (two-class head), shape ``[N]``."""
    if logits.ndim != 2 or logits.shape[1] not in (1, 2):
        raise ValueError(f"expected logits of shape [N, 1] or [N, 2], got {tuple(logits.shape)}")
    return logits[:, -1]


def inference_scores(logits: Tensor, score: str = "prob") -> Tensor:
    """Inference score per pair: the logit (1 label), ``softmax(z)_1`` (``prob``) or ``z_1`` (``z1``) for 2 labels."""
    if logits.ndim != 2 or logits.shape[1] not in (1, 2):
        raise ValueError(f"expected logits of shape [N, 1] or [N, 2], got {tuple(logits.shape)}")
    logits = logits.float()
    if logits.shape[1] == 1:
        return logits[:, 0]
    if score == "prob":
        return torch.softmax(logits, dim=-1)[:, 1]
    if score in ("z1", "logit"):
        return logits[:, 1]
    raise ValueError(f"score must be one of {SCORE_MODES}, got {score!r}")


def shared_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the shared encoder (embeddings + layers), head and pooler excluded (method.md §6.3)."""
    base = getattr(model, "base_model", model)
    if base is model:
        raise ValueError("the model has no separate base encoder (expected a *ForSequenceClassification model)")
    return [p for n, p in base.named_parameters() if p.requires_grad and "pooler" not in n.split(".")]


@dataclass
class EncodeOutput:
    """What one fused forward returns, rows in the batch's pair order.

    Attributes:
        logits: ``[N, num_labels]``.
        reps: first-token (CLS) vectors of the last layer, ``[N, hidden]``.
        hidden: the last hidden-state tensor of each forward chunk (one tensor without chunking): the shared
            representation ``mgda-ub`` takes gradients against.
        parts: with one forward per group, each group's own output (``bounds`` = its rows); losses then read
            the parts they need, so a loss's gradient does not run back through the other groups' forwards.
    """

    logits: Tensor
    reps: Tensor
    hidden: list[Tensor]
    parts: list[EncodeOutput] | None = None
    bounds: list[tuple[int, int]] | None = None

    def take(self, field: str, idx: Tensor, mask: Tensor | None = None) -> Tensor:
        """``getattr(self, field)[idx]``, built from only the parts that the (unmasked) indices fall in."""
        if self.parts is None or self.bounds is None:
            return getattr(self, field)[idx]
        valid = idx[mask] if mask is not None else idx.reshape(-1)
        needed = [k for k, (s, e) in enumerate(self.bounds) if bool(((valid >= s) & (valid < e)).any())]
        if not needed:
            raise ValueError("no valid row indices")
        local = torch.zeros(self.logits.shape[0], dtype=torch.long, device=idx.device)
        offset = 0
        for k in needed:
            s, e = self.bounds[k]
            local[s:e] = torch.arange(offset, offset + e - s, device=idx.device)
            offset += e - s
        tensors = [getattr(self.parts[k], field) for k in needed]
        base = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        return base[local[idx]]  # masked (padding) positions map to some needed row; the losses ignore them


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside data-parallel wrappers (``DistributedDataParallel``, ``DataParallel``, a DeepSpeed engine,
    ``torch.compile``): what has ``config`` and ``get_input_embeddings``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or (
            type(model).__name__ == "DeepSpeedEngine" and hasattr(model, "module")
        ):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# model types whose embedding layer treats ``inputs_embeds`` exactly as the looked-up ``input_ids`` (no scaling; the
# positions of right-padded rows are the same), so a chunked step can look tokens up once (see :func:`encode_pairs`)
_EMBEDS_ONCE = frozenset({"bert", "roberta", "xlm-roberta", "electra"})


def encode_pairs(model: nn.Module, batch: dict[str, Any], chunk_size: int | None = None) -> EncodeOutput:
    """Run the encoder over every sequence of ``batch`` and return logits, CLS reps and last hidden states.

    Args:
        model: a ``*ForSequenceClassification`` model.
        batch: ``input_ids``/``attention_mask`` (and ``token_type_ids`` where the model has them), rows sorted by
            length (longest first) by the collator.
        chunk_size: ``None`` = one forward; otherwise forwards of at most this many rows, each cut to its own
            longest sequence (the rows are length-sorted, so this removes most padding).
    """
    inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch and batch[k] is not None}
    n = inputs["input_ids"].shape[0]
    step = n if not chunk_size or chunk_size >= n else chunk_size
    core = unwrap_model(model)  # DDP / DeepSpeed wrappers have no ``config``; the forward still runs through ``model``
    if step < n and getattr(getattr(core, "config", None), "model_type", None) in _EMBEDS_ONCE:
        # one token-embedding lookup for the whole batch: its backward then builds the (vocab x hidden) gradient
        # once per step instead of once per chunk
        inputs["inputs_embeds"] = core.get_input_embeddings()(inputs.pop("input_ids"))
    logits, reps, hidden = [], [], []
    for start in range(0, n, step):
        part = {k: v[start : start + step] for k, v in inputs.items()}
        if step < n:
            width = int(part["attention_mask"].sum(dim=1).max().item())
            part = {k: v[:, :width] for k, v in part.items()}
        out = model(**part, output_hidden_states=True, return_dict=True)
        last = out.hidden_states[-1]
        logits.append(out.logits)
        reps.append(last[:, 0])
        hidden.append(last)
    if len(logits) == 1:
        return EncodeOutput(logits[0], reps[0], hidden)
    return EncodeOutput(torch.cat(logits), torch.cat(reps), hidden)
