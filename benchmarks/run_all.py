"""Run every benchmark of the project, one after the other, and print one table of their results.

Each benchmark is a script in this folder that prints its own numbers and the command that reproduces it; this
runner captures their output, prints it, and closes with a table of which ran, how long it took and the command.

Usage::

    .venv/bin/python benchmarks/run_all.py            # all (tens of minutes on 2 CPU cores)
    .venv/bin/python benchmarks/run_all.py --quick    # smaller sizes, a few minutes
    .venv/bin/python benchmarks/run_all.py --only reader mining
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, full arguments, quick arguments)
BENCHMARKS: dict[str, tuple[str, list[str], list[str]]] = {
    "retrieval": ("bench_retrieval.py", [], ["--n-questions", "100"]),
    "reader": ("bench_reader.py", [], ["--n", "8", "--batch-sizes", "8"]),
    "mining": ("bench_mining.py", ["--n", "16"], ["--n", "4", "--n-ctxs", "2"]),
    "loglik": ("bench_loglik.py", [], ["--questions", "4", "--ranks", "1", "2", "--max-new-tokens", "12"]),
    "reranker": ("bench_reranker.py", [], ["--steps", "1", "--repeats", "1", "--questions", "4"]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (minutes instead of tens of minutes)")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args()
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    rows = []
    for name in args.only or list(BENCHMARKS):
        script, full, quick = BENCHMARKS[name]
        path = HERE / script
        extra = quick if args.quick else full
        cmd = [sys.executable, str(path.relative_to(HERE.parent)), *extra]
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        res = subprocess.run(cmd, cwd=HERE.parent, env=env, text=True, capture_output=True)
        seconds = time.perf_counter() - t
        print(res.stdout, end="")
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
        rows.append((name, "ok" if res.returncode == 0 else f"failed ({res.returncode})", seconds, " ".join(cmd)))
    print("\n| benchmark | status | seconds | command |\n|---|---|---:|---|")
    for name, status, seconds, cmd in rows:
        print(f"| {name} | {status} | {seconds:.0f} | `{cmd}` |")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
