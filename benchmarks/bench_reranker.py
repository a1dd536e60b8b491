"""Reranker benchmark: training-step time (authors' step vs ours) and reranking throughput (vs CrossEncoder).

Training step, same model (bundled MiniLM, two-class head) and data (the authors' example train file, 4 records per
step), fp32 (and bf16 autocast where bf16 is fast):

* ``authors``: a re-implementation of the authors' step: four encoder passes (classification, rank list, positives,
  negatives, each padded to its own length), per-record Python loops for the pair and SupCon losses, parameter-level
  MGDA on flattened gradients of embeddings + encoder with their Frank–Wolfe and numerical grid line search (100-point
  grid of f'(γ) by autograd, ≤ 4 bracket-shrinking rounds), weighted backward, AdamW step.
* ``ours-mgda`` / ``ours-mgda-ub`` / ``ours-equal``: the trainer's step with its CPU defaults: the fused,
  length-sorted batch (:class:`FusedCollator`; per-group passes for ``mgda``) encoded in forwards of 4 rows, each cut
  to its own padding, sharing one token-embedding lookup (``--forward-chunk-size``), fast CPU dropout
  (:mod:`dpa_rag.reranker.fast_dropout`, ``--fast-dropout``), the three loss modules, the weighting strategy, one
  weighted backward, fused AdamW step. ``ours-mgda-ub/1-forward``: the same with the whole batch in one forward;
  ``ours-mgda-ub/torch-dropout``: with torch's dropout and SDPA dropout.

Reranking: real NQ questions (lost-in-the-middle oracle file) with their gold passage plus FlashRAG wiki passages;
:class:`dpa_rag.reranker.Reranker` vs ``sentence_transformers.CrossEncoder.predict`` on the same pairs and weights,
fp32: each at its default batch size (CrossEncoder 32; ours 16 on a CPU), then both at ``--batch-size``; pairs/s,
max |score difference|, peak RSS of a fresh process per system.

bf16 (``--bf16 auto|on|off``): training under bf16 autocast and reranking with ``dtype="bf16"`` (Spearman correlation
of its scores with fp32), by default only where bf16 matmuls are fast.

Run: ``python benchmarks/bench_reranker.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import inspect
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TRAIN_FILE = SHARED / "dpa-rag" / "example_train_dataset.jsonl"
NQ_FILE = SHARED / "lost-in-the-middle" / "nq-open-oracle.jsonl.gz"
CORPUS_FILE = SHARED / "flashrag" / "wiki_sample_corpus.jsonl"


# ------------------------------------------------------------------ the authors' step, re-implemented


def _grid_line_search(m: torch.Tensor, alpha: torch.Tensor, e_t: torch.Tensor, eps: float = 1e-3) -> float:
    """The authors' 1-D search: f'(γ) on a 100-point grid by autograd, ≤ 4 bracket-shrinking rounds, midpoint."""
    start, end, last = 0.0, 1.0, 0.0
    gamma = None
    for _ in range(4):
        gamma = torch.linspace(start, end, 100, dtype=m.dtype).unsqueeze(-1).requires_grad_(True)
        mix = (1 - gamma) * alpha.expand(100, -1) + gamma * e_t.expand(100, -1)
        f = (mix @ m @ mix.T).diag().sum()
        if abs(f.item() - last) < eps:
            break
        (grad,) = torch.autograd.grad(f, gamma)
        last = f.item()
        g, grid = grad[:, 0], gamma.detach()[:, 0]
        if g[0] * g[-1] >= 0:
            return float(grid[torch.argmin(g.abs())].clamp(0, 0.9999))
        end, start = float(grid[g > 0].min()), float(grid[g < 0].max())
    return float(gamma.detach().mean())


def _authors_weights(m: torch.Tensor, max_iter: int = 100, eps: float = 1e-3) -> torch.Tensor:
    n = m.shape[0]
    alpha = torch.full((n,), 1.0 / n, dtype=m.dtype)
    for _ in range(max_iter):
        t = int(torch.argmin(m @ alpha))
        e_t = torch.zeros(n, dtype=m.dtype)
        e_t[t] = 1.0
        gamma = _grid_line_search(m, alpha, e_t)
        alpha = (1 - gamma) * alpha + gamma * e_t
        if gamma < eps or abs(1 - float(alpha.max())) < eps:
            break
    return alpha


def _supcon(features: torch.Tensor, labels: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    sim = features @ features.T / tau
    n = features.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, -1e9), dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    return (-(log_prob * pos).sum(1) / pos.sum(1)).mean()


class AuthorsStep:
    """Bare encoder + linear head on the CLS vector, four passes, parameter-level MGDA with the grid search."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = 512) -> None:
        self.encoder = model.base_model
        self.head = torch.nn.Linear(model.config.hidden_size, 2)
        self.tok = tokenizer
        self.max_length = max_length
        self.params = [p for m in (self.encoder.embeddings, self.encoder.encoder) for p in m.parameters()]
        self.opt = torch.optim.AdamW([*self.encoder.parameters(), *self.head.parameters()], lr=1e-5, eps=1e-6,
                                     weight_decay=0.0)

    def _cls(self, queries: list[str], docs: list[str]) -> torch.Tensor:
        b = self.tok(queries, docs, padding=True, truncation="longest_first", max_length=self.max_length,
                     return_tensors="pt")
        return self.encoder(**b).last_hidden_state[:, 0]

    def __call__(self, records, autocast: bool = False) -> float:
        bsz = len(records)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = self.head(self._cls([r.query for r in records], [r.classification.text for r in records]))
            labels = torch.tensor([2 - r.classification.label for r in records])
            l_cls = F.cross_entropy(z.float(), labels)
            s = self.head(self._cls([r.query for r in records for _ in range(4)],
                                    [d for r in records for d in r.rank_list[:4]]))[:, 1].float()
            l_rank = 0
            for g in range(bsz):
                for i in range(g * 4, g * 4 + 3):
                    for j in range(i + 1, g * 4 + 4):
                        l_rank = l_rank - F.logsigmoid(s[i] - s[j])
            l_rank = l_rank / (6 * bsz)
            p = self._cls([r.query for r in records for _ in range(2)], [d for r in records for d in r.positive[:2]])
            n = self._cls([r.query for r in records for _ in range(2)], [d for r in records for d in r.negative[:2]])
            l_scl = 0
            for g in range(bsz):
                feats = F.normalize(torch.cat([p[2 * g : 2 * g + 2], n[2 * g : 2 * g + 2]]).float(), dim=-1)
                l_scl = l_scl + _supcon(feats, torch.tensor([1, 1, 0, 0]))
            l_scl = l_scl / bsz
        losses = [l_cls, l_rank, l_scl]
        flat = []
        for loss in losses:
            grads = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
            flat.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                                   for g, p in zip(grads, self.params, strict=True)]))
        m = torch.stack([torch.stack([gi @ gj for gj in flat]) for gi in flat]).double()
        alpha = _authors_weights(m)
        total = torch.stack(losses) @ alpha.to(torch.float32)
        self.opt.zero_grad()
        total.backward()
        self.opt.step()
        return float(total.detach())


