"""What every retriever shares: the :class:`Retriever` protocol, deterministic top-k, the text that gets indexed.

A retriever maps query strings to ranked ``(passage_idx, score)`` lists, where ``passage_idx`` is the position of the
passage in the index's ``passages.jsonl``. Ranking is always *score descending, then passage index ascending*, so
equal scores never reorder between runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from dpa_rag.data.schema import Passage

__all__ = ["Hit", "Retriever", "doc_text", "sort_hits", "top_k_desc"]

Hit = tuple[int, float]
"""One search result: ``(passage_idx, score)``."""


@runtime_checkable
class Retriever(Protocol):
    """Anything that ranks the passages of an index for a batch of queries.

    Attributes:
        passages: the index's passages; ``passage_idx`` in the results points into this list.
    """

    passages: list[Passage]

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        """Rank passages for each query; at most ``top_k`` ``(passage_idx, score)`` pairs each, best first."""
        ...


def doc_text(passage: Passage) -> str:
    """The text indexed for a passage (BM25 and dense alike): the title on its own line, then the text."""
    title = passage.title.strip()
    return f"{title}\n{passage.text.strip()}" if title else passage.text.strip()


def sort_hits(hits: Sequence[Hit]) -> list[Hit]:
    """Sort by score descending, then passage index ascending (deterministic tie-breaking)."""
    return sorted(((int(i), float(s)) for i, s in hits), key=lambda h: (-h[1], h[0]))


def top_k_desc(scores: np.ndarray, k: int) -> list[Hit]:
    """The ``k`` best entries of a score vector, deterministic on ties (lower index first).

    Runs in O(n) plus O(k log k): a partial selection, then an exact sort of the survivors. Among entries tied with
    the k-th best score, the lowest indices are kept.

    Args:
        scores: one score per passage (1-D).
        k: how many to return; clamped to ``len(scores)``.
    """
    scores = np.asarray(scores)
    n = scores.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return []
    if k < n:
        part = np.argpartition(-scores, k - 1)[:k]
        kth = scores[part].min()
        above = np.flatnonzero(scores > kth)
        tied = np.flatnonzero(scores == kth)[: k - len(above)]
        idx = np.concatenate([above, tied])
    else:
        idx = np.arange(n)
    order = np.lexsort((idx, -scores[idx]))
    idx = idx[order]
    return [(int(i), float(scores[i])) for i in idx]
