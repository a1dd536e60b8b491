"""The DPA-RAG pipeline as a graph of steps over the stage functions.

split → index → retrieve (train/eval, + baseline retrievers) → mine → augment → filter → reranker-data →
train-reranker → rerank (train/eval) → llm-data → train-llm (prealign → sft) → answer (every system) → report.

Each step's config is built from the pipeline config: the stage's section (any option of the stage's own command)
plus the input/output paths the pipeline wires. Ablation switches disable steps; the systems compared in the report
follow from what is enabled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from dpa_rag.config import ConfigError
from dpa_rag.mining.labels import normalize_rule
from dpa_rag.pipeline.config import PipelineConfig
from dpa_rag.pipeline.launcher import launched
from dpa_rag.pipeline.runner import Step

__all__ = ["SYSTEMS", "aligned_model_folder", "build_steps", "main_retriever", "system_steps"]

# report name → (answer step, description)
SYSTEMS = {
    "closed_book": "reader alone, no passages",
    "retriever": "retriever top-k + base reader (vanilla RAG)",
    "reranker": "+ aligned reranker (base reader)",
    "aligned_reader": "retriever top-k + self-aligned reader",
    "full": "DPA-RAG: aligned reranker + self-aligned reader",
    "closed_book_aligned": "self-aligned reader alone, no passages",
}


def _make(
    cls: type[BaseModel],
    section_name: str,
    section: dict[str, Any],
    wired: dict[str, Any],
    defaults: dict[str, Any] | None = None,
) -> BaseModel:
    """defaults (shared reader options, …) < the stage's section < what the pipeline wires (paths)."""
    clash = sorted(set(section) & set(wired))
    if clash:
        raise ConfigError(
            f"sections.{section_name}: {', '.join(clash)} {'is' if len(clash) == 1 else 'are'} set by the pipeline"
        )
    try:
        return cls.model_validate({**(defaults or {}), **section, **wired})
    except ValidationError as exc:
        msgs = []
        for e in exc.errors():
            key = ".".join(str(p) for p in e["loc"])
            msgs.append(f"unknown key '{key}'" if e["type"] == "extra_forbidden" else f"'{key}': {e['msg']}")
        raise ConfigError(f"sections.{section_name}: " + "; ".join(msgs)) from None


def _reader(cfg: PipelineConfig, **override: Any) -> dict[str, Any]:
    opts = {"cache_dir": str(cfg.out_dir / "cache"), **cfg.reader, **override}
    return opts


def _lazy(module: str, fn: str) -> Callable[[Any], Any]:
    def run(stage_cfg: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), fn)(stage_cfg)

    return run


def main_retriever(cfg: PipelineConfig) -> str:
    """``file`` when the run starts from a given retrieval file (``retrieval_file``), else ``cfg.retriever``."""
    return "file" if cfg.retrieval_file is not None else cfg.retriever


def aligned_model_folder(cfg: PipelineConfig, stage: str = "sft") -> str:
    """Where the self-aligned reader's weights land: ``model/`` after full fine-tuning, ``merged/`` for LoRA/QLoRA
    (the SFT step merges), ``adapter/`` for a LoRA pre-aligned run (it is continued, not merged)."""
    method = {**cfg.section("train_llm"), **cfg.section(f"train_llm_{stage}")}.get("method", "lora")
    if method == "full":
        return "model"
    return "merged" if stage == "sft" else "adapter"


def system_steps(cfg: PipelineConfig) -> dict[str, str]:
    """Which answer step produces each system of the report, for the enabled parts."""
    main = main_retriever(cfg)
    out = {"closed_book": "answer-closed-book", "retriever": f"answer-{main}"}
    if cfg.reranker:
        out["reranker"] = "answer-reranker"
    if cfg.train_llm:
        out["aligned_reader"] = "answer-aligned-reader"
        out["closed_book_aligned"] = "answer-closed-book-aligned"
    if cfg.reranker and cfg.train_llm:
        out["full"] = "answer-full"
    for method in cfg.compare_retrievers:
        if method != main:
            out[method] = f"answer-{method}"
    for k in cfg.extra_top_k:
        if k == cfg.top_k:
            continue
        for name in ("retriever", "reranker", *[m for m in cfg.compare_retrievers if m != main]):
            if name in out:
                out[f"{name}@{k}"] = f"{out[name]}-top{k}"
    return {k: v for k, v in out.items() if k.split("@")[0] not in cfg.skip_systems}


