"""The pipeline configuration: data, shared reader, ablation switches and per-stage sections.

A pipeline YAML looks like::

    out_dir: runs/nq
    questions: data/nq_questions.jsonl
    corpus: [data/corpus.jsonl]
    reader: {model: smollm2-135m, batch_size: 16}
    retriever: bm25
    augmentation: true
    reranker: true
    prealign: true
    train_llm: true
    sections:
      mine: {ranks: [1, 5, 10, 20]}
      train_reranker: {num_train_epochs: 3, losses: [point, pair, contrastive], weighting: mgda}
      train_llm_sft: {max_steps: 40}

A section holds any option of that stage's own command (``dpa-rag <stage> --help``), except the input/output paths,
which the pipeline wires. Unknown keys are errors that name the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_serializer, field_validator, model_validator

from dpa_rag.config import StageConfig
from dpa_rag.data.loaders import dedupe_ids_field
from dpa_rag.generation.base import GeneratorOptions
from dpa_rag.pipeline.launcher import LauncherConfig

__all__ = ["SECTION_NAMES", "PipelineConfig"]

SECTION_NAMES = (
    "split",
    "index",
    "retrieve",
    "mine",
    "augment",
    "filter",
    "reranker_data",
    "train_reranker",
    "rerank",
    "llm_data",
    "train_llm",
    "train_llm_prealign",
    "train_llm_sft",
    "promote",
    "answer",
    "report",
)


class PipelineConfig(StageConfig):
    """Everything ``dpa-rag run`` needs; see the module docstring for the YAML layout."""

    out_dir: Path = Field(Path("runs/dpa"), description="Run folder; each step writes to a sub-folder.")
    questions: Path | None = Field(
        None, description="Questions with gold answers (any layout load_questions reads); default: the questions of "
        "`retrieval_file`."
    )
    eval_questions: Path | None = Field(
        None, description="Held-out evaluation questions; default: a seeded split of `questions`."
    )
    corpus: list[Path] = Field(
        default_factory=list,
        description="Corpus files for the retrieval index (any layout load_corpus reads); not needed when the "
        "retrieval files are given and no baseline retriever is compared.",
    )
    retrieval_file: Path | None = Field(
        None,
        description="Bring your own retrieval: a DPR/FiD or FlashRAG retrieval file (top-100, has_answer computed "
        "when absent) of the training questions (and of the evaluation ones unless `eval_retrieval_file`); the "
        "pipeline uses it instead of building an index and retrieving.",
    )
    eval_retrieval_file: Path | None = Field(
        None, description="Retrieval file of the evaluation questions (default: `retrieval_file`)."
    )
    eval_fraction: float = Field(0.4, gt=0, lt=1, description="Share of `questions` held out when no eval file.")
    train_limit: int | None = Field(None, ge=1, description="At most N training questions.")
    eval_limit: int | None = Field(None, ge=1, description="At most N evaluation questions.")
    seed: int = Field(42, description="Seed for splits and training.")
    dedupe_ids: bool = dedupe_ids_field()
    retriever: Literal["bm25", "dense", "hybrid"] = Field("bm25", description="Retriever feeding the system.")
    compare_retrievers: list[Literal["bm25", "dense", "hybrid"]] = Field(
        default_factory=list, description="Extra retrievers reported as baselines (their own top-k, base reader)."
    )
    retrieve_top_k: int = Field(100, ge=1, description="Candidates retrieved per question (the paper: 100).")
    top_k: int = Field(3, ge=1, description="Passages the reader sees (the paper: 3; 2 for WebQSP).")
    extra_top_k: list[int] = Field(
        default_factory=list,
        description="Also answer with the top N passages (e.g. [1]) for the retriever, the compared retrievers and "
        "the aligned reranker: systems `<name>@N` in the report (one more reader pass each).",
    )
    reader: GeneratorOptions = Field(
        default_factory=GeneratorOptions,
        description="Reader generator options (backend, model, batch_size, dtype, …: `dpa-rag answer --help`).",
    )
    rewriter: GeneratorOptions | None = Field(
        None, description="Generator options for query augmentation (default: the reader's)."
    )
    aligned_reader: GeneratorOptions | None = Field(
        None,
        description="Generator options of the self-aligned reader (default: the reader's backend on the merged "
        "model folder; give a server here when the reader runs behind vLLM/OpenAI-compatible endpoints).",
    )
    augmentation: bool = Field(True, description="Ablation: query augmentation + consistency filter.")
    filter_backend: Literal["similarity", "nli"] = Field("similarity", description="Consistency filter backend.")
    reranker: bool = Field(True, description="Ablation: train and use the preference-aligned reranker.")
    train_llm: bool = Field(True, description="Ablation: self-align the reader (LoRA SFT).")
    prealign: bool = Field(True, description="Ablation: run the pre-aligned stage before SFT.")
    promote: Literal["auto", "always", "never"] | dict[Literal["reader", "reranker"], Literal[
        "auto", "always", "never"]] = Field(
        "auto",
        description="Promotion gate of the aligned components into the full system (DPA-RAG row, `serve --run`): "
        "auto (only a component not worse than its baseline on held-out training-split questions: the reader vs "
        "the base reader, the reranker vs the retriever's order), always, never; or per component, e.g. "
        "{reader: auto, reranker: always}.",
    )
    skip_systems: list[Literal["closed_book", "reranker", "aligned_reader", "closed_book_aligned", "full"]] = Field(
        default_factory=list,
        description="Report systems not to answer (saves reader time: each is one pass over the evaluation "
        "questions); the retriever baseline always runs.",
    )
    sections: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-stage options: " + ", ".join(SECTION_NAMES) + "."
    )
    launcher: LauncherConfig = Field(
        default_factory=LauncherConfig,
        description="Run the training steps under a launcher: {kind: none|accelerate|deepspeed, config_file, "
        "num_processes, extra_args} (docs/scale.md).",
    )

    @field_validator("promote", mode="before")
    @classmethod
    def _promote(cls, v: Any) -> Any:
        policies, parts = ("auto", "always", "never"), ("reader", "reranker")
        items = v.items() if isinstance(v, dict) else [("", v)]
        for part, policy in items:
            if (part and part not in parts) or policy not in policies:
                raise ValueError(f"expected one of {', '.join(policies)}, or a mapping such as "
                                 f"{{reader: auto, reranker: always}}; got {v!r}")
        return v

    @field_validator("sections")
    @classmethod
    def _known_sections(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(v) - set(SECTION_NAMES))
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTION_NAMES)}")
        for name, body in v.items():
            if not isinstance(body, dict):
                raise ValueError(f"section '{name}' must be a mapping")
        return v

    @model_validator(mode="after")
    def _extra_top_k(self) -> PipelineConfig:
        bad = [k for k in self.extra_top_k if not 1 <= k <= self.retrieve_top_k]
        if bad:
            raise ValueError(f"extra_top_k must be between 1 and retrieve_top_k ({self.retrieve_top_k}); got {bad}")
        return self

    @model_validator(mode="after")
    def _inputs(self) -> PipelineConfig:
        if self.questions is None and self.retrieval_file is None:
            raise ValueError("give `questions` (or a `retrieval_file` to take them from)")
        if self.eval_retrieval_file is not None and self.retrieval_file is None:
            raise ValueError("`eval_retrieval_file` needs `retrieval_file` (the training questions' retrieval)")
        needs_index = self.retrieval_file is None or any(m for m in self.compare_retrievers)
        if needs_index and not self.corpus:
            raise ValueError("give `corpus` (needed to build the index" + (
                " of the compared retrievers)" if self.retrieval_file is not None else ")"))
        return self

    def promote_policy(self, component: Literal["reader", "reranker"]) -> str:
        """The promotion policy of ``component`` (``auto``, ``always`` or ``never``)."""
        return self.promote if isinstance(self.promote, str) else self.promote.get(component, "auto")

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.sections.get(name) or {})

    @field_serializer("reader", "rewriter", "aligned_reader")
    def _only_set(self, opts: GeneratorOptions | dict[str, Any] | None) -> dict[str, Any] | None:
        """A saved ``pipeline.yaml`` keeps only what each generator section set, so loading it back gives the same
        stage configs (the stages' own defaults, e.g. augment's temperature, stay in force)."""
        if opts is None or isinstance(opts, dict):
            return opts
        return opts.model_dump(mode="json", exclude_unset=True)

    def generator(self, which: Literal["reader", "rewriter", "aligned_reader"]) -> dict[str, Any] | None:
        """The options a generator section sets (unset fields stay the stage's defaults); ``None`` if not given."""
        opts = getattr(self, which)
        if isinstance(opts, dict):  # set by model_copy(update=...), which does not validate
            opts = GeneratorOptions.model_validate(opts)
        return None if opts is None else opts.model_dump(mode="json", exclude_unset=True)
