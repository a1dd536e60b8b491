"""Training data for the reranker: validated authors'-format records and the fused-batch collator.

One training step needs, per record, the classification pair, the rank-list pairs, the positive and negative pairs
(and, for the query-anchored contrastive variant, the query alone). :class:`FusedCollator` puts *all* of them in one
tokenised batch so the encoder runs once (method.md §6.1 has four passes):

1. pairs are laid out group-major (point, rank, positive, negative, query) and identical ``(query, passage)`` pairs
   are encoded once (``dedupe``; in the authors' data the classification passage is always ``positive[0]`` or
   ``negative[0]``);
2. the tokenizer runs once (truncation ``longest_first``, ``max_length``), padding is dynamic;
3. rows are sorted by token length, longest first (stable), so a chunked forward (``forward_chunk_size``) pads each
   chunk only to its own length; index tensors map every loss input to its row, so nothing needs un-permuting.

Without ``sort``/``dedupe`` the layout is the plain group-major one and ``group_bounds`` marks each group's rows; the
reference implementation of the authors' separate passes uses it (:func:`dpa_rag.reranker.step.compute_losses`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from dpa_rag.data.authors import RerankerTrainRecord
from dpa_rag.io import DataError
from dpa_rag.reranker.losses import LOSS_NAMES

__all__ = ["FusedCollator", "RerankerTrainDataset", "check_train_records"]

logger = logging.getLogger(__name__)

GROUPS = ("point", "rank", "positive", "negative", "query")


def check_train_records(
    records: Sequence[RerankerTrainRecord], losses: Sequence[str], source: str = "train data"
) -> list[RerankerTrainRecord]:
    """Check that every record has what the enabled losses need; raise :class:`DataError` naming the record.

    ``pair`` needs ≥ 2 ``rank_list`` passages; ``contrastive`` needs ≥ 1 positive and ≥ 1 negative.
    """
    for i, rec in enumerate(records, start=1):
        if "pair" in losses and len(rec.rank_list) < 2:
            raise DataError(
                f"{source}: record {i}: the pair-wise loss needs ≥ 2 rank_list passages, got {len(rec.rank_list)}"
            )
        if "contrastive" in losses and (not rec.positive or not rec.negative):
            raise DataError(
                f"{source}: record {i}: the contrastive loss needs ≥ 1 positive and ≥ 1 negative, "
                f"got {len(rec.positive)} and {len(rec.negative)}"
            )
    return list(records)


class RerankerTrainDataset(Dataset):
    """A list of :class:`RerankerTrainRecord` as a map-style dataset (items are the records themselves)."""

    def __init__(self, records: Sequence[RerankerTrainRecord]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> RerankerTrainRecord:
        return self.records[i]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _index_matrix(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(x) for x in lists), default=0)
    idx = torch.zeros(len(lists), width, dtype=torch.long)
    mask = torch.zeros(len(lists), width, dtype=torch.bool)
    for i, x in enumerate(lists):
        idx[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = True
    return idx, mask


class FusedCollator:
    """Collate records into one tokenised batch for all enabled losses.

    Args:
        tokenizer: the cross-encoder's tokenizer.
        losses: enabled losses (``point``, ``pair``, ``contrastive``).
        max_length: truncation length of a (query, passage) pair.
        query_anchor: also encode each query alone (query-anchored contrastive variant).
        sort: sort rows by token length (longest first).
        dedupe: encode identical (query, passage) pairs once.
        pad_to_multiple_of: round the padded width up (e.g. 8 for tensor cores).

    Returns (from ``__call__``) a dict with ``input_ids``, ``attention_mask`` (+ ``token_type_ids``), and the row
    indices of each loss input: ``point_idx [B]``/``point_labels [B]`` (1 aligned, 0 unaligned), ``rank_idx``/
    ``rank_mask [B, L]``, ``con_idx``/``con_labels``/``con_mask [B, n]`` (positives then negatives), ``query_idx [B]``;
    ``group_bounds`` (row ranges per group), ``grouped`` (True without sort/dedupe: only then are the bounds valid)
    and ``n_pairs``.
    """

    def __init__(
        self,
        tokenizer: Any,
        losses: Sequence[str],
        max_length: int = 512,
        query_anchor: bool = False,
        sort: bool = True,
        dedupe: bool = True,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        unknown = set(losses) - set(LOSS_NAMES)
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty subset of {', '.join(LOSS_NAMES)}; got {list(losses)}")
        self.tokenizer = tokenizer
        self.losses = tuple(losses)
        self.max_length = max_length
        self.query_anchor = query_anchor and "contrastive" in losses
        self.sort = sort
        self.dedupe = dedupe
        self.pad_to_multiple_of = pad_to_multiple_of

    def _texts(self, records: Sequence[RerankerTrainRecord]) -> tuple[list[tuple[str, str | None]], dict[str, Any]]:
        """Group-major list of (text, pair) plus, per record, the positions of its loss inputs in that list."""
        texts: list[tuple[str, str | None]] = []
        seen: dict[tuple[str, str | None], int] = {}

        def add(q: str, d: str | None) -> int:
            key = (q, d)
            if self.dedupe and key in seen:
                return seen[key]
            texts.append(key)
            seen.setdefault(key, len(texts) - 1)
            return len(texts) - 1

        layout: dict[str, Any] = {"bounds": {}}
        start = 0
        if "point" in self.losses:
            layout["point"] = [add(r.query, r.classification.text) for r in records]
            layout["labels"] = [1 if r.classification.label == 1 else 0 for r in records]
            layout["bounds"]["point"], start = (start, len(texts)), len(texts)
        if "pair" in self.losses:
            layout["rank"] = [[add(r.query, d) for d in r.rank_list] for r in records]
            layout["bounds"]["rank"], start = (start, len(texts)), len(texts)
        if "contrastive" in self.losses:
            pos = [[add(r.query, d) for d in r.positive] for r in records]
            layout["bounds"]["positive"], start = (start, len(texts)), len(texts)
            neg = [[add(r.query, d) for d in r.negative] for r in records]
            layout["bounds"]["negative"], start = (start, len(texts)), len(texts)
            layout["con"] = [p + n for p, n in zip(pos, neg, strict=False)]
            layout["con_labels"] = [[1] * len(p) + [0] * len(n) for p, n in zip(pos, neg, strict=False)]
            if self.query_anchor:
                layout["query"] = [add(r.query, None) for r in records]
                layout["bounds"]["query"] = (start, len(texts))
        return texts, layout

    def _tokenize(self, texts: list[tuple[str, str | None]]) -> list[dict[str, list[int]]]:
        feats: list[dict[str, list[int]] | None] = [None] * len(texts)
        pair_pos = [i for i, (_, d) in enumerate(texts) if d is not None]
        single_pos = [i for i, (_, d) in enumerate(texts) if d is None]
        for positions, pairs in ((pair_pos, True), (single_pos, False)):
            if not positions:
                continue
            a = [texts[i][0] for i in positions]
            b = [texts[i][1] for i in positions] if pairs else None
            enc = self.tokenizer(a, b, truncation="longest_first" if pairs else True, max_length=self.max_length)
            keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc]
            for j, i in enumerate(positions):
                feats[i] = {k: enc[k][j] for k in keys}
        return feats  # type: ignore[return-value]

    def __call__(self, records: Sequence[RerankerTrainRecord]) -> dict[str, Any]:
        if not records:
            raise ValueError("FusedCollator got an empty batch")
        texts, layout = self._texts(records)
        feats = self._tokenize(texts)
        n = len(feats)
        order = list(range(n))
        if self.sort:
            order.sort(key=lambda i: -len(feats[i]["input_ids"]))  # stable: ties keep group-major order
        row_of = [0] * n
        for row, i in enumerate(order):
            row_of[i] = row
        rows = [feats[i] for i in order]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch: dict[str, Any] = {"input_ids": _pad([f["input_ids"] for f in rows], pad_id)}
        batch["attention_mask"] = _pad([[1] * len(f["input_ids"]) for f in rows], 0)
        if "token_type_ids" in rows[0]:
            batch["token_type_ids"] = _pad([f["token_type_ids"] for f in rows], 0)
        if self.pad_to_multiple_of:
            width = batch["input_ids"].shape[1]
            extra = -width % self.pad_to_multiple_of
            if extra:
                for k in ("input_ids", "attention_mask", "token_type_ids"):
                    if k in batch:
                        fill = pad_id if k == "input_ids" else 0
                        batch[k] = torch.nn.functional.pad(batch[k], (0, extra), value=fill)

        def remap(lists: list[list[int]]) -> list[list[int]]:
            return [[row_of[i] for i in x] for x in lists]

        if "point" in layout:
            batch["point_idx"] = torch.tensor([row_of[i] for i in layout["point"]], dtype=torch.long)
            batch["point_labels"] = torch.tensor(layout["labels"], dtype=torch.long)
        if "rank" in layout:
            batch["rank_idx"], batch["rank_mask"] = _index_matrix(remap(layout["rank"]))
        if "con" in layout:
            batch["con_idx"], batch["con_mask"] = _index_matrix(remap(layout["con"]))
            batch["con_labels"], _ = _index_matrix(layout["con_labels"])
        if "query" in layout:
            batch["query_idx"] = torch.tensor([row_of[i] for i in layout["query"]], dtype=torch.long)
        batch["group_bounds"] = [list(v) for v in layout["bounds"].values()]
        batch["grouped"] = not self.sort and not self.dedupe  # group_bounds are valid: per-group passes possible
        batch["n_pairs"] = n
        return batch
