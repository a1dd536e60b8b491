"""What every reranker loss declares: the rows it needs in a batch and how it reads the encoder's output.

A training batch is built by a kind's collator from :class:`~dpa_rag.data.reranker_records.RerankerTrainRecord` s. Each
enabled loss adds its own ``(query, passage)`` rows (:meth:`RerankerLoss.add_rows`, through a :class:`RowBuilder`
that deduplicates and marks one group of rows per forward), then turns the row positions into index tensors of the
batch (:meth:`RerankerLoss.index_tensors`); in the step it reads its slice of the fused forward's
:class:`~dpa_rag.reranker.model.EncodeOutput` (``logits`` and ``reps``, one row per pair) and returns its value
(:meth:`RerankerLoss.compute`). ``step.py``, the collators and the weighting loop over loss objects only.

A loss that needs whole lists with gains (a listwise loss) adds one row per list item and an index matrix with a
mask and the gains; one that needs a new kind of row (the query alone) adds it with ``rows.add(query, None)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["LossOptions", "RerankerLoss", "RowBuilder", "index_matrix"]


@dataclass(frozen=True)
class LossOptions:
    """The settings a loss may read when it is built from a config (:meth:`RerankerLoss.from_options`)."""

    num_labels: int = 1
    temperature: float = 0.07
    base_temperature: float = 0.07
    contrastive_anchor: str = "pairs"
    pair_margin: float = 0.0
    query_anchor: bool = False  # collation: also encode each query alone
    warmup_temperature: float = 1.0
    listwise_temperature: float = 1.0


class RowBuilder:
    """The rows of one batch, in the order the losses add them (group-major): ``add(query, passage)`` returns a
    row position (identical pairs share a row with ``dedupe``); :meth:`end_group` closes one group of rows (one
    forward in the authors' separate passes)."""

    def __init__(self, dedupe: bool = True, options: LossOptions | None = None) -> None:
        self.dedupe = dedupe
        self.options = options or LossOptions()
        self.texts: list[tuple[str, str | None]] = []
        self.bounds: list[tuple[int, int]] = []
        self._seen: dict[tuple[str, str | None], int] = {}
        self._start = 0

    def add(self, query: str, passage: str | None) -> int:
        key = (query, passage)
        if self.dedupe and key in self._seen:
            return self._seen[key]
        self.texts.append(key)
        self._seen.setdefault(key, len(self.texts) - 1)
        return len(self.texts) - 1

    def end_group(self) -> None:
        self.bounds.append((self._start, len(self.texts)))
        self._start = len(self.texts)


def index_matrix(lists: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Left-aligned ``[B, L]`` long indices and bool mask of ragged lists."""
    width = max((len(x) for x in lists), default=0)
    idx = torch.zeros(len(lists), width, dtype=torch.long)
    mask = torch.zeros(len(lists), width, dtype=torch.bool)
    for i, x in enumerate(lists):
        idx[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = True
    return idx, mask


Remap = Callable[[list[int]], list[int]]


class RerankerLoss(nn.Module):
    """Base class of the reranker's losses (an ``nn.Module``; ``forward`` takes plain tensors and validates them).

    Subclasses set :attr:`name` to their registered name (:mod:`dpa_rag.reranker.losses.registry`) and implement
    :meth:`forward`, :meth:`from_options`, :meth:`compute` and, for alignment losses, :meth:`add_rows` and
    :meth:`index_tensors`.
    """

    name: ClassVar[str] = ""
    uses_logits: ClassVar[bool] = True  # reads the score head (else only ``reps``: DDP freezes the head)

    @classmethod
    def from_options(cls, options: LossOptions) -> RerankerLoss:
        return cls()

    @classmethod
    def check_record(cls, record: Any) -> str | None:
        """Why ``record`` cannot feed this loss (``None``: it can)."""
        return None

    @classmethod
    def add_rows(cls, records: Sequence[Any], rows: RowBuilder) -> dict[str, Any]:
        """Add this loss's rows for ``records``; returns its plan (row positions, labels) for :meth:`index_tensors`."""
        raise NotImplementedError(f"{cls.__name__} builds no rows from training records")

    @classmethod
    def index_tensors(cls, plan: dict[str, Any], remap: Remap) -> dict[str, Tensor]:
        """The batch entries of this loss; ``remap`` maps row positions to the batch's rows."""
        raise NotImplementedError(f"{cls.__name__} builds no rows from training records")

    def compute(self, out: Any, batch: dict[str, Any]) -> Tensor:
        """This loss's value from the encoder's output ``out`` and the batch."""
        raise NotImplementedError

    def get_config_dict(self) -> dict[str, Any]:
        return {}
