"""Reader throughput of the HF backend: batched vs one-by-one, per dtype, and a fully cached re-run.

32 real NQ questions with their gold passage (lost-in-the-middle ``nq-open-oracle``), the ``qa`` reader prompt, greedy
decoding, 16 new tokens, the bundled SmolLM2-135M-Instruct. Prints prompts/s and generated tokens/s (tokens = the
answers re-tokenised, so early-stopped rows count what they produced), checks that batched answers equal one-by-one
answers, and reports Hits (gold substring) as a sanity check.

Reproduce:
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_reader.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from dpa_rag.eval.metrics import hit
from dpa_rag.generation import CachedGenerator, GenerationCache, GenerationParams
from dpa_rag.generation.hf import HFGenerator
from dpa_rag.models import cpu_has_fast_bf16, pick_device, pick_dtype

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz"


def load_prompts(path: Path, n: int) -> tuple[list[list[dict[str, str]]], list[list[str]]]:
    """``n`` chat prompts (question + gold passage) and their gold answers."""
    try:
        from dpa_rag.prompts import load_template

        template = load_template("qa")
        render = lambda q, p: template.render(q, [p])  # noqa: E731
    except Exception:  # the shared prompt module is optional here
        system = "Answer the question with a short phrase (a few words), using the passages. Do not explain."

        def render(q: str, p: str) -> list[dict[str, str]]:
            return [{"role": "system", "content": system},
                    {"role": "user", "content": f"Passages:\n{p}\n\nQuestion: {q}\nAnswer:"}]

    prompts, golds = [], []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            ctx = rec["ctxs"][0]
            prompts.append(render(rec["question"], f"Title: {ctx['title']} Content: {ctx['text']}"))
            golds.append(rec["answers"])
            if len(prompts) == n:
                break
    return prompts, golds


def count_tokens(gen: HFGenerator, outs: list[str]) -> int:
    return sum(len(gen.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs)


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def bench_dtype(model: str, dtype: str, device: str, prompts, golds, params, batch_sizes, tmp: str) -> None:  # noqa: ANN001
    gen = HFGenerator(model, dtype=dtype, device=device, batch_size=max(batch_sizes))
    gen.generate(prompts[:1], params.model_copy(update={"max_new_tokens": 2}))  # warm-up
    n = len(prompts)
    prompt_tokens = sum(len(gen.encode(p)) for p in prompts)
    print(f"{dtype:9s} {n} prompts, {prompt_tokens} prompt tokens ({prompt_tokens / n:.0f} per prompt), "
          f"{params.max_new_tokens} new tokens at most")
    single, dt = timed(lambda: [gen.generate([p], params)[0] for p in prompts])
    tok = count_tokens(gen, single)
    print(f"{dtype:9s} one-by-one   {n / dt:6.2f} prompts/s  {tok / dt:7.1f} tokens/s  ({dt:6.1f} s)")
    for b in batch_sizes:
        gen.batch_size = b
        # through a fresh cache (all misses: the same work as a bare call), so the last one can be re-run cached
        cached = CachedGenerator(gen, GenerationCache(Path(tmp) / f"{dtype}-{b}.sqlite"), batch_size=b, progress=False)
        outs, dt = timed(lambda: cached.generate(prompts, params))  # noqa: B023
        tok = count_tokens(gen, outs)
        same = sum(a == s for a, s in zip(outs, single, strict=True))
        print(f"{dtype:9s} batch {b:<6d} {n / dt:6.2f} prompts/s  {tok / dt:7.1f} tokens/s  ({dt:6.1f} s)  "
              f"same answers as one-by-one: {same}/{n}")
    again, dt = timed(lambda: cached.generate(prompts, params))
    assert again == outs and cached.calls == n, "the re-run should be served from the cache"
    print(f"{dtype:9s} fully cached re-run of batch {b}: {dt * 1000:.1f} ms ({cached.hits} cache hits, "
          f"{cached.calls} prompts generated in total)")
    hits = sum(hit(o, g) for o, g in zip(single, golds, strict=True))
    print(f"{dtype:9s} Hits (gold substring in answer): {hits}/{n} = {100 * hits / n:.1f}%")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    print("reproduce: OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(["benchmarks/bench_reader.py", *sys.argv[1:]]))
    device = pick_device(args.device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} model={args.model} "
          f"load average={os.getloadavg()} (other processes share these cores)")
    prompts, golds = load_prompts(args.data, args.n)
    params = GenerationParams(max_new_tokens=args.max_new_tokens)

    dtypes = ["float32"]
    auto = pick_dtype("auto", device)
    if auto == torch.bfloat16:
        dtypes.append("bfloat16")
    else:
        why = "bf16 matmul measured slower than fp32 on this CPU" if device == "cpu" else f"auto picked {auto}"
        print(f"bfloat16 skipped: pick_dtype('auto') -> {auto} ({why}; cpu_has_fast_bf16={cpu_has_fast_bf16()})")
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            bench_dtype(args.model, dtype, device, prompts, golds, params, args.batch_sizes, tmp)
    print(f"load average at the end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