def build_steps(cfg: PipelineConfig) -> list[Step]:  # noqa: C901 - one linear recipe, easier to read flat
    """The ordered steps of a run (disabled ones included, marked ``enabled=False``)."""
    from dpa_rag.augment.augment import AugmentConfig
    from dpa_rag.augment.filter import FilterConfig
    from dpa_rag.llm.config import TrainLLMConfig
    from dpa_rag.mining.llm_data import LLMDataConfig
    from dpa_rag.mining.mine import MineConfig
    from dpa_rag.mining.reranker_data import RerankerDataConfig
    from dpa_rag.pipeline.split import SplitConfig
    from dpa_rag.rag.answer import AnswerConfig
    from dpa_rag.reranker.config import RerankConfig, TrainRerankerConfig
    from dpa_rag.retrieval.index import IndexConfig
    from dpa_rag.retrieval.retrieve import RetrieveConfig

    s = cfg.section
    main = main_retriever(cfg)
    methods = list(dict.fromkeys([main, *cfg.compare_retrievers]))
    searched = [m for m in methods if m != "file"]  # retrievers that need the index
    kinds = {"bm25" if m == "bm25" else "dense" if m == "dense" else "both" for m in searched}
    index_kind = ("both" if len(kinds) > 1 or "both" in kinds else kinds.pop()) if kinds else "bm25"
    steps: list[Step] = []

    def names(section: str | tuple[str, ...]) -> tuple[str, ...]:
        return (section,) if isinstance(section, str) else section

    def merged(section: str | tuple[str, ...]) -> dict[str, Any]:
        """A step's options: its sections merged in order (e.g. train_llm, then train_llm_sft)."""
        out: dict[str, Any] = {}
        for name in names(section):
            out.update(s(name))
        return out

    # the pipeline's dedupe_ids reaches every stage config that has the field (a section may still set it)
    dedupe = {"dedupe_ids": True} if cfg.dedupe_ids else {}

    def add(name, deps, cls, section, wired, run, enabled=True, defaults=None):
        steps.append(
            Step(
                name=name,
                deps=deps,
                make_config=lambda f, cls=cls, section=section, wired=wired, defaults=defaults: _make(
                    cls, "+".join(names(section)), merged(section), wired(f),
                    {**(dedupe if "dedupe_ids" in cls.model_fields else {}), **(defaults(f) if defaults else {})},
                ),
                run=run,
                enabled=enabled,
            )
        )

    add(
        "split", [], SplitConfig, "split",
        lambda f: {
            "questions": cfg.questions or cfg.retrieval_file,
            "eval_questions": cfg.eval_questions or cfg.eval_retrieval_file, "out_dir": f["split"],
            "eval_fraction": cfg.eval_fraction, "train_limit": cfg.train_limit, "eval_limit": cfg.eval_limit,
            "seed": cfg.seed,
        },
        _lazy("dpa_rag.pipeline.split", "run_split"),
    )
    add(
        "index", [], IndexConfig, "index",
        lambda f: {"corpus": cfg.corpus, "out_dir": f["index"], "kind": index_kind},
        _lazy("dpa_rag.retrieval.index", "run_index"), enabled=bool(searched),
    )
    for part in ("train", "eval"):
        for method in methods if part == "eval" else [main]:
            name = f"retrieve-{part}" if method == main else f"retrieve-{part}-{method}"
            if method == "file":  # bring your own retrieval: the given file, cut to the split's questions
                from dpa_rag.pipeline.import_retrieval import ImportRetrievalConfig

                given = cfg.eval_retrieval_file if part == "eval" and cfg.eval_retrieval_file else cfg.retrieval_file
                add(
                    name, ["split"], ImportRetrievalConfig, "retrieval_file",
                    lambda f, part=part, name=name, given=given: {
                        "input": given, "questions": f["split"] / f"{part}_questions.jsonl", "out_dir": f[name],
                        "top_k": cfg.retrieve_top_k,
                    },
                    _lazy("dpa_rag.pipeline.import_retrieval", "run_import_retrieval"),
                )
                continue
            add(
                name, ["split", "index"], RetrieveConfig, "retrieve",
                lambda f, part=part, method=method, name=name: {
                    "index_dir": f["index"], "questions": f["split"] / f"{part}_questions.jsonl",
                    "out_dir": f[name], "method": method, "top_k": cfg.retrieve_top_k,
                },
                _lazy("dpa_rag.retrieval.retrieve", "run_retrieve"),
            )

    add(
        "mine", ["retrieve-train"], MineConfig, "mine",
        lambda f: {"retrieval": f["retrieve-train"] / "retrieval.jsonl", "out_dir": f["mine"]},
        _lazy("dpa_rag.mining.mine", "run"), defaults=lambda f: _reader(cfg),
    )
    aug = cfg.augmentation and (cfg.reranker or cfg.train_llm)  # rewrites only feed the training data
    graded = normalize_rule(str(s("mine").get("label_rule", "hit"))) == "loglik"
    add(
        "augment", ["split"], AugmentConfig, "augment",
        lambda f: {"input": f["split"] / "train_questions.jsonl", "out_dir": f["augment"]},
        _lazy("dpa_rag.augment.augment", "run"), enabled=aug,
        defaults=lambda f: _reader(cfg) if cfg.rewriter is None else {"cache_dir": str(cfg.out_dir / "cache"),
                                                                       **cfg.rewriter},
    )
    add(
        "filter", ["augment"], FilterConfig, "filter",
        lambda f: {"input": f["augment"] / "augmented.jsonl", "out_dir": f["filter"], "backend": cfg.filter_backend},
        _lazy("dpa_rag.augment.filter", "run"), enabled=aug,
    )
    aug_questions = (lambda f: f["filter"] / "questions_augmented.jsonl") if aug else (lambda f: None)
    add(
        "reranker-data", ["mine", *(["filter"] if aug else [])], RerankerDataConfig, "reranker_data",
        lambda f: {
            "preferences": f["mine"] / "preferences.jsonl", "out_dir": f["reranker-data"],
            "include_augmented": aug_questions(f),
        },
        _lazy("dpa_rag.mining.reranker_data", "run"),
        enabled=cfg.reranker,
        # under the paper's hit rule a question has aligned or unaligned probes, never both (its closed-book answer
        # is either right or wrong), so the strict pools would drop every question: fill the missing side from the
        # question's own both-correct / both-wrong passages (docs/mining.md)
        # with the graded loglik rule every probe has a gain: `auto` takes the ranked pool
        defaults=lambda f: {"pool": "auto" if graded else "graded", "seed": cfg.seed},
    )
    add(
        "train-reranker", ["reranker-data", "retrieve-train"], TrainRerankerConfig, "train_reranker",
        lambda f: {
            "train": str(f["reranker-data"] / "train.jsonl"), "valid": str(f["reranker-data"] / "valid.jsonl"),
            "test": str(f["reranker-data"] / "test.jsonl"), "out_dir": str(f["train-reranker"]),
            "warmup_retrieval": str(f["retrieve-train"] / "retrieval.jsonl"),
            # held-out questions for the ranking report and the fusion weight: the training split's questions that
            # no reranker training record uses (train_reranker drops the others); never the evaluation questions
            "eval_retrieval": str(f["retrieve-train"] / "retrieval.jsonl"), "seed": cfg.seed,
            # graded preferences: utility ranking on the held-out training-split questions' probed lists
            **({"utility_valid": str(f["reranker-data"] / "valid_lists.jsonl"),
                "utility_test": str(f["reranker-data"] / "test_lists.jsonl")} if graded else {}),
        },
        launched(cfg.launcher, "train-reranker", _lazy("dpa_rag.reranker.train", "train_reranker"),
                 lambda c: c.out_dir),
        enabled=cfg.reranker,
    )
    for part in ("train", "eval"):
        add(
            f"rerank-{part}", ["train-reranker", f"retrieve-{part}"], RerankConfig, "rerank",
            lambda f, part=part: {
                "input": str(f[f"retrieve-{part}"] / "retrieval.jsonl"), "model": str(f["train-reranker"] / "model"),
                "out_dir": str(f[f"rerank-{part}"]), "top_k": max([cfg.top_k, *cfg.extra_top_k]),
            },
            _lazy("dpa_rag.reranker.rerank", "run_rerank"),
            enabled=cfg.reranker and (part == "eval" or cfg.train_llm),
        )
    sft_source = "rerank-train" if cfg.reranker else "retrieve-train"
    sft_file = "reranked.jsonl" if cfg.reranker else "retrieval.jsonl"
    add(
        "llm-data", ["mine", sft_source, *(["filter"] if aug else [])], LLMDataConfig, "llm_data",
        lambda f: {
            "preferences": f["mine"] / "preferences.jsonl", "retrieval": f[sft_source] / sft_file,
            "out_dir": f["llm-data"], "k": cfg.top_k, "include_augmented": aug_questions(f), "seed": cfg.seed,
        },
        _lazy("dpa_rag.mining.llm_data", "run"),
        enabled=cfg.train_llm,
    )
    def prealign_start(folder: Path) -> dict[str, str]:
        """The SFT stage starts from the pre-aligned run: its LoRA adapter, or its model after full fine-tuning."""
        from dpa_rag.llm.merge import init_args_from

        try:
            return init_args_from(folder)
        except FileNotFoundError:  # not trained yet (configs are also built to validate them up front)
            sub = aligned_model_folder(cfg, "prealign")
            return {"init_adapter" if sub == "adapter" else "init_model": str(folder / sub)}

    reader_model = cfg.reader.get("model", "smollm2-135m")
    llm_common = {"model": reader_model}
    add(
        "train-llm-prealign", ["llm-data"], TrainLLMConfig, ("train_llm", "train_llm_prealign"),
        lambda f: {
            **llm_common, "stage": "prealign", "data": [f["llm-data"] / "prealign.jsonl"],
            "out_dir": f["train-llm-prealign"],
        },
        launched(cfg.launcher, "train-llm-prealign", _lazy("dpa_rag.llm.train", "run"),
                 lambda c: c.resolved_out_dir()),
        enabled=cfg.train_llm and cfg.prealign,
        defaults=lambda f: {"seed": cfg.seed},
    )
    add(
        "train-llm-sft", ["llm-data", *(["train-llm-prealign"] if cfg.prealign else [])], TrainLLMConfig,
        ("train_llm", "train_llm_sft"),
        lambda f: {
            **llm_common, "stage": "sft", "data": [f["llm-data"] / "sft.jsonl"],
            "out_dir": f["train-llm-sft"], "merge": True,
            **(prealign_start(f["train-llm-prealign"]) if cfg.prealign else {}),
        },
        launched(cfg.launcher, "train-llm-sft", _lazy("dpa_rag.llm.train", "run"), lambda c: c.resolved_out_dir()),
        enabled=cfg.train_llm, defaults=lambda f: {"seed": cfg.seed},
    )

    def aligned(f: dict[str, Path]) -> dict[str, Any]:
        """Generator options of the self-aligned reader: local transformers on the trained model, unless given."""
        if cfg.aligned_reader is not None:
            return dict(cfg.aligned_reader)
        backend = cfg.reader.get("backend", "hf")
        # LoRA runs are merged into merged/ (merge: true); full fine-tuning writes model/
        model = f["train-llm-sft"] / aligned_model_folder(cfg)
        return {"backend": backend if backend in ("hf", "vllm", "fake") else "hf", "model": str(model)}

    answers = {
        "answer-closed-book": (["split"], lambda f: {"questions": f["split"] / "eval_questions.jsonl", "top_k": 0},
                               True),
        f"answer-{main}": (["retrieve-eval"],
                                    lambda f: {"retrieval": f["retrieve-eval"] / "retrieval.jsonl"}, True),
        "answer-reranker": (["rerank-eval"], lambda f: {"retrieval": Path(f["rerank-eval"]) / "reranked.jsonl"},
                            cfg.reranker),
        "answer-aligned-reader": (
            ["retrieve-eval", "train-llm-sft"],
            lambda f: {"retrieval": f["retrieve-eval"] / "retrieval.jsonl", **aligned(f)},
            cfg.train_llm,
        ),
        "answer-closed-book-aligned": (
            ["split", "train-llm-sft"],
            lambda f: {"questions": f["split"] / "eval_questions.jsonl", "top_k": 0, **aligned(f)},
            cfg.train_llm,
        ),
        "answer-full": (
            ["rerank-eval", "train-llm-sft"],
            lambda f: {"retrieval": Path(f["rerank-eval"]) / "reranked.jsonl", **aligned(f)},
            cfg.reranker and cfg.train_llm,
        ),
    }
    for method in methods:
        if method != main:
            answers[f"answer-{method}"] = (
                [f"retrieve-eval-{method}"],
                lambda f, m=method: {"retrieval": f[f"retrieve-eval-{m}"] / "retrieval.jsonl"},
                True,
            )
    for k in cfg.extra_top_k:  # the same systems with fewer passages (e.g. the top-1)
        for base in [f"answer-{main}", "answer-reranker", *[f"answer-{m}" for m in methods if m != main]]:
            deps, wired, enabled = answers[base]
            answers[f"{base}-top{k}"] = (deps, lambda f, wired=wired, k=k: {**wired(f), "top_k": k}, enabled)
    wanted = set(system_steps(cfg).values())
    for name, (deps, wired, enabled) in answers.items():
        enabled = enabled and name in wanted
        add(
            name, deps, AnswerConfig, "answer",
            lambda f, wired=wired, name=name: {"top_k": cfg.top_k, **wired(f), "out_dir": f[name]},
            _lazy("dpa_rag.rag.answer", "run_answer"), enabled=enabled, defaults=lambda f: _reader(cfg),
        )
    from dpa_rag.pipeline.report import ReportConfig

    report_deps = list(system_steps(cfg).values())
    add(
        "report", report_deps, ReportConfig, "report",
        lambda f: {
            "out_dir": f["report"], "run_dir": cfg.out_dir,
            "systems": {k: str(f[v]) for k, v in system_steps(cfg).items()},
            "top_k": cfg.top_k, "retriever": main if main != "file" else f"given file ({cfg.retrieval_file})",
            "steps": [st.name for st in steps if st.enabled],
        },
        _lazy("dpa_rag.pipeline.report", "run_report"),
    )
    return steps
