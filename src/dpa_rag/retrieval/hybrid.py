"""Hybrid retrieval by reciprocal-rank fusion (RRF; Cormack, Clarke & Büttcher, SIGIR 2009).

``score(d) = Σ_lists w_l / (k + rank_l(d))`` with 1-based ranks; a passage missing from a list gets nothing from it.
Ties are broken by the best (smallest) rank the passage reached in any list, then by passage index, so the fused
order is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

from dpa_rag.data.schema import Passage
from dpa_rag.retrieval.base import Hit, Retriever

__all__ = ["HybridRetriever", "rrf_fuse"]


def rrf_fuse(
    rankings: Sequence[Sequence[int]],
    k: int = 60,
    top_k: int | None = None,
    weights: Sequence[float] | None = None,
) -> list[Hit]:
    """Fuse ranked lists of passage indices by reciprocal rank.

    Args:
        rankings: one list per retriever, best first; an index repeated within a list counts at its first position.
        k: the RRF constant (60 in the original paper); larger values flatten the rank discount.
        top_k: keep this many (all when ``None``).
        weights: one weight per list (default all 1).

    Returns:
        ``(passage_idx, fused_score)`` pairs, best first.
    """
    if k < 0:
        raise ValueError(f"rrf k must be >= 0, got {k}")
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} weights for {len(rankings)} rankings")
    score: dict[int, float] = {}
    best: dict[int, int] = {}
    for ranking, w in zip(rankings, weights, strict=True):
        seen: set[int] = set()
        for rank, idx in enumerate(ranking, start=1):
            idx = int(idx)
            if idx in seen:
                continue
            seen.add(idx)
            score[idx] = score.get(idx, 0.0) + w / (k + rank)
            best[idx] = min(best.get(idx, rank), rank)
    fused = sorted(score, key=lambda i: (-score[i], best[i], i))
    if top_k is not None:
        fused = fused[:top_k]
    return [(i, score[i]) for i in fused]


class HybridRetriever:
    """Runs several retrievers and fuses their rankings with :func:`rrf_fuse`.

    Args:
        retrievers: retrievers over the *same* passages (e.g. BM25 and dense from one index folder).
        rrf_k: the RRF constant.
        fusion_depth: candidates each retriever contributes (raised to ``top_k`` when smaller).
        weights: one weight per retriever (default all 1).
    """

    def __init__(
        self,
        retrievers: Sequence[Retriever],
        rrf_k: int = 60,
        fusion_depth: int = 100,
        weights: Sequence[float] | None = None,
    ) -> None:
        if not retrievers:
            raise ValueError("a hybrid retriever needs at least one retriever")
        n = {len(r.passages) for r in retrievers}
        if len(n) != 1:
            raise ValueError(f"retrievers cover different passage lists (sizes {sorted(n)})")
        self.retrievers = list(retrievers)
        self.passages: list[Passage] = self.retrievers[0].passages
        self.rrf_k = rrf_k
        self.fusion_depth = fusion_depth
        self.weights = weights

    def search(self, queries: Sequence[str], top_k: int) -> list[list[Hit]]:
        """Each retriever fetches ``max(fusion_depth, top_k)`` candidates; fused and cut to ``top_k``."""
        depth = max(self.fusion_depth, top_k)
        per_retriever = [r.search(queries, depth) for r in self.retrievers]
        out = []
        for qi in range(len(queries)):
            rankings = [[i for i, _ in results[qi]] for results in per_retriever]
            out.append(rrf_fuse(rankings, k=self.rrf_k, top_k=top_k, weights=self.weights))
        return out
