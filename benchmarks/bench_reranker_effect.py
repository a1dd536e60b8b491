"""What the aligned reranker learns beyond its encoder (issue #21): a learning curve and a relevance-label control.

From a graded (``mine --label-rule loglik``) ``preferences.jsonl``, with one fixed held-out split (the first
``--valid`` questions pick each training's best checkpoint, the next ``--test`` questions judge; the rest train, in
file order, so every training set is a prefix of the larger ones), this trains the same MiniLM encoder per row and
training-set size and ranks the held-out *training-split* lists against the reader's own gains:

* ``untrained``: the encoder as it comes (no training);
* ``relevance``: trained on the same questions and passages with has-answer labels (gain 1/0; the control), listwise
  loss — the same loss, budget and selection rule as ``listwise``;
* ``relevance-paper``: the control with the paper's losses (point + pair + contrastive, MGDA-UB);
* ``paper``: the reader's preferences, the paper's losses (point + pair + contrastive), MGDA-UB weighting;
* ``listwise``: the reader's graded gains, the listwise loss (ListNet on softmax(gain / T));
* ``mix``: the reader's labels, listwise + the paper's three losses under the same weighting (``relevance-mix``: its
  control).

Printed and written (``effect.json``, ``effect.md``, ``effect.png``): utility nDCG@3 (gain⁺ as graded relevance),
the top-1 passage's gain and answer presence per row and size; paired bootstrap 95% intervals of each row minus
``untrained`` and of each reader-labelled row minus its relevance control at equal data; the train time per row and
the mining cost read from the mine stage's manifest. Nothing here looks at evaluation questions.

Usage (after ``dpa-rag run configs/nq_pref_cpu.yaml --until mine``, or on its partial ``preferences.jsonl``)::

    .venv/bin/python benchmarks/bench_reranker_effect.py --preferences runs/nq_pref_cpu/mine/preferences.jsonl \\
        --out runs/nq_pref_cpu/effect --sizes 100 300 450 --rows relevance listwise paper
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

ROWS = {
    "relevance": {"labels": "relevance", "losses": ["listwise"]},
    "relevance-paper": {"labels": "relevance", "losses": ["point", "pair", "contrastive"]},
    "paper": {"labels": "reader", "losses": ["point", "pair", "contrastive"]},
    "listwise": {"labels": "reader", "losses": ["listwise"]},
    "mix": {"labels": "reader", "losses": ["listwise", "point", "pair", "contrastive"]},
    "relevance-mix": {"labels": "relevance", "losses": ["listwise", "point", "pair", "contrastive"]},
}
CONTROL = {"listwise": "relevance", "paper": "relevance-paper", "mix": "relevance-mix"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def take_prefix(src: Path, n: int | None, dest: Path) -> tuple[Path, int]:
    """The first ``n`` preference records (all with ``None``) as their own file (mine appends chunk by chunk, so a
    running mine's file is a valid prefix)."""
    lines = [x for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    lines = lines if n is None else lines[:n]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return dest, len(lines)


def per_list(lists: list[dict[str, Any]], scores: list[list[float]] | str) -> dict[str, list[float]]:
    """Per held-out list: nDCG@3, top-1 gain, top-1 has-answer (the pure metric of train-reranker's report)."""
    from dpa_rag.reranker.metrics import utility_metrics

    out: dict[str, list[float]] = {"ndcg@3": [], "top1_gain": [], "top1_has_answer": []}
    for i, rec in enumerate(lists):
        m = utility_metrics([rec], scores if isinstance(scores, str) else [scores[i]])
        out["ndcg@3"].append(m["ndcg@3"])
        out["top1_gain"].append(m["top1_gain"])
        out["top1_has_answer"].append(m.get("top1_has_answer", 0.0))
    return out


def score(model: str, lists: list[dict[str, Any]], max_length: int) -> list[list[float]]:
    from dpa_rag.reranker import Reranker
    from dpa_rag.reranker.evaluation import utility_lists

    rr = Reranker(model, device="cpu", dtype="fp32", max_length=max_length, fusion="off")
    return [rr.score(q, docs) for q, docs in utility_lists(lists)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preferences", type=Path, required=True,
                    help="graded preferences.jsonl (mine --label-rule loglik)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--questions", type=int, default=None, help="use only the first N mined questions")
    ap.add_argument("--valid", type=int, default=50, help="held-out questions that pick the best checkpoint")
    ap.add_argument("--test", type=int, default=100, help="held-out questions that judge")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 300], help="training-set sizes (questions)")
    ap.add_argument("--rows", nargs="+", default=["relevance", "listwise", "paper"], choices=list(ROWS))
    ap.add_argument("--curve-rows", nargs="+", default=None, choices=list(ROWS),
                    help="rows trained at every size (default: all --rows); the others only at the largest size")
    ap.add_argument("--backbone", default="minilm")
    from dpa_rag.reranker.kinds import kind_names

    ap.add_argument("--kind", default="auto", choices=["auto", *kind_names()],
                    help="reranker kind to train (auto: a bi-encoder for an embedding backbone; cross-encoder: a new "
                    "classification head on it); the untrained row is always the backbone as a bi-encoder")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128, help="training truncation (tokens)")
    ap.add_argument("--eval-max-length", type=int, default=256, help="scoring truncation of the held-out lists")
    ap.add_argument("--evals-per-epoch", type=int, default=4,
                    help="held-out (valid) evaluations per epoch; the best one is kept (the stopping point is chosen "
                    "on the valid lists)")
    ap.add_argument("--weighting", default="mgda-ub", help="weighting of the paper losses (MGDA-UB: one backward)")
    ap.add_argument("--listwise-temperature", type=float, default=1.0)
    ap.add_argument("--rank-list-size", type=int, default=5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--bootstrap", type=int, default=10000)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from dpa_rag.eval.bootstrap import paired_bootstrap
    from dpa_rag.mining.reranker_data import RerankerDataConfig
    from dpa_rag.mining.reranker_data import run as build_data
    from dpa_rag.reranker.config import TrainRerankerConfig
    from dpa_rag.reranker.evaluation import load_utility_lists
    from dpa_rag.reranker.train import run as train_reranker

    out: Path = args.out
    prefs, n_mined = take_prefix(args.preferences, args.questions, out / "preferences.jsonl")
    n_train_max = n_mined - args.valid - args.test
    sizes = sorted({min(s, n_train_max) for s in args.sizes})
    curve_rows = args.curve_rows or args.rows
    plan = [(row, size) for size in sorted(sizes, reverse=True) for row in args.rows  # the largest first
            if row in curve_rows or size == sizes[-1]]
    print(f"cpu: {cpu_model()}; {n_mined} mined questions: valid {args.valid}, test {args.test}, train ≤ "
          f"{n_train_max}; sizes {sizes}; rows {args.rows}")

    @functools.cache  # listwise and paper share the reader-labelled set of a size
    def data(labels: str, size: int) -> Any:
        return build_data(RerankerDataConfig(
            preferences=prefs, out_dir=out / f"data-{labels}-{size}", rank_list_size=args.rank_list_size,
            valid_questions=args.valid, test_questions=args.test, limit_train=size, labels=labels, seed=args.seed))

    results: dict[str, Any] = {"cpu": cpu_model(), "mined_questions": n_mined, "valid": args.valid,
                               "test": args.test, "sizes": sizes, "settings": vars(args) | {
                                   "preferences": str(args.preferences), "out": str(out)}, "rows": {}}
    mine_manifest = args.preferences.parent / "manifest.json"
    if mine_manifest.exists():
        results["mining"] = json.loads(mine_manifest.read_text()).get("timings")
    test_lists = None
    for row, size in plan:
        spec = ROWS[row]
        d = data(spec["labels"], size)
        stats = json.loads(d.stats.read_text())
        test_lists = test_lists or load_utility_lists(str(d.test_lists))
        target = out / f"train-{row}-{size}"
        done = target / "effect_done.json"
        steps_per_epoch = max(1, math.ceil(stats["train"]["kept"] / args.batch_size))
        eval_steps = max(1, steps_per_epoch // args.evals_per_epoch)
        settings = {"losses": spec["losses"], "epochs": args.epochs, "eval_steps": eval_steps,
                    "lr": args.lr, "batch": args.batch_size,
                    "max_length": args.max_length, "weighting": args.weighting, "seed": args.seed,
                    "listwise_temperature": args.listwise_temperature, "train_records": stats["train"]["kept"],
                    **({"kind": args.kind} if args.kind != "auto" else {})}
        if not (done.exists() and json.loads(done.read_text()).get("settings") == settings):
            shutil.rmtree(target, ignore_errors=True)  # other settings: start over, not resume
            t0 = time.perf_counter()
            train_reranker(TrainRerankerConfig(
                train=str(d.train), utility_valid=str(d.valid_lists), utility_test=str(d.test_lists),
                backbone=args.backbone, kind=args.kind, out_dir=str(target), losses=spec["losses"],
                weighting=args.weighting,
                epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                listwise_temperature=args.listwise_temperature, metric_for_best_model="utility_ndcg@3",
                eval_strategy="steps", eval_steps=eval_steps,
                seed=args.seed, device="cpu"))
            done.write_text(json.dumps({"settings": settings, "seconds": time.perf_counter() - t0}))
        info = json.loads(done.read_text())
        scores = score(str(target / "model"), test_lists, args.eval_max_length)
        results["rows"][f"{row}@{size}"] = {"row": row, "size": size, "records": stats["train"]["kept"],
                                            "train_seconds": info["seconds"], **per_list(test_lists, scores)}
        print(f"{row}@{size}: {stats['train']['kept']} records, {info['seconds']:.0f} s, nDCG@3 "
              f"{sum(results['rows'][f'{row}@{size}']['ndcg@3']) / len(test_lists):.4f}")
    assert test_lists is not None
    base = {"row": "untrained", "size": 0, "records": 0, "train_seconds": 0.0,
            **per_list(test_lists, score(args.backbone, test_lists, args.eval_max_length))}
    results["rows"] = {"retriever order": {"row": "retriever", "size": 0, **per_list(test_lists, "retriever")},
                       "oracle": {"row": "oracle", "size": 0, **per_list(test_lists, "oracle")},
                       "untrained": base, **results["rows"]}

    def ci(a: list[float], b: list[float]) -> dict[str, float]:
        return paired_bootstrap(a, b, n_resamples=args.bootstrap, seed=0)

    table = []
    for name, r in results["rows"].items():
        n = len(r["ndcg@3"])
        line = {"name": name, "row": r["row"], "size": r["size"], "records": r.get("records"),
                "train_seconds": r.get("train_seconds"), "ndcg@3": sum(r["ndcg@3"]) / n,
                "top1_gain": sum(r["top1_gain"]) / n, "top1_has_answer": sum(r["top1_has_answer"]) / n}
        if r["row"] in ROWS:
            line["vs_untrained"] = ci(base["ndcg@3"], r["ndcg@3"])
            control = results["rows"].get(f"{CONTROL.get(r['row'])}@{r['size']}")
            if control is not None:
                line["vs_relevance"] = ci(control["ndcg@3"], r["ndcg@3"])
        table.append(line)
    results["table"] = table
    (out / "effect.json").write_text(json.dumps(results, indent=1))
    md = markdown(results, len(test_lists))
    (out / "effect.md").write_text(md)
    plot(results, out / "effect.png")
    print(md)


def _ci(d: dict[str, float] | None) -> str:
    if not d:
        return ""
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]"


def markdown(results: dict[str, Any], n_test: int) -> str:
    lines = [f"Held-out training-split lists: {n_test} questions (judging), {results['valid']} more pick each "
             f"training's checkpoint; {results['mined_questions']} mined questions; CPU: {results['cpu']}.", "",
             "| row | train questions | records | train s | nDCG@3 | top-1 gain | top-1 has answer "
             "| Δ nDCG@3 vs untrained [95% CI] | Δ vs relevance control, same data [95% CI] |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["table"]:
        secs = f"{r['train_seconds']:.0f}" if r.get("train_seconds") else ""
        lines.append(f"| {r['row']} | {r['size'] or ''} | {r.get('records') or ''} | {secs} | {r['ndcg@3']:.4f} | "
                     f"{r['top1_gain']:.2f} | {r['top1_has_answer']:.3f} | {_ci(r.get('vs_untrained'))} | "
                     f"{_ci(r.get('vs_relevance'))} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    by_row: dict[str, list[tuple[int, float]]] = {}
    for r in results["table"]:
        if r["row"] in ROWS:
            by_row.setdefault(r["row"], []).append((r["size"], r["ndcg@3"]))
    for row, pts in by_row.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=row)
    for r in results["table"]:
        if r["row"] in ("untrained", "retriever", "oracle"):
            ax.axhline(r["ndcg@3"], linestyle="--", linewidth=1, label=r["row"], color={
                "untrained": "grey", "retriever": "brown", "oracle": "green"}[r["row"]])
    ax.set_xlabel("training questions")
    ax.set_ylabel("utility nDCG@3 (held-out lists)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
