"""One GPU check (run by ``benchmarks/gpu_check.sh``): the numbers the CPU could not measure, in one JSON + markdown.

Rows: reranking throughput of ours in fp32 and bf16 vs ``sentence_transformers.CrossEncoder.predict``; reader
generation throughput on CUDA (batched) vs CPU; a 1-process ``accelerate launch`` of ``train-reranker --bf16``
(seconds per step); a LoRA SFT run of a few steps (``train-llm``). ``--dry-run`` runs every row on the CPU with tiny
sizes (the test keeps the script from rotting before a GPU is lent). Needs no network: models are the bundled
aliases (or ``--reranker``/``--llm`` folders); torch, transformers, peft, trl, accelerate, sentence-transformers must
be installed (``pip install -e '.[train]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
AUTHORS = ROOT.parent / "shared" / "data" / "dpa-rag"


def _pairs(n: int) -> list[tuple[str, str]]:
    from dpa_rag.sample import sample_path

    qs = [json.loads(x) for x in sample_path("questions.jsonl").read_text().splitlines()][:8]
    ps = [json.loads(x) for x in sample_path("corpus.jsonl").read_text().splitlines()]
    return [(qs[i % len(qs)]["question"], ps[i % len(ps)]["text"]) for i in range(n)]


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def rerank_rows(model: str, device: str, n: int, batch: int, repeats: int, bf16: bool) -> dict[str, float]:
    from sentence_transformers import CrossEncoder

    from dpa_rag.models import resolve_encoder
    from dpa_rag.reranker.rerank import Reranker

    pairs = _pairs(n)
    out: dict[str, float] = {}
    for dtype in ["fp32", *(["bf16"] if bf16 else [])]:
        rr = Reranker(model, device=device, dtype=dtype, batch_size=batch, max_length=256)
        out[f"ours {dtype} pairs/s"] = round(n / _timed(lambda rr=rr: rr.score_pairs(pairs), repeats), 1)
    ce = CrossEncoder(resolve_encoder(model) if not Path(model).exists() else model, device=device, max_length=256)
    out["CrossEncoder.predict fp32 pairs/s"] = round(
        n / _timed(lambda: ce.predict(pairs, batch_size=batch, show_progress_bar=False), repeats), 1)
    return out


def generation_rows(model: str, device: str, n: int, batch: int, new_tokens: int) -> dict[str, float]:
    from dpa_rag.generation.base import GenerationParams
    from dpa_rag.generation.hf import HFGenerator

    prompts = [f"Question: {q}\nAnswer:" for q, _ in _pairs(n)]
    params = GenerationParams(max_new_tokens=new_tokens)
    out: dict[str, float] = {}
    runs = [(device, batch)] + ([("cpu", batch), ("cpu", 1)] if device != "cpu" else [("cpu", 1)])
    for dev, b in runs:
        gen = HFGenerator(model, device=dev, batch_size=b)
        t = time.perf_counter()
        for i in range(0, n, b):
            gen.generate(prompts[i : i + b], params)
        out[f"{dev} batch {b} prompts/s"] = round(n / (time.perf_counter() - t), 2)
    return out


def _run(argv: list[str], log: Path) -> float:
    t = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"`{shlex.join(argv)}` failed (code {done.returncode}); log: {log}")
    return time.perf_counter() - t


def train_reranker_row(model: str, out: Path, steps: int, gpu: bool) -> dict[str, Any]:
    data = AUTHORS if AUTHORS.exists() else None
    if data is None:
        return {"skipped": f"{AUTHORS} not found"}
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "bf16" if gpu else "no", "--dynamo_backend", "no", *([] if gpu else ["--cpu"]),
            "-m", "dpa_rag.cli.main", "train-reranker", "--train", str(data / "example_train_dataset.jsonl"),
            "--valid", str(data / "example_valid_dataset.jsonl"), "--out-dir", str(out / "reranker"),
            "--backbone", model, "--max-steps", str(steps), "--max-length", "256", "--no-warmup-relevance",
            *(["--bf16"] if gpu else [])]
    seconds = _run(argv, out / "train_reranker.log")
    log = json.loads((out / "reranker" / "train_log.json").read_text())
    timings = json.loads((out / "reranker" / "manifest.json").read_text()).get("timings_s", {})
    return {"command": shlex.join(argv), "wall_s": round(seconds, 1), "steps": len(log["steps"]), "stage_s": timings}


def lora_sft_row(model: str, out: Path, steps: int, gpu: bool) -> dict[str, Any]:
    data = out / "sft.jsonl"
    rows = [{"instruction": f"Question: {q}", "input": f"Passage: {p[:300]}", "output": "an answer"}
            for q, p in _pairs(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [sys.executable, "-m", "dpa_rag.cli.main", "train-llm", "--stage", "sft", "--data", str(data),
            "--model", model, "--out-dir", str(out / "lora"), "--max-steps", str(steps), "--batch-size", "4",
            "--cutoff", "512", "--logging-steps", "1", "--device", "cuda" if gpu else "cpu"]
    seconds = _run(argv, out / "train_llm.log")
    history = json.loads((out / "lora" / "train_log.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    return {"command": shlex.join(argv), "wall_s": round(seconds, 1), "losses": losses}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, measures nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--reranker", default="minilm", help="reranker backbone (alias, folder)")
    ap.add_argument("--llm", default="smollm2-135m", help="reader model (alias, folder)")
    args = ap.parse_args()
    gpu = torch.cuda.is_available() and not args.dry_run
    if not gpu and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    device = "cuda" if gpu else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    n, batch, repeats, steps = (256, 64, 3, 20) if gpu else (8, 4, 1, 1)
    result: dict[str, Any] = {
        "mode": "gpu" if gpu else "dry-run (cpu, tiny sizes: not a measurement)",
        "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "reproduce": shlex.join(["bash", "benchmarks/gpu_check.sh", *sys.argv[1:]]),
    }
    sections = {
        "rerank": lambda: rerank_rows(args.reranker, device, n, batch, repeats, bf16=gpu),
        "generation": lambda: generation_rows(args.llm, device, n if gpu else 4, 16 if gpu else 2, 16 if gpu else 2),
        "train_reranker_accelerate": lambda: train_reranker_row(args.reranker, args.out, steps, gpu),
        "lora_sft": lambda: lora_sft_row(args.llm, args.out, 5 if gpu else 1, gpu),
    }
    for name, fn in sections.items():
        t = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"{name}: {json.dumps(result[name])} ({time.perf_counter() - t:.1f} s)")
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    lines = [f"# GPU check ({result['mode']})", "", f"device: {result['device']}, torch {result['torch']}, "
             f"cuda {result['cuda']}", "", f"reproduce: `{result['reproduce']}`", "", "| row | result |", "|---|---|"]
    for name in sections:
        for key, value in (result[name].items() if isinstance(result[name], dict) else []):
            if key != "command":
                lines.append(f"| {name}: {key} | {value} |")
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}")
    return 1 if any(isinstance(v, dict) and "error" in v for v in result.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
