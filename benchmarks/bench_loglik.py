"""Likelihood mining against generation-based mining: probes/s on the same probes, same model, same run.

Builds a small retrieval file from lost-in-the-middle NQ questions (each: its gold passage plus other questions'
gold passages, gold at a varying rank), loads the reader once (``HFGenerator``, the bundled ``smollm2-135m`` by
default) behind a :class:`~dpa_rag.generation.CachedGenerator` with the cache disabled, and mines the same questions
and ranks twice:

1. ``hit`` rule (:func:`~dpa_rag.mining.mine.mine_records`): one greedy answer per prompt (closed-book + each probe);
2. ``loglik`` rule (:func:`~dpa_rag.mining.mine.mine_loglik`): one teacher-forced forward per (prompt, gold) pair
   (at most ``--max-golds`` golds), nothing generated.

A probe is one probed passage of one question (the closed-book prompt is part of each question's cost). An untimed
one-question warm-up of both rules goes first; with ``--repeats`` > 1 the two rules alternate and the best time of
each counts. Also printed: how often the two rules' categories agree (aligned ⇔ aligned, unaligned ⇔ unaligned).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loglik.py --questions 20 --ranks 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from dpa_rag.data.loaders import load_retrieval
from dpa_rag.generation import CachedGenerator
from dpa_rag.mining.mine import MineConfig, mine_loglik, mine_records

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_DATA = SHARED / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz"


def cpu_model() -> str:
    """``Model name`` from ``lscpu`` (empty when lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return ""


def build_records(src: Path, n: int, n_ctxs: int):
    """``n`` retrieval records, each with its gold passage at rank ``i % n_ctxs + 1`` among other golds."""
    recs = load_retrieval(src, limit=n)
    out = []
    for i, r in enumerate(recs):
        ctxs = [recs[(i + j) % len(recs)].ctxs[0] for j in range(1, n_ctxs)]
        ctxs.insert(i % n_ctxs, r.ctxs[0])
        out.append(r.model_copy(update={"ctxs": ctxs}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="1-based ranks to probe")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32, help="hit rule: answer length cap (mine's default)")
    ap.add_argument("--max-golds", type=int, default=3, help="loglik rule: golds scored per question")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    import torch

    from dpa_rag.generation.hf import HFGenerator

    threads = os.environ.get("OMP_NUM_THREADS", "")
    env = f"OMP_NUM_THREADS={threads} " if threads else ""
    print(f"reproduce: {env}.venv/bin/python benchmarks/bench_loglik.py " + " ".join(sys.argv[1:]))

    n_ctxs = max(args.ranks)
    records = build_records(args.data, args.questions, n_ctxs)
    with tempfile.TemporaryDirectory(prefix="bench-loglik-") as tmp:
        common = {"retrieval": Path(tmp) / "unused.jsonl", "model": args.model, "device": args.device,
                  "dtype": args.dtype, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
                  "ranks": args.ranks, "use_cache": False, "progress": False}
        hit_cfg = MineConfig(**common, label_rule="hit")
        ll_cfg = MineConfig(**common, label_rule="loglik", loglik_max_golds=args.max_golds, agreement_questions=0)
    backend = HFGenerator(args.model, dtype=args.dtype, device=args.device, batch_size=args.batch_size)
    gen = CachedGenerator(backend, cache=None, batch_size=args.batch_size, progress=False)

    mine_records(records[:1], gen, hit_cfg)  # warm-up, not timed
    mine_loglik(records[:1], gen, ll_cfg)
    best: dict[str, float] = {}
    calls: dict[str, int] = {}
    outputs: dict[str, list] = {}
    for _ in range(args.repeats):
        for name, fn, cfg in (("hit (generate)", mine_records, hit_cfg), ("loglik (score)", mine_loglik, ll_cfg)):
            before = gen.calls
            t = time.perf_counter()
            outputs[name] = fn(records, gen, cfg)
            dt = time.perf_counter() - t
            calls[name] = gen.calls - before
            best[name] = min(dt, best.get(name, float("inf")))

    probes = sum(len(r.probes) for r in outputs["hit (generate)"])
    print(f"cpu: {cpu_model() or 'unknown'}; torch threads {torch.get_num_threads()}; model {args.model} "
          f"({args.dtype}, {args.device}); batch size {args.batch_size}")
    print(f"{len(records)} questions × ranks {args.ranks} = {probes} probes; hit rule: greedy, "
          f"max_new_tokens {args.max_new_tokens}; loglik rule: ≤ {args.max_golds} golds; cache off")
    print("| rule | seconds | backend calls | probes/s |\n|---|---:|---:|---:|")
    for name, dt in best.items():
        print(f"| {name} | {dt:.1f} | {calls[name]} | {probes / dt:.2f} |")
    ratio = best["hit (generate)"] / best["loglik (score)"]
    print(f"ratio loglik / hit probes/s: {ratio:.2f}x")
    pairs = Counter()
    for g, ll in zip(outputs["hit (generate)"], outputs["loglik (score)"], strict=True):
        for pg, pl in zip(g.probes, ll.probes, strict=True):
            pairs[(pl.category, pg.category)] += 1
    agree = sum(v for (a, b), v in pairs.items() if (a == "aligned") == (b == "aligned")
                and (a == "unaligned") == (b == "unaligned"))
    print(f"category agreement (aligned/unaligned/other): {agree}/{probes}; "
          + ", ".join(f"{a}|{b}: {v}" for (a, b), v in sorted(pairs.items())))


if __name__ == "__main__":
    main()
