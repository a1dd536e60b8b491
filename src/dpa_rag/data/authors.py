"""Former name of :mod:`dpa_rag.data.reranker_records` (the reranker's records in the authors' format), kept so
older imports keep working."""

from __future__ import annotations

from dpa_rag.data.reranker_records import (
    AnswerScore,
    Classification,
    RerankerPairRecord,
    RerankerTrainRecord,
    load_reranker_pairs,
    load_reranker_train,
)

__all__ = ["AnswerScore", "Classification", "RerankerPairRecord", "RerankerTrainRecord", "load_reranker_pairs",
           "load_reranker_train"]
