"""The DPA-RAG pipeline as a graph of steps over the stage modules.

split → index → retrieve (train/eval, + baseline retrievers) → mine → augment → filter → reranker-data →
train-reranker → rerank (train/eval) → llm-data → train-llm (prealign → sft) → promote → answer (every system) →
report.

Every stage module has the same face: ``Config`` (its pydantic config), ``run(cfg) -> Outputs`` and ``Outputs``
(its files; ``Outputs.at(folder)`` names them). :func:`build_steps` is a table of step declarations: the stage, the
``sections`` it reads options from (any option of the stage's own command), its upstream steps, and the inputs the
pipeline wires from the upstream steps' ``Outputs``. Ablation switches disable steps; the systems compared in the
report follow from what is enabled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel, ValidationError

from dpa_rag.augment import augment
from dpa_rag.augment import filter as consistency_filter
from dpa_rag.config import ConfigError
from dpa_rag.llm import train as llm_train
from dpa_rag.llm.merge import init_args_from
from dpa_rag.mining import llm_data, mine, reranker_data
from dpa_rag.mining.labels import normalize_rule
from dpa_rag.pipeline import import_retrieval, promote, report, split
from dpa_rag.pipeline.config import PipelineConfig
from dpa_rag.pipeline.launcher import launched
from dpa_rag.pipeline.runner import Step
from dpa_rag.rag import answer
from dpa_rag.reranker import rerank
from dpa_rag.reranker import train as reranker_train
from dpa_rag.retrieval import index, retrieve

__all__ = ["SYSTEMS", "Decl", "build_steps", "main_retriever", "system_steps"]

# report name → description
SYSTEMS = {
    "closed_book": "reader alone, no passages",
    "retriever": "retriever top-k + base reader (vanilla RAG)",
    "reranker": "+ aligned reranker (base reader)",
    "aligned_reader": "retriever top-k + self-aligned reader",
    "full": "DPA-RAG: aligned reranker + self-aligned reader",
    "closed_book_aligned": "self-aligned reader alone, no passages",
}

Folders = dict[str, Path]  # step name → its folder
LLM_VALID_FRACTION = 0.2  # share of the training-split questions held out for the reader's validation


def main_retriever(cfg: PipelineConfig) -> str:
    """``file`` when the run starts from a given retrieval file (``retrieval_file``), else ``cfg.retriever``."""
    return "file" if cfg.retrieval_file is not None else cfg.retriever


def _llm_method(cfg: PipelineConfig, stage: str) -> str:
    return {**cfg.section("train_llm"), **cfg.section(f"train_llm_{stage}")}.get("method", "lora")


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


@dataclass(frozen=True)
class Decl:
    """One step of the table: ``stage`` (a module with ``Config`` and ``run``) configured from ``sections`` (merged in
    order), ``defaults`` (below the sections) and ``wired`` (the inputs/outputs the pipeline sets, from the
    folders)."""

    name: str
    stage: ModuleType
    sections: tuple[str, ...]
    deps: tuple[str, ...]
    wired: Callable[[Folders], dict[str, Any]]
    enabled: bool = True
    defaults: Callable[[Folders], dict[str, Any]] | None = None
    launch: bool = False  # a training step: runs under the pipeline's launcher


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


class _Wiring:
    """What each step reads from upstream steps' outputs (every file named by the producing stage's ``Outputs``)."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.main = main_retriever(cfg)
        self.methods = list(dict.fromkeys([self.main, *cfg.compare_retrievers]))
        self.searched = [m for m in self.methods if m != "file"]  # retrievers that need the index
        kinds = {"bm25" if m == "bm25" else "dense" if m == "dense" else "both" for m in self.searched}
        self.index_kind = ("both" if len(kinds) > 1 or "both" in kinds else kinds.pop()) if kinds else "bm25"
        self.aug = cfg.augmentation and (cfg.reranker or cfg.train_llm)  # rewrites only feed the training data
        self.graded = normalize_rule(str(cfg.section("mine").get("label_rule", "hit"))) == "loglik"
        self.cache = str(cfg.out_dir / "cache")

    # --- shared option groups ----------------------------------------------------------------------------------

    def reader(self, f: Folders) -> dict[str, Any]:
        """The reader's generator options (mine, answer)."""
        return {"cache_dir": self.cache, **(self.cfg.generator("reader") or {})}

    def rewriter(self, f: Folders) -> dict[str, Any]:
        """The rewriter's generator options (augment): the reader's unless ``rewriter`` is given."""
        given = self.cfg.generator("rewriter")
        return self.reader(f) if given is None else {"cache_dir": self.cache, **given}

    def aligned_reader(self, f: Folders) -> dict[str, Any]:
        """The self-aligned reader: local transformers on the trained model, unless ``aligned_reader`` is given."""
        given = self.cfg.generator("aligned_reader")
        if given is not None:
            return given
        backend = self.cfg.reader.backend
        model = llm_train.Outputs.at(f["train-llm-sft"]).weights(_llm_method(self.cfg, "sft"), merged=True)
        return {"backend": backend if backend in ("hf", "vllm", "fake") else "hf", "model": str(model)}

    def seed(self, f: Folders) -> dict[str, Any]:
        return {"seed": self.cfg.seed}

    # --- files of upstream steps -------------------------------------------------------------------------------

    @staticmethod
    def questions(f: Folders, part: str) -> Path:
        out = split.Outputs.at(f["split"])
        return out.train_questions if part == "train" else out.eval_questions

    @staticmethod
    def retrieval(f: Folders, step: str) -> Path:
        return retrieve.Outputs.at(f[step]).retrieval

    @staticmethod
    def reranked(f: Folders, part: str) -> Path:
        return rerank.Outputs.at(f[f"rerank-{part}"]).reranked

    def aug_questions(self, f: Folders) -> Path | None:
        return consistency_filter.Outputs.at(f["filter"]).questions if self.aug else None

    def prealign_start(self, f: Folders) -> dict[str, str]:
        """The SFT stage starts from the pre-aligned run: its LoRA adapter, or its model after full fine-tuning."""
        folder = f["train-llm-prealign"]
        try:
            return init_args_from(folder)
        except FileNotFoundError:  # not trained yet (configs are also built to validate them up front)
            method = _llm_method(self.cfg, "prealign")
            key = "init_model" if method == "full" else "init_adapter"
            return {key: str(llm_train.Outputs.at(folder).weights(method, merged=False))}

    # --- the steps' wired options ------------------------------------------------------------------------------

    def split(self, f: Folders) -> dict[str, Any]:
        c = self.cfg
        return {
            "questions": c.questions or c.retrieval_file, "eval_questions": c.eval_questions or c.eval_retrieval_file,
            "out_dir": f["split"], "eval_fraction": c.eval_fraction, "train_limit": c.train_limit,
            "eval_limit": c.eval_limit, "seed": c.seed,
        }

    def index(self, f: Folders) -> dict[str, Any]:
        return {"corpus": self.cfg.corpus, "out_dir": f["index"], "kind": self.index_kind}

    def retrieve_steps(self) -> list[Decl]:
        """Retrieval of the training questions (main retriever) and the evaluation ones (every compared one)."""
        out = []
        for part in ("train", "eval"):
            for method in self.methods if part == "eval" else [self.main]:
                name = f"retrieve-{part}" if method == self.main else f"retrieve-{part}-{method}"
                if method == "file":  # bring your own retrieval: the given file, cut to the split's questions
                    c = self.cfg
                    given = c.eval_retrieval_file if part == "eval" and c.eval_retrieval_file else c.retrieval_file
                    wired = lambda f, part=part, name=name, given=given: {  # noqa: E731
                        "input": given, "questions": self.questions(f, part), "out_dir": f[name],
                        "top_k": self.cfg.retrieve_top_k,
                    }
                    out.append(Decl(name, import_retrieval, ("retrieval_file",), ("split",), wired))
                    continue
                wired = lambda f, part=part, method=method, name=name: {  # noqa: E731
                    "index_dir": f["index"], "questions": self.questions(f, part), "out_dir": f[name],
                    "method": method, "top_k": self.cfg.retrieve_top_k,
                }
                out.append(Decl(name, retrieve, ("retrieve",), ("split", "index"), wired))
        return out

    def mine(self, f: Folders) -> dict[str, Any]:
        return {"retrieval": self.retrieval(f, "retrieve-train"), "out_dir": f["mine"]}

    def augment(self, f: Folders) -> dict[str, Any]:
        return {"input": self.questions(f, "train"), "out_dir": f["augment"]}

    def filter(self, f: Folders) -> dict[str, Any]:
        return {"input": augment.Outputs.at(f["augment"]).augmented, "out_dir": f["filter"],
                "backend": self.cfg.filter_backend}

    def reranker_data(self, f: Folders) -> dict[str, Any]:
        return {"preferences": mine.Outputs.at(f["mine"]).preferences, "out_dir": f["reranker-data"],
                "include_augmented": self.aug_questions(f)}

    def reranker_data_defaults(self, f: Folders) -> dict[str, Any]:
        # under the paper's hit rule a question has aligned or unaligned probes, never both (its closed-book answer
        # is either right or wrong), so the strict pools would drop every question: fill the missing side from the
        # question's own both-correct / both-wrong passages (docs/mining.md); with the graded loglik rule every
        # probe has a gain: `auto` takes the ranked pool
        return {"pool": "auto" if self.graded else "graded", "seed": self.cfg.seed}

    def train_reranker(self, f: Folders) -> dict[str, Any]:
        data = reranker_data.Outputs.at(f["reranker-data"])
        train_retrieval = str(self.retrieval(f, "retrieve-train"))
        return {
            "train": str(data.train), "valid": str(data.valid), "test": str(data.test),
            "out_dir": str(f["train-reranker"]), "warmup_retrieval": train_retrieval,
            # held-out questions for the ranking report and the fusion weight: the training split's questions that
            # no reranker training record uses (train_reranker drops the others); never the evaluation questions
            "eval_retrieval": train_retrieval, "seed": self.cfg.seed,
            # graded preferences: utility ranking on the held-out training-split questions' probed lists
            **({"utility_valid": str(data.valid_lists), "utility_test": str(data.test_lists)} if self.graded else {}),
        }

    def rerank(self, f: Folders, part: str) -> dict[str, Any]:
        c = self.cfg
        model = reranker_train.Outputs.at(f["train-reranker"]).model
        return {
            "input": str(self.retrieval(f, f"retrieve-{part}")), "model": str(model),
            "out_dir": str(f[f"rerank-{part}"]), "top_k": max([c.top_k, *c.extra_top_k]),
        }

    def llm_data(self, f: Folders) -> dict[str, Any]:
        sft_retrieval = self.reranked(f, "train") if self.cfg.reranker else self.retrieval(f, "retrieve-train")
        return {
            "preferences": mine.Outputs.at(f["mine"]).preferences, "retrieval": sft_retrieval,
            "out_dir": f["llm-data"], "k": self.cfg.top_k, "include_augmented": self.aug_questions(f),
            "seed": self.cfg.seed,
        }

    def answer_prompt(self) -> dict[str, Any]:
        """The answer step's prompt (template, chat): the reader is trained and validated on the prompts it answers."""
        answer_section = self.cfg.section("answer")
        return {"template": answer_section.get("template", "qa"), "chat": answer_section.get("chat", True)}

    def llm_data_defaults(self, f: Folders) -> dict[str, Any]:
        # hold out a fifth of the training-split questions for the reader's validation and the promotion gate; SFT
        # only on questions whose passages hold a gold answer (a target the passages do not support teaches guessing)
        # closed-book examples with the reader's own closed-book answers keep what it knew without passages
        return {"valid_fraction": LLM_VALID_FRACTION, "sft_filter": "has-answer", "closed_book": "self",
                **self.answer_prompt()}

    def llm_valid_fraction(self, f: Folders) -> float:
        """The llm-data step's held-out share, as that step is configured (its defaults under the user's section)."""
        return float({**self.llm_data_defaults(f), **self.cfg.section("llm_data")}["valid_fraction"])

    def train_llm_defaults(self, f: Folders) -> dict[str, Any]:
        """The seed, and validation answered the answer step's way (passages, template, chat, decoding budget)."""
        c, answer_section, prompt = self.cfg, self.cfg.section("answer"), self.answer_prompt()
        return {
            "seed": c.seed, "valid_top_k": c.top_k, "valid_template": prompt["template"], "valid_chat": prompt["chat"],
            "valid_max_new_tokens": answer_section.get("max_new_tokens", c.reader.max_new_tokens),
            "valid_batch_size": c.reader.batch_size,
        }

    def train_llm(self, f: Folders, stage: str) -> dict[str, Any]:
        data = llm_data.Outputs.at(f["llm-data"])
        out: dict[str, Any] = {"model": self.cfg.reader.model, "stage": stage, "out_dir": f[f"train-llm-{stage}"]}
        if stage == "prealign":  # validated through the SFT stage that starts from it (its step 0)
            return {**out, "data": [data.prealign]}
        if self.llm_valid_fraction(f) > 0:
            out["valid"] = data.valid
        return {**out, "data": [data.sft], "merge": True, **(self.prealign_start(f) if self.cfg.prealign else {})}

    def promote(self, f: Folders) -> dict[str, Any]:
        c = self.cfg
        out: dict[str, Any] = {"out_dir": f["promote"], "reader": c.promote_policy("reader"),
                               "reranker": c.promote_policy("reranker")}
        if c.train_llm:
            out["reader_validation"] = llm_train.Outputs.at(f["train-llm-sft"]).validation
        if c.reranker:
            out["reranker_dir"] = f["train-reranker"]
        return out

    def promoted(self, f: Folders) -> dict[str, bool]:
        """Which aligned components the full system uses (all, before the gate has run: configs are also built up
        front to validate them)."""
        decisions = promote.read_promotion(f["promote"]) or {}
        return {comp: bool(decisions.get(comp, {}).get("promoted", True)) for comp in ("reader", "reranker")}

    def answer_steps(self) -> list[Decl]:
        """One answer step per system of the report (disabled where the system is not wanted)."""
        c, main = self.cfg, self.main
        eval_retrieval = lambda f: {"retrieval": self.retrieval(f, "retrieve-eval")}  # noqa: E731
        reranked = lambda f: {"retrieval": self.reranked(f, "eval")}  # noqa: E731
        closed = lambda f: {"questions": self.questions(f, "eval"), "top_k": 0}  # noqa: E731
        answers: dict[str, tuple[tuple[str, ...], Callable[[Folders], dict[str, Any]], bool]] = {
            "answer-closed-book": (("split",), closed, True),
            f"answer-{main}": (("retrieve-eval",), eval_retrieval, True),
            "answer-reranker": (("rerank-eval",), reranked, c.reranker),
            "answer-aligned-reader": (("retrieve-eval", "train-llm-sft"),
                                      lambda f: {**eval_retrieval(f), **self.aligned_reader(f)}, c.train_llm),
            "answer-closed-book-aligned": (("split", "train-llm-sft"),
                                           lambda f: {**closed(f), **self.aligned_reader(f)}, c.train_llm),
            "answer-full": (("rerank-eval", "train-llm-sft", "promote"), self.full_system, c.reranker and c.train_llm),
        }
        for method in self.methods:
            if method != main:
                step = f"retrieve-eval-{method}"
                answers[f"answer-{method}"] = ((step,), lambda f, s=step: {"retrieval": self.retrieval(f, s)}, True)
        for k in c.extra_top_k:  # the same systems with fewer passages (e.g. the top-1)
            for base in [f"answer-{main}", "answer-reranker", *[f"answer-{m}" for m in self.methods if m != main]]:
                deps, wired, enabled = answers[base]
                answers[f"{base}-top{k}"] = (deps, lambda f, wired=wired, k=k: {**wired(f), "top_k": k}, enabled)
        wanted = set(system_steps(c).values())
        return [
            Decl(name, answer, ("answer",), deps,
                 lambda f, wired=wired, name=name: {"top_k": c.top_k, **wired(f), "out_dir": f[name]},
                 enabled=enabled and name in wanted, defaults=self.reader)
            for name, (deps, wired, enabled) in answers.items()
        ]

    def full_system(self, f: Folders) -> dict[str, Any]:
        """DPA-RAG as promoted: the reranked passages if the reranker passed the gate (else the retriever's), the
        self-aligned reader if it passed (else the base reader)."""
        ok = self.promoted(f)
        passages = {"retrieval": self.reranked(f, "eval") if ok["reranker"] else self.retrieval(f, "retrieve-eval")}
        return {**passages, **(self.aligned_reader(f) if ok["reader"] else {})}

    def report(self, f: Folders, enabled_steps: list[str]) -> dict[str, Any]:
        c = self.cfg
        return {
            "out_dir": f["report"], "run_dir": c.out_dir,
            "systems": {k: str(f[v]) for k, v in system_steps(c).items()},
            "top_k": c.top_k, "retriever": self.main if self.main != "file" else f"given file ({c.retrieval_file})",
            "steps": enabled_steps,
            **({"promotion": promote.Outputs.at(f["promote"]).promotion} if c.train_llm or c.reranker else {}),
        }