class OursStep:
    """The step of :class:`dpa_rag.reranker.trainer.RerankerTrainer` without the Trainer loop.

    ``equal``/``mgda-ub``: one fused forward, weights, one weighted backward. ``mgda``: one forward per group, the
    per-loss parameter gradients set ``p.grad`` directly (the trainer's single-process path).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, weighting: str, max_length: int = 512,
                 chunk_size: int | None = None, fast_dropout: bool = True) -> None:
        import contextlib

        from dpa_rag.reranker.fast_dropout import fast_cpu_dropout
        from dpa_rag.reranker.losses import LOSS_NAMES
        from dpa_rag.reranker.step import build_losses
        from dpa_rag.reranker.train import build_collator
        from dpa_rag.reranker.weighting import build_weighting

        names = list(LOSS_NAMES)
        self.model = model
        self.weighting = build_weighting(weighting)
        self.grouped = self.weighting.grouped_batches  # per-group passes where it differentiates w.r.t. parameters
        self.collate = build_collator("cross-encoder", tokenizer, names, self.weighting, max_length)
        self.modules = build_losses(names, model.config.num_labels)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, eps=1e-6, weight_decay=0.0, fused=True)
        self.chunk_size = chunk_size
        self._dropout = contextlib.ExitStack()  # the trainer's CPU default, held for the runner's lifetime
        self._dropout.enter_context(fast_cpu_dropout(model, enabled=fast_dropout))

    def __call__(self, records, autocast: bool = False) -> float:
        from dpa_rag.reranker.step import compute_losses
        from dpa_rag.reranker.trainer import mgda_direct_gradients

        batch = self.collate(records)
        self.opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses, out = compute_losses(self.model, batch, self.modules, chunk_size=self.chunk_size,
                                         separate=self.grouped)
        if self.grouped:
            w = mgda_direct_gradients(self.model, losses, self.weighting)
            total = sum(w[k] * v.detach() for k, v in losses.items())
        else:
            w = self.weighting.weights(losses, representation=out.hidden)
            total = sum(w[k] * v for k, v in losses.items())
            total.backward()
        self.opt.step()
        return float(total.detach())


SYSTEMS = ("authors", "ours-mgda", "ours-mgda-ub", "ours-equal", "ours-mgda-ub/1-forward",
           "ours-mgda-ub/torch-dropout")


def _ours(model: torch.nn.Module, tok, name: str, max_length: int) -> OursStep:
    """``ours-<weighting>`` with the trainer's CPU defaults (forwards of 4 rows, fast dropout); ``/1-forward``: one
    forward; ``/torch-dropout``: torch's dropout and SDPA dropout instead of :mod:`dpa_rag.reranker.fast_dropout`."""
    from dpa_rag.reranker.train import resolve_chunk_size

    weighting, _, variant = name.removeprefix("ours-").partition("/")
    chunk = resolve_chunk_size(0 if variant == "1-forward" else None, use_cpu=True)
    return OursStep(model, tok, weighting, max_length, chunk, fast_dropout=variant != "torch-dropout")


