"""Retrieval: BM25 (bm25s), dense (sentence-transformers + faiss) and hybrid (reciprocal-rank fusion).

Stages: ``dpa-rag index`` (:mod:`dpa_rag.retrieval.index`) builds an index folder that carries its own passages;
``dpa-rag retrieve`` (:mod:`dpa_rag.retrieval.retrieve`) writes DPR-style top-k files. Other stages search an index
with :func:`load_retriever` (``retriever.search(queries, top_k) -> [[(passage_idx, score), ...], ...]``).
"""

from __future__ import annotations

from dpa_rag.retrieval.base import Hit, Retriever, doc_text, top_k_desc
from dpa_rag.retrieval.bm25 import BM25Retriever
from dpa_rag.retrieval.dense import DenseRetriever, encode, load_encoder
from dpa_rag.retrieval.hybrid import HybridRetriever, rrf_fuse
from dpa_rag.retrieval.index import Index, IndexConfig, build_index, load_index, load_retriever
from dpa_rag.retrieval.retrieve import RetrieveConfig, retrieval_metrics, retrieve_questions

__all__ = [
    "BM25Retriever",
    "DenseRetriever",
    "Hit",
    "HybridRetriever",
    "Index",
    "IndexConfig",
    "RetrieveConfig",
    "Retriever",
    "build_index",
    "doc_text",
    "encode",
    "load_encoder",
    "load_index",
    "load_retriever",
    "retrieval_metrics",
    "retrieve_questions",
    "rrf_fuse",
    "top_k_desc",
]
