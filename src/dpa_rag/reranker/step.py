"""One training step's losses from one fused forward (or, as a reference, from the authors' separate passes).

:func:`compute_losses` runs :func:`~dpa_rag.reranker.model.encode_pairs` once over a :class:`FusedCollator` batch and
slices the outputs per loss; :func:`build_losses` makes the loss modules from the config. With ``separate=True`` the
batch (collated with ``sort=False, dedupe=False``) is encoded group by group, each group padded to its own length:
the authors' four passes (method.md §6.1), kept for tests and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from dpa_rag.reranker.losses import LOSS_NAMES, ContrastiveLoss, PairwiseLoss, PointwiseLoss
from dpa_rag.reranker.model import EncodeOutput, encode_pairs

__all__ = ["build_losses", "compute_losses", "losses_from_outputs"]


def build_losses(
    losses: Sequence[str],
    num_labels: int,
    temperature: float = 0.07,
    base_temperature: float = 0.07,
    contrastive_anchor: str = "pairs",
    pair_margin: float = 0.0,
) -> dict[str, nn.Module]:
    """Loss modules by name, in the canonical order point, pair, contrastive (:data:`LOSS_NAMES`)."""
    out: dict[str, nn.Module] = {}
    for name in LOSS_NAMES:
        if name not in losses:
            continue
        if name == "point":
            out[name] = PointwiseLoss(num_labels=num_labels)
        elif name == "pair":
            out[name] = PairwiseLoss(margin=pair_margin)
        else:
            out[name] = ContrastiveLoss(temperature, base_temperature, anchor=contrastive_anchor)  # type: ignore[arg-type]
    unknown = set(losses) - set(out)
    if unknown or not out:
        raise ValueError(f"losses must be a non-empty subset of {', '.join(LOSS_NAMES)}; got {list(losses)}")
    return out


def losses_from_outputs(out: EncodeOutput, batch: dict[str, Any], modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Slice the fused forward's logits and CLS vectors into each loss's inputs and evaluate the losses."""
    res: dict[str, Tensor] = {}
    if "point" in modules:
        res["point"] = modules["point"](out.take("logits", batch["point_idx"]), batch["point_labels"])
    if "pair" in modules:
        logits = out.take("logits", batch["rank_idx"], batch["rank_mask"])  # [B, L, C]
        res["pair"] = modules["pair"](logits[..., -1], batch["rank_mask"])  # s = the logit or z_1
    if "contrastive" in modules:
        loss = modules["contrastive"]
        feats = out.take("reps", batch["con_idx"], batch["con_mask"])
        query = None
        if getattr(loss, "anchor", "pairs") == "query":
            if "query_idx" not in batch:
                raise ValueError("the query-anchored contrastive loss needs a batch collated with query_anchor=True")
            query = out.take("reps", batch["query_idx"])
        res["contrastive"] = loss(feats, batch["con_labels"], batch["con_mask"], query_features=query)
    return res


def compute_losses(
    model: nn.Module,
    batch: dict[str, Any],
    modules: dict[str, nn.Module],
    chunk_size: int | None = None,
    separate: bool = False,
) -> tuple[dict[str, Tensor], EncodeOutput]:
    """Encode the batch and return ``({loss name: value}, encoder outputs)``.

    Args:
        model: the cross-encoder.
        batch: a :class:`~dpa_rag.reranker.data.FusedCollator` batch.
        modules: loss modules from :func:`build_losses`.
        chunk_size: rows per forward (``None`` or 0 = one forward; with ``separate``, per group).
        separate: one forward per group (``group_bounds``), each cut to its own padding: the authors' layout.
    """
    if "text_input_ids" in batch:  # a BiEncoderCollator batch
        from dpa_rag.reranker.biencoder import encode_bi, encode_bi_groups

        if separate and not batch.get("grouped", False):
            raise ValueError("separate passes need a batch collated with BiEncoderCollator(grouped=True)")
        out = encode_bi_groups(model, batch, chunk_size) if separate else encode_bi(model, batch, chunk_size)
        return losses_from_outputs(out, batch, modules), out
    if separate:
        if not batch.get("grouped", False):
            raise ValueError("separate passes need a batch collated with FusedCollator(sort=False, dedupe=False)")
        out = _encode_groups(model, batch, chunk_size)
    else:
        out = encode_pairs(model, batch, chunk_size=chunk_size)
    return losses_from_outputs(out, batch, modules), out


def _encode_groups(model: nn.Module, batch: dict[str, Any], chunk_size: int | None = None) -> EncodeOutput:
    import torch

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