def _table(cfg: PipelineConfig, w: _Wiring) -> list[Decl]:
    """The ordered step declarations of a run (disabled ones included)."""
    aug = ("filter",) if w.aug else ()
    sft_source = "rerank-train" if cfg.reranker else "retrieve-train"
    return [
        Decl("split", split, ("split",), (), w.split),
        Decl("index", index, ("index",), (), w.index, enabled=bool(w.searched)),
        *w.retrieve_steps(),
        Decl("mine", mine, ("mine",), ("retrieve-train",), w.mine, defaults=w.reader),
        Decl("augment", augment, ("augment",), ("split",), w.augment, enabled=w.aug, defaults=w.rewriter),
        Decl("filter", consistency_filter, ("filter",), ("augment",), w.filter, enabled=w.aug),
        Decl("reranker-data", reranker_data, ("reranker_data",), ("mine", *aug), w.reranker_data,
             enabled=cfg.reranker, defaults=w.reranker_data_defaults),
        Decl("train-reranker", reranker_train, ("train_reranker",), ("reranker-data", "retrieve-train"),
             w.train_reranker, enabled=cfg.reranker, launch=True),
        *[Decl(f"rerank-{part}", rerank, ("rerank",), ("train-reranker", f"retrieve-{part}"),
               lambda f, part=part: w.rerank(f, part), enabled=cfg.reranker and (part == "eval" or cfg.train_llm))
          for part in ("train", "eval")],
        Decl("llm-data", llm_data, ("llm_data",), ("mine", sft_source, *aug), w.llm_data, enabled=cfg.train_llm,
             defaults=w.llm_data_defaults),
        Decl("train-llm-prealign", llm_train, ("train_llm", "train_llm_prealign"), ("llm-data",),
             lambda f: w.train_llm(f, "prealign"), enabled=cfg.train_llm and cfg.prealign,
             defaults=w.train_llm_defaults, launch=True),
        Decl("train-llm-sft", llm_train, ("train_llm", "train_llm_sft"),
             ("llm-data", *(("train-llm-prealign",) if cfg.prealign else ())), lambda f: w.train_llm(f, "sft"),
             enabled=cfg.train_llm, defaults=w.train_llm_defaults, launch=True),
        Decl("promote", promote, ("promote",),
             (*(("train-llm-sft",) if cfg.train_llm else ()), *(("train-reranker",) if cfg.reranker else ())),
             w.promote, enabled=cfg.train_llm or cfg.reranker),
        *w.answer_steps(),
    ]