def _use_bf16(choice: str) -> bool:
    """``--bf16 auto``: where :func:`dpa_rag.models.cpu_has_fast_bf16` says bf16 matmuls are faster than fp32."""
    from dpa_rag.models import cpu_has_fast_bf16

    if choice == "auto":
        if cpu_has_fast_bf16():
            return True
        print("bf16: skipped (cpu_has_fast_bf16() is False: bf16 matmuls are emulated and slower here; --bf16 on "
              "runs it anyway)")
        return False
    return choice == "on"


def bench_training(steps: int, max_length: int, bf16: bool) -> None:
    from dpa_rag.data.reranker_records import load_reranker_train
    from dpa_rag.reranker.model import load_reranker_model

    records = load_reranker_train(TRAIN_FILE)
    batches = [records[i : i + 4] for i in range(0, len(records), 4)]
    base, tok = load_reranker_model("minilm", "two-class")
    modes = [("fp32", False)] + ([("bf16", True)] if bf16 else [])
    print(f"\n## training step (minilm two-class, 4 records/step, max_length {max_length}; systems interleaved "
          f"round by round on the same batch; 1 warm-up + {steps} timed rounds, median)")
    print(f"{'system':<28}{'dtype':<7}{'cpu s/step':>11}{'speed-up':>10}{'wall s/step':>13}{'speed-up':>10}")
    for dtype_name, autocast in modes:
        runners = {}
        for name in SYSTEMS:
            model = copy.deepcopy(base).train()
            runners[name] = AuthorsStep(model, tok, max_length) if name == "authors" else _ours(
                model, tok, name, max_length)
        cpu: dict[str, list[float]] = {k: [] for k in SYSTEMS}
        wall: dict[str, list[float]] = {k: [] for k in SYSTEMS}
        for r in range(steps + 1):
            order = SYSTEMS if r % 2 == 0 else tuple(reversed(SYSTEMS))
            for name in order:
                c, w = time.process_time(), time.perf_counter()
                runners[name](batches[r % len(batches)], autocast=autocast)
                if r:
                    cpu[name].append(time.process_time() - c)
                    wall[name].append(time.perf_counter() - w)
        ref_c, ref_w = statistics.median(cpu["authors"]), statistics.median(wall["authors"])
        for name in SYSTEMS:
            mc, mw = statistics.median(cpu[name]), statistics.median(wall[name])
            print(f"{name:<28}{dtype_name:<7}{mc:>11.2f}{ref_c / mc:>9.2f}x{mw:>13.2f}{ref_w / mw:>9.2f}x", flush=True)
    print(f"peak RSS of the benchmark process (all training systems at once): {_peak_rss_mb():.0f} MB")


