"""The cross-encoder kind (the paper's): ``AutoModelForSequenceClassification`` over ``(query, passage)`` pairs with a
1-logit (CrossEncoder-compatible) or the authors' two-class head (:mod:`dpa_rag.reranker.model`); batches from
:class:`~dpa_rag.reranker.data.FusedCollator`; saved with ``save_pretrained`` plus the tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpa_rag.reranker.data import FusedCollator
from dpa_rag.reranker.kinds.base import RerankerKind
from dpa_rag.reranker.model import EncodeOutput, encode_pairs, load_reranker_model, shared_parameters

__all__ = ["CrossEncoderKind"]


def _encode_groups(model: nn.Module, batch: dict[str, Any], chunk_size: int | None = None) -> EncodeOutput:
    parts, bounds = [], []
    for start, end in batch["group_bounds"]:
        if end <= start:
            continue
        inputs = {k: batch[k][start:end] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        width = int(inputs["attention_mask"].sum(dim=1).max().item())
        parts.append(encode_pairs(model, {k: v[:, :width] for k, v in inputs.items()}, chunk_size=chunk_size))
        bounds.append((start, end))
    return EncodeOutput(
        torch.cat([p.logits for p in parts]),
        torch.cat([p.reps for p in parts]),
        [h for p in parts for h in p.hidden],
        parts=parts,
        bounds=bounds,
    )


def _pad(rows: list[list[int]], value: int, device: torch.device) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def predict_cross_logits(model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int,
                         max_length: int = 512) -> Tensor:
    """Logits of ``(query, passage)`` pairs: tokenised once, sorted by length (stable), length-bucketed forwards of
    ``batch_size`` under ``inference_mode``, returned in input order; identical pairs are scored once."""
    n_labels = int(model.config.num_labels)
    if not pairs:
        return torch.zeros(0, n_labels)
    pairs = [(str(q), str(d)) for q, d in pairs]
    unique = list(dict.fromkeys(pairs))
    if len(unique) < len(pairs):  # identical pairs are scored once, so they tie exactly
        where = {p: i for i, p in enumerate(unique)}
        logits = predict_cross_logits(model, tokenizer, unique, batch_size, max_length)
        return logits[torch.tensor([where[p] for p in pairs], dtype=torch.long)]
    device = next(model.parameters()).device
    enc = tokenizer([q for q, _ in pairs], [d for _, d in pairs], truncation="longest_first", max_length=max_length)
    ids = enc["input_ids"]
    types = enc.get("token_type_ids")
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # stable
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.empty(len(ids), n_labels, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = {
                    "input_ids": _pad([ids[i] for i in idx], pad_id, device),
                    "attention_mask": _pad([[1] * len(ids[i]) for i in idx], 0, device),
                }
                if types is not None:
                    batch["token_type_ids"] = _pad([types[i] for i in idx], 0, device)
                logits = model(**batch).logits
                out[torch.tensor(idx)] = logits.float().cpu()
    finally:
        model.train(was_training)
    return out


class CrossEncoderKind(RerankerKind):
    """``(query, passage)`` pairs through one encoder and a classification head (method.md §6)."""

    name = "cross-encoder"

    def load_for_training(self, cfg: Any) -> tuple[nn.Module, Any]:
        return load_reranker_model(cfg.backbone, cfg.head, cfg.score)

    def load(self, path: str, device: str, dtype: Any, max_length: int,
             score: str | None) -> tuple[nn.Module, Any, str, dict[str, Any]]:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpa_rag.models import resolve_encoder

        folder = resolve_encoder(path)
        model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=dtype).to(device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        n = int(model.config.num_labels)
        if n not in (1, 2):
            raise ValueError(f"{path}: a reranker needs 1 or 2 labels, the model has {n}")
        saved = getattr(model.config, "dpa_rag", None) or {}
        return model, tokenizer, score or saved.get("score") or ("logit" if n == 1 else "prob"), saved

    def save(self, trainer: Any, model: nn.Module, tokenizer: Any, model_dir: Path, main: bool) -> None:
        trainer.save_model(str(model_dir))  # every process (ZeRO-3 gathers the weights); the main one writes
        if main:
            tokenizer.save_pretrained(str(model_dir))

    def collator(self, tokenizer: Any, losses: Sequence[Any], max_length: int, query_anchor: bool = False,
                 grouped: bool = False) -> FusedCollator:
        return FusedCollator(tokenizer, losses, max_length, query_anchor=query_anchor, sort=not grouped,
                             dedupe=not grouped)

    def encode(self, model: nn.Module, batch: dict[str, Any], chunk_size: int | None = None,
               separate: bool = False) -> EncodeOutput:
        if not separate:
            return encode_pairs(model, batch, chunk_size=chunk_size)
        if not batch.get("grouped", False):
            raise ValueError("separate passes need a batch collated with FusedCollator(sort=False, dedupe=False)")
        return _encode_groups(model, batch, chunk_size)

    def freeze_unreached(self, model: nn.Module, losses: Sequence[Any]) -> list[str]:
        """Without a loss that reads the logits, the head and pooler get no gradient: frozen."""
        if any(loss.uses_logits for loss in losses):
            return []
        shared = {id(p) for p in shared_parameters(model)}
        out = []
        for n, p in model.named_parameters():
            if id(p) not in shared and p.requires_grad:
                p.requires_grad_(False)
                out.append(n)
        return out

    def predict_logits(self, model: nn.Module, tokenizer: Any, pairs: Sequence[tuple[str, str]], batch_size: int,
                       max_length: int) -> Tensor:
        return predict_cross_logits(model, tokenizer, pairs, batch_size, max_length)

    def card_fields(self, head: str) -> dict[str, str]:
        single = head == "single"
        return {
            "pipeline_tag": "text-ranking",
            "tag": "cross-encoder",
            "description": "A cross-encoder ",
            "head_line": f"- head: `{head}` "
                         f"({'1 relevance logit' if single else 'aligned/unaligned, label 1 = aligned'})\n",
            "st_class": "CrossEncoder",
            "loads_with": "`sentence_transformers.CrossEncoder`, `AutoModelForSequenceClassification`, "
                          "`dpa_rag.reranker.Reranker`",
            "loader": ('model = CrossEncoder("path/to/model")  # 1 logit; predict() applies a sigmoid\n' if single else
                       'model = CrossEncoder("path/to/model")  # 2 logits; aligned = index 1 (apply_softmax=True)\n'),
        }