def _step(cfg: PipelineConfig, d: Decl) -> Step:
    """A runnable step from a declaration: its config is built when the runner asks (folders known by then)."""
    # the pipeline's dedupe_ids reaches every stage config that has the field (a section may still set it)
    dedupe = {"dedupe_ids": True} if cfg.dedupe_ids and "dedupe_ids" in d.stage.Config.model_fields else {}

    def make_config(f: Folders) -> BaseModel:
        section: dict[str, Any] = {}
        for name in d.sections:  # e.g. train_llm, then train_llm_sft
            section.update(cfg.section(name))
        defaults = {**dedupe, **(d.defaults(f) if d.defaults else {})}
        return _make(d.stage.Config, "+".join(d.sections), section, d.wired(f), defaults)

    run = d.stage.run
    if d.launch:
        run = launched(cfg.launcher, d.name, run, lambda c: Path(c.out_dir))
    return Step(name=d.name, deps=list(d.deps), make_config=make_config, run=run, enabled=d.enabled,
                outputs=d.stage.Outputs.written)


def build_steps(cfg: PipelineConfig) -> list[Step]:
    """The ordered steps of a run (disabled ones included, marked ``enabled=False``)."""
    w = _Wiring(cfg)
    steps = [_step(cfg, d) for d in _table(cfg, w)]
    enabled = [*(s.name for s in steps if s.enabled), "report"]
    gate = ("promote",) if cfg.train_llm or cfg.reranker else ()  # the report's "Promotion gate" section reads it
    steps.append(_step(cfg, Decl("report", report, ("report",), (*system_steps(cfg).values(), *gate),
                                 lambda f: w.report(f, enabled))))
    return steps