# ------------------------------------------------------------------ reranking throughput


def _pairs(questions: int, docs: int) -> list[tuple[str, str]]:
    from dpa_rag.data.schema import format_passage

    corpus = []
    with open(CORPUS_FILE, encoding="utf-8") as fh:
        for line in fh:
            c = json.loads(line)["contents"]
            title, _, text = c.partition("\n")
            corpus.append(format_passage(title.strip('"'), text))
    out = []
    with gzip.open(NQ_FILE, "rt", encoding="utf-8") as fh:
        for qi, line in enumerate(fh):
            if qi >= questions:
                break
            rec = json.loads(line)
            gold = rec["ctxs"][0]
            out.append((rec["question"], format_passage(gold["title"], gold["text"])))
            out += [(rec["question"], corpus[(qi * docs + j) % len(corpus)]) for j in range(docs - 1)]
    return out


def _peak_rss_mb() -> float:
    """Peak resident memory of this process: VmHWM (reset by exec, unlike ru_maxrss, which a child inherits)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rerank_worker(system: str, model_dir: str, pairs_file: str, batch_size: int, repeats: int) -> None:
    pairs = [tuple(p) for p in json.loads(Path(pairs_file).read_text())]
    batch = batch_size or None  # 0: the system's own default
    if system in ("ours", "ours-bf16"):
        from dpa_rag.reranker.rerank import Reranker

        rr = Reranker(model_dir, device="cpu", dtype="bf16" if system == "ours-bf16" else "fp32", batch_size=batch)
        run, used = rr.score_pairs, rr.batch_size
    else:
        from sentence_transformers import CrossEncoder

        ce = CrossEncoder(model_dir, device="cpu", activation_fn=torch.nn.Identity())
        kwargs = {"batch_size": batch} if batch else {}
        used = batch or inspect.signature(ce.predict).parameters["batch_size"].default

        def run(p):
            return ce.predict(p, show_progress_bar=False, **kwargs).tolist()

    run(pairs[:32])  # warm-up
    times, cpu, scores = [], [], None
    for _ in range(repeats):
        c, t = time.process_time(), time.perf_counter()
        scores = run(pairs)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    rss = _peak_rss_mb()
    print(json.dumps({"time": statistics.median(times), "cpu": statistics.median(cpu), "scores": scores,
                      "rss_mb": rss, "batch": used}))


def bench_rerank(questions: int, docs: int, batch_size: int, repeats: int, bf16: bool) -> None:
    """Each system at its default batch size, then both at ``batch_size``; speed-ups against CrossEncoder's default.

    With ``bf16``, ours also runs with ``dtype="bf16"``; its scores are compared by Spearman correlation with ours
    in fp32.
    """
    from dpa_rag.reranker.model import load_reranker_model

    pairs = _pairs(questions, docs)
    runs = [("crossencoder", 0), ("ours", 0), ("crossencoder", batch_size), ("ours", batch_size)]
    if bf16:
        runs.append(("ours-bf16", 0))
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model, tok = load_reranker_model("minilm", "single")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        pairs_file = Path(tmp) / "pairs.json"
        pairs_file.write_text(json.dumps(pairs))
        got: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
        for pass_ in range(2):  # forward, then reversed order: a slow spell of the machine hits every system
            for i in range(len(runs)) if pass_ == 0 else reversed(range(len(runs))):
                system, bs = runs[i]
                cmd = [sys.executable, __file__, "--worker", system, tmp, str(pairs_file), str(bs), str(repeats)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
                got[i].append(json.loads(out.stdout.strip().splitlines()[-1]))
    res = []
    for i, (system, bs) in enumerate(runs):
        r = dict(got[i][0])
        for key in ("time", "cpu"):
            r[key] = statistics.median(x[key] for x in got[i])
        r["rss_mb"] = max(x["rss_mb"] for x in got[i])
        res.append((system, bs, r))
    ref = res[0][2]["scores"]
    diff = max(abs(a - b) for name, _, r in res[1:] if name != "ours-bf16" for a, b in zip(r["scores"], ref,
                                                                                          strict=True))
    n = len(pairs)
    print(f"\n## reranking throughput (minilm 1-logit, fp32 unless marked, {n} NQ pairs = {questions} questions x "
          f"{docs} passages, "
          f"2 passes x median of {repeats}; a fresh process per system and pass, the 2nd pass in reversed order; "
          f"speed-up vs CrossEncoder.predict at its default)")
    print(f"{'system':<44}{'batch':>6}{'pairs/cpu-s':>12}{'speed-up':>10}{'pairs/s wall':>14}{'speed-up':>10}"
          f"{'peak RSS MB':>13}")
    base_c, base_w = n / res[0][2]["cpu"], n / res[0][2]["time"]
    labels = {"crossencoder": "CrossEncoder.predict", "ours": "dpa_rag Reranker.score_pairs",
              "ours-bf16": "dpa_rag Reranker.score_pairs bf16"}
    for system, bs, r in res:
        pc, pw = n / r["cpu"], n / r["time"]
        label = labels[system] + (" (default)" if not bs else "")
        print(f"{label:<44}{r['batch']:>6}{pc:>12.1f}{pc / base_c:>9.2f}x{pw:>14.1f}{pw / base_w:>9.2f}x"
              f"{r['rss_mb']:>13.0f}")
    print(f"max |score difference| against CrossEncoder.predict (default): {diff:.2e}")
    if bf16:
        from scipy.stats import spearmanr  # installed with sentence-transformers

        rho = float(spearmanr(res[-1][2]["scores"], res[1][2]["scores"]).statistic)
        print(f"bf16 vs fp32 (ours): Spearman correlation of scores {rho:.4f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, system, model_dir, pairs_file, bs, reps = sys.argv
        _rerank_worker(system, model_dir, pairs_file, int(bs), int(reps))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "train", "rerank"], default="all")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per system")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--docs", type=int, default=32, help="passages per question")
    ap.add_argument("--batch-size", type=int, default=32, help="reranking: the batch size both systems share")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                    help="bf16 rows (training autocast, reranking dtype): auto = where bf16 matmuls are fast")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("reproduce: " + shlex.join([os.path.relpath(sys.executable), *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpu")
    if args.part in ("all", "rerank"):
        bench_rerank(args.questions, args.docs, args.batch_size, args.repeats, _use_bf16(args.bf16))
    if args.part in ("all", "train"):
        bench_training(args.steps, args.max_length, _use_bf16(args.bf16))


if __name__ == "__main__":
    main()
