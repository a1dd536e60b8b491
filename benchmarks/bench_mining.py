"""Mining throughput: batched vs one-at-a-time, and a fully cached re-run, with the real bundled reader.

Builds a small retrieval file from lost-in-the-middle NQ questions (each: its gold passage plus other questions'
gold passages, gold at a varying rank), then runs ``dpa-rag mine`` four ways:

1. batched (``chunk_size`` = all questions, ``batch_size`` = --batch-size), fresh generation cache;
2. one at a time (``chunk_size`` = 1, ``batch_size`` = 1), fresh generation cache;
3. cached re-run: preferences deleted, generation cache of run 1 kept (every prompt is a cache hit; model loaded);
   (the one-at-a-time run goes first and an untimed one-question warm-up precedes both, so order does not favour
   batching)
4. finished re-run: nothing deleted (served from preferences.jsonl; the model is never loaded).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_mining.py --n 16 --n-ctxs 2 --max-new-tokens 12
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dpa_rag.data.loaders import load_retrieval
from dpa_rag.io import write_jsonl
from dpa_rag.mining.mine import MineConfig, run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATA = SHARED / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz"


def build_retrieval(src: Path, n: int, n_ctxs: int, out: Path) -> Path:
    recs = load_retrieval(src, limit=n)
    rows = []
    for i, r in enumerate(recs):
        fillers = [recs[(i + j) % len(recs)].ctxs[0] for j in range(1, n_ctxs)]
        ctxs = list(fillers)
        ctxs.insert(i % n_ctxs, r.ctxs[0])  # gold at rank 1, 2, 3, … in turn
        rows.append({"id": r.id, "question": r.question, "answers": r.answers,
                     "ctxs": [c.model_dump(mode="json", exclude_none=True) for c in ctxs]})
    write_jsonl(out, rows)
    return out


def timed(cfg: MineConfig) -> tuple[float, dict]:
    t = time.perf_counter()
    run(cfg)
    dt = time.perf_counter() - t
    return dt, json.loads((cfg.out_dir / "stats.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=16, help="questions")
    ap.add_argument("--n-ctxs", type=int, default=4, help="passages per question (all probed)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--backend", default="hf")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--skip-sequential", action="store_true", help="skip the slow one-at-a-time run")
    args = ap.parse_args()
    threads = os.environ.get("OMP_NUM_THREADS", "")
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    print(f"reproduce: {env}.venv/bin/python benchmarks/bench_mining.py " + " ".join(sys.argv[1:]))

    work = Path(tempfile.mkdtemp(prefix="bench-mining-"))
    try:
        retrieval = build_retrieval(args.data, args.n, args.n_ctxs, work / "retrieval.jsonl")
        common = {"retrieval": retrieval, "backend": args.backend, "model": args.model, "device": args.device,
                  "max_new_tokens": args.max_new_tokens, "ranks": list(range(1, args.n_ctxs + 1)), "progress": False}
        prompts = args.n * (1 + args.n_ctxs)
        print(f"{args.n} questions × {1 + args.n_ctxs} prompts = {prompts} reader prompts, model {args.model}, "
              f"backend {args.backend}, device {args.device}, max_new_tokens {args.max_new_tokens}")
        batched = MineConfig(**common, out_dir=work / "batched", cache_dir=work / "cache-b",
                             batch_size=args.batch_size, chunk_size=args.n)
        runs = [("batched", batched)]
        if not args.skip_sequential:  # run first: the batched run must not profit from a warmer machine
            runs.insert(0, ("one-at-a-time", MineConfig(**common, out_dir=work / "seq", cache_dir=work / "cache-s",
                                                        batch_size=1, chunk_size=1)))
        # warm-up (not timed): model files in the page cache, bundled model converted once
        warm = MineConfig(**{**common, "ranks": [1]}, out_dir=work / "warm", cache_dir=work / "cache-w", limit=1)
        run(warm)
        results = {}
        for name, cfg in runs:
            results[name] = timed(cfg)
        (work / "batched" / "preferences.jsonl").unlink()
        (work / "batched" / "progress.json").unlink()
        results["cached re-run"] = timed(batched)
        results["finished re-run"] = timed(batched)
        head = ("run", "seconds", "questions/s", "reader calls", "calls/s", "cache hits")
        print("{:18s} {:>8s} {:>12s} {:>13s} {:>8s} {:>10s}".format(*head))
        for name, (dt, stats) in results.items():
            calls = stats["calls"]
            print(f"{name:18s} {dt:8.2f} {args.n / dt:12.2f} {calls:13d} {calls / dt:8.2f} {stats['cache_hits']:10d}")
        if "one-at-a-time" in results:
            print(f"speed-up batched vs one-at-a-time: {results['one-at-a-time'][0] / results['batched'][0]:.2f}x")
        if "one-at-a-time" in results:
            a, b = (work / "batched" / "preferences.jsonl"), (work / "seq" / "preferences.jsonl")
            print(f"batched and one-at-a-time preferences identical: {a.read_bytes() == b.read_bytes()}")
        stats = results["batched"][1]
        print("categories (batched):", json.dumps(stats["overall"]["counts"]),
              f"closed-book hit {stats['closed_book']['hit']:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
