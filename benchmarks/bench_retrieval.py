"""Retrieval benchmark on real NQ data: index build time, queries/s and answer hit@k for BM25, dense and hybrid.

Corpus: the gold passages of ``lost-in-the-middle/nq-open-oracle.jsonl.gz`` (one per question, deduplicated) plus the
1,000 random Wikipedia passages of ``flashrag/wiki_sample_corpus.jsonl``. Questions: the first ``--n-questions``
lost-in-the-middle questions (each has its gold passage in the pool). hit@k = a passage among the top k contains a
gold answer (DPR ``has_answer``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--n-questions", type=int, default=300)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    threads = os.environ.get("OMP_NUM_THREADS")
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    print(f"# reproduce: {env}.venv/bin/python benchmarks/bench_retrieval.py {' '.join(sys.argv[1:])}".rstrip())
    logging.basicConfig(level=logging.WARNING)

    import torch

    from dpa_rag.data.loaders import load_corpus, load_questions
    from dpa_rag.retrieval import BM25Retriever, DenseRetriever, HybridRetriever, retrieval_metrics, retrieve_questions

    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}, dtype: {args.dtype}")
    lim = args.data / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz"
    wiki = args.data / "flashrag" / "wiki_sample_corpus.jsonl"
    passages = load_corpus([lim, wiki])
    questions = load_questions(lim, limit=args.n_questions)
    print(f"corpus: {len(passages)} passages; questions: {len(questions)}; top_k: {args.top_k}")

    t = time.perf_counter()
    bm25 = BM25Retriever.build(passages, show_progress=False)
    dt = time.perf_counter() - t
    print(f"index build bm25 : {dt:7.1f} s  ({len(passages) / dt:,.0f} passages/s)")
    t = time.perf_counter()
    dense = DenseRetriever.build(passages, encoder=args.encoder, batch_size=args.batch_size, device=args.device,
                                 dtype=args.dtype, show_progress=False)
    dt = time.perf_counter() - t
    print(f"index build dense: {dt:7.1f} s  ({len(passages) / dt:,.0f} passages/s, {args.encoder}, incl. model load)")
    retrievers = {"bm25": bm25, "dense": dense, "hybrid": HybridRetriever([bm25, dense], fusion_depth=args.top_k)}
    print(f"{'method':8s} {'queries/s':>10s} {'hit@1':>7s} {'hit@5':>7s} {'hit@20':>7s} {'mrr':>7s}")
    for method, retriever in retrievers.items():
        t = time.perf_counter()
        records = retrieve_questions(retriever, questions, args.top_k, batch_size=args.batch_size, progress=False)
        dt = time.perf_counter() - t
        m = retrieval_metrics(records, args.top_k)
        print(f"{method:8s} {len(questions) / dt:10.1f} {m['hit@1']:7.3f} {m['hit@5']:7.3f} {m['hit@20']:7.3f} "
              f"{m['mrr']:7.3f}")


if __name__ == "__main__":
    main()
