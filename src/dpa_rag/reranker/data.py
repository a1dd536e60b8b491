"""Training data for the reranker: validated authors'-format records and the fused-batch collator.

One training step needs, per record, the classification pair, the rank-list pairs, the positive and negative pairs
(and, for the query-anchored contrastive variant, the query alone). :class:`FusedCollator` puts *all* of them in one
tokenised batch so the encoder runs once (method.md §6.1 has four passes):

1. every enabled loss adds its rows (:meth:`~dpa_rag.reranker.losses.base.RerankerLoss.add_rows`), group-major in
   the registry's order (point; rank list; positives, negatives, query alone), and identical ``(query, passage)`` pairs
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

from dpa_rag.data.reranker_records import RerankerTrainRecord
from dpa_rag.io import DataError
from dpa_rag.reranker.losses.base import LossOptions, RowBuilder
from dpa_rag.reranker.losses.registry import loss_classes

__all__ = ["FusedCollator", "RerankerTrainDataset", "check_train_records"]

logger = logging.getLogger(__name__)

def check_train_records(
    records: Sequence[RerankerTrainRecord], losses: Sequence[Any], source: str = "train data"
) -> list[RerankerTrainRecord]:
    """Check that every record has what the enabled losses need (each loss's ``check_record``); raise
    :class:`DataError` naming the record (the pair-wise loss needs ≥ 2 ``rank_list`` passages, the contrastive one ≥ 1
    positive and ≥ 1 negative)."""
    classes = loss_classes(losses)
    for i, rec in enumerate(records, start=1):
        for cls in classes:
            problem = cls.check_record(rec)
            if problem:
                raise DataError(f"{source}: record {i}: {problem}")
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


class FusedCollator:
    """Collate records into one tokenised batch for all enabled losses.

    Args:
        tokenizer: the cross-encoder's tokenizer.
        losses: enabled losses (registered names, e.g. ``point``, ``pair``, ``contrastive``, or loss classes).
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
        self.loss_classes = loss_classes(losses)
        self.tokenizer = tokenizer
        self.losses = tuple(cls.name for cls in self.loss_classes)
        self.max_length = max_length
        self.query_anchor = query_anchor
        self.sort = sort
        self.dedupe = dedupe
        self.pad_to_multiple_of = pad_to_multiple_of

    def rows(self, records: Sequence[RerankerTrainRecord]) -> tuple[RowBuilder, dict[str, Any]]:
        """Every enabled loss adds its rows (group-major, in registration order); returns the rows and each loss's
        plan (:meth:`~dpa_rag.reranker.losses.base.RerankerLoss.add_rows`)."""
        rows = RowBuilder(dedupe=self.dedupe, options=LossOptions(query_anchor=self.query_anchor))
        plans = {cls.name: cls.add_rows(records, rows) for cls in self.loss_classes}
        return rows, plans

    def index_tensors(self, plans: dict[str, Any], row_of: Sequence[int]) -> dict[str, Any]:
        """Every loss's index tensors, row positions mapped to the batch's rows by ``row_of``."""
        out: dict[str, Any] = {}
        for cls in self.loss_classes:
            out.update(cls.index_tensors(plans[cls.name], lambda xs: [row_of[i] for i in xs]))
        return out

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
        built, plans = self.rows(records)
        feats = self._tokenize(built.texts)
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

        batch.update(self.index_tensors(plans, row_of))
        batch["group_bounds"] = [list(b) for b in built.bounds]
        batch["grouped"] = not self.sort and not self.dedupe  # group_bounds are valid: per-group passes possible
        batch["n_pairs"] = n
        return batch
