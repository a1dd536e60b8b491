"""Load test of ``dpa-rag serve``'s ``/rerank``: requests/s and p50/p95/p99 latency at 1, 8 and 32 concurrent
clients, micro-batching on and off, against the in-process ``Reranker`` on the same pairs; then an overload run
(a small queue, many clients) to show that p99 stays bounded because the excess gets 503 + Retry-After.

Loopback only, bounded in requests and seconds per run. The server runs as a subprocess (``dpa-rag serve``, fake
readers); the clients are httpx async tasks in this process. Pairs: the bundled sample questions, each with its
BM25 top-``--texts`` sample passages (the ``Title: … Content: …`` layout the reranker scores).

Usage::

    .venv/bin/python benchmarks/bench_serve.py                    # minilm, 96 requests per run, 10 texts each
    .venv/bin/python benchmarks/bench_serve.py --requests 32 --concurrency 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dpa_rag.data.loaders import load_questions
from dpa_rag.retrieval.index import load_index
from dpa_rag.sample import sample_path
from dpa_rag.serve.plan import sample_index
from dpa_rag.serve.server import free_port


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def make_requests(n_texts: int, cache: Path) -> list[dict]:
    index = load_index(sample_index(cache))
    bm25 = index.bm25()
    questions = load_questions(sample_path("questions.jsonl"), require_answers=False)
    hits = bm25.search([q.question for q in questions], n_texts)
    return [{"query": q.question, "texts": [index.passages[i].render() for i, _ in h]}
            for q, h in zip(questions, hits, strict=True)]


def in_process(model: str, requests: list[dict], dtype: str, max_length: int) -> dict:
    from dpa_rag.reranker.rerank import Reranker

    rr = Reranker(model, device="cpu", dtype=dtype, max_length=max_length)
    rr.score(requests[0]["query"], requests[0]["texts"])  # warm-up
    lat = []
    t0 = time.perf_counter()
    for r in requests:
        t = time.perf_counter()
        rr.score(r["query"], r["texts"])
        lat.append(time.perf_counter() - t)
    per_request = time.perf_counter() - t0
    pairs = [(r["query"], x) for r in requests for x in r["texts"]]
    t0 = time.perf_counter()
    rr.score_pairs(pairs)
    one_call = time.perf_counter() - t0
    return {"requests": len(requests), "pairs": len(pairs), "per_request_rps": len(requests) / per_request,
            "per_request_pairs_s": len(pairs) / per_request, "per_request_p50_ms": 1000 * pct(lat, 50),
            "one_call_pairs_s": len(pairs) / one_call, "one_call_rps": len(requests) / one_call}


async def load(url: str, requests: list[dict], clients: int, total: int, max_seconds: float) -> dict:
    lat_ok: list[float] = []
    lat_all: list[float] = []
    codes: dict[int, int] = {}
    sent = 0
    deadline = time.perf_counter() + max_seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < total and time.perf_counter() < deadline:
            body = requests[sent % len(requests)]
            sent += 1
            t = time.perf_counter()
            resp = await c.post(f"{url}/rerank", json=body)
            dt = time.perf_counter() - t
            codes[resp.status_code] = codes.get(resp.status_code, 0) + 1
            lat_all.append(dt)
            if resp.status_code == 200:
                lat_ok.append(dt)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(clients)])
        wall = time.perf_counter() - t0
    ok = codes.get(200, 0)
    return {"clients": clients, "requests": sum(codes.values()), "ok": ok, "codes": codes, "seconds": wall,
            "rps": ok / wall, "p50_ms": 1000 * pct(lat_ok, 50), "p95_ms": 1000 * pct(lat_ok, 95),
            "p99_ms": 1000 * pct(lat_ok, 99), "p99_all_ms": 1000 * pct(lat_all, 99)}


class Server:
    def __init__(self, args: argparse.Namespace, cache: Path, batching: bool, max_queue: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dpa_rag.cli.main", "-q", "serve", "--reranker", args.model, "--backend", "fake",
               "--dtype", args.dtype, "--reranker-max-length", str(args.max_length), "--cache-dir", str(cache),
               "--port", str(self.port), "--max-queue", str(max_queue), "--batch-window-ms", str(args.window_ms),
               "--max-batch-pairs", str(args.max_batch_pairs), "--max-texts", str(max(256, args.texts)),
               "--micro-batching" if batching else "--no-micro-batching"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self) -> str:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm", help="reranker model (alias, folder or hub id)")
    parser.add_argument("--texts", type=int, default=10, help="texts per /rerank request")
    parser.add_argument("--requests", type=int, default=96, help="requests per run")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time limit per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    parser.add_argument("--dtype", default="float32", help="reranker dtype (server and in-process)")
    parser.add_argument("--max-length", type=int, default=256, help="reranker max tokens per pair")
    parser.add_argument("--window-ms", type=float, default=5.0, help="micro-batching collection window")
    parser.add_argument("--max-batch-pairs", type=int, default=256, help="most pairs per merged call")
    parser.add_argument("--overload-clients", type=int, default=64, help="clients in the overload run")
    parser.add_argument("--overload-queue", type=int, default=4, help="server queue bound in the overload run")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    requests = make_requests(args.texts, cache)
    torch_dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(args.dtype, args.dtype)
    results: dict = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "args": {
        k: str(v) for k, v in vars(args).items()}}
    results["in_process"] = ip = in_process(args.model, requests[: args.requests], torch_dtype, args.max_length)
    print(f"in-process Reranker, {ip['pairs']} pairs in {ip['requests']} requests of {args.texts}: "
          f"{ip['per_request_rps']:.1f} req/s one request at a time ({ip['per_request_pairs_s']:.0f} pairs/s, "
          f"p50 {ip['per_request_p50_ms']:.0f} ms); {ip['one_call_pairs_s']:.0f} pairs/s in one call "
          f"({ip['one_call_rps']:.1f} req/s)", flush=True)
    runs = []
    for batching in (True, False):
        with Server(args, cache, batching, max_queue=1024) as url:
            asyncio.run(load(url, requests, 4, 8, 30))  # warm-up
            for clients in args.concurrency:
                r = asyncio.run(load(url, requests, clients, args.requests, args.max_seconds))
                r["micro_batching"] = batching
                r["vs_in_process"] = r["rps"] / ip["per_request_rps"]
                runs.append(r)
                print(f"micro-batching {'on ' if batching else 'off'} {clients:3d} clients: {r['rps']:6.1f} req/s "
                      f"p50 {r['p50_ms']:6.0f} p95 {r['p95_ms']:6.0f} p99 {r['p99_ms']:6.0f} ms "
                      f"({r['vs_in_process']:.0%} of in-process, {r['requests']} requests)", flush=True)
            metrics = httpx.get(f"{url}/metrics").text
            if batching:
                line = [x for x in metrics.splitlines() if x.startswith('dpa_rag_batch_requests_sum{model="reranker"')]
                count = [x for x in metrics.splitlines()
                         if x.startswith('dpa_rag_batch_requests_count{model="reranker"')]
                if line and count:
                    results["mean_requests_per_call"] = float(line[0].split()[-1]) / float(count[0].split()[-1])
    results["runs"] = runs
    with Server(args, cache, True, max_queue=args.overload_queue) as url:
        asyncio.run(load(url, requests, 4, 8, 30))
        over = asyncio.run(load(url, requests, args.overload_clients, args.requests * 2, args.max_seconds))
    over["max_queue"] = args.overload_queue
    results["overload"] = over
    print(f"overload: {args.overload_clients} clients, queue {args.overload_queue}: codes {over['codes']}, "
          f"{over['rps']:.1f} req/s served, p99 of served {over['p99_ms']:.0f} ms, "
          f"p99 of all {over['p99_all_ms']:.0f} ms", flush=True)
    print("\n| micro-batching | clients | req/s | p50 ms | p95 ms | p99 ms | vs in-process |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(f"| {'on' if r['micro_batching'] else 'off'} | {r['clients']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | "
              f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['vs_in_process']:.0%} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
