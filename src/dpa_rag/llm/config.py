"""``TrainLLMConfig``: every option of ``dpa-rag train-llm`` (also the keys of a ``configs/llm/*.yaml`` recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from dpa_rag.config import ATTN_HELP, AttnImplementation, DeviceOption, Dtype, StageConfig
from dpa_rag.models import DEFAULT_READER

__all__ = ["TrainLLMConfig"]


class TrainLLMConfig(DeviceOption, StageConfig):
    """LLM self-alignment: the pre-aligned stage, then SFT, with TRL's ``SFTTrainer`` (LoRA, QLoRA or full)."""

    # options that change how fast validation runs, not what it finds, and when/where checkpoints are written (left
    # out of the manifest hash)
    result_neutral: ClassVar[frozenset[str]] = frozenset({
        "valid_batch_size", "save_steps", "save_minutes", "save_total_limit", "resume_from_checkpoint",
        "keep_checkpoints",
    })

    # What to train, on what
    stage: Literal["prealign", "sft", "mixed"] = Field(
        "sft",
        description="prealign (stage 1), sft (stage 2, start it from stage 1 with --init-adapter/--init-model), or "
        "mixed (both data sets concatenated and shuffled in one run; the paper reports it is worse).",
    )
    data: list[Path] = Field(
        description="Training data: a .jsonl/.json file (chat messages or alpaca) or a build-llm-data folder "
        "(<stage>.jsonl is taken). Repeat to concatenate several files.",
    )
    data_extra: Path | None = Field(None, description="A second data set, concatenated and shuffled in (mixed stage).")
    model: str = Field(DEFAULT_READER, description="Base model: bundled alias, hub id or local folder.")
    init_adapter: Path | None = Field(
        None, description="Continue training this LoRA adapter (e.g. the prealign run's out_dir/adapter)."
    )
    init_model: str | None = Field(
        None, description="Start from this full model instead of --model (e.g. the prealign run's out_dir/merged)."
    )
    chat_template: str | None = Field(
        None, description="Chat template for models without one: chatml, llama2, llama3, mistral, alpaca or a file."
    )
    out_dir: Path | None = Field(None, description="Output folder. [default: runs/llm-<stage>]")

    # Method
    method: Literal["lora", "qlora", "full"] = Field("lora", description="LoRA, QLoRA (bitsandbytes, CUDA) or full.")
    lora_r: int = Field(16, ge=1, description="LoRA rank (a continued --init-adapter keeps its own).")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (a continued --init-adapter keeps its own).")
    lora_dropout: float = Field(
        0.05, ge=0.0, lt=1.0, description="LoRA dropout (also applied to a continued --init-adapter)."
    )
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="Modules to adapt ('all-linear' or names like q_proj; a continued --init-adapter keeps its own).",
    )
    lora_top_layers: int | None = Field(
        None, ge=1, description="LoRA on the top N decoder layers only: the backward pass stops below them (faster "
        "steps; on the demo the reader learnt more slowly, docs/llm.md). A continued adapter keeps its own layers. "
        "[default: every layer]",
    )

    # Optimisation
    num_train_epochs: float = Field(3.0, gt=0, description="Epochs.", json_schema_extra={"cli": ["--epochs"]})
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.", json_schema_extra={"cli": ["--lr"]})
    per_device_train_batch_size: int = Field(
        4, ge=1, description="Batch size per device.", json_schema_extra={"cli": ["--batch-size"]}
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Gradient accumulation steps.")
    group_by_length: bool = Field(
        False, description="Batch examples of similar length together, batches in random order: every example is "
        "still seen once an epoch, with far less padding (27% -> 2% of the demo's SFT tokens).",
    )
    max_length: int = Field(
        1024, ge=8, description="Cutoff in tokens (prompt + answer).", json_schema_extra={"cli": ["--cutoff"]}
    )
    on_overlength: Literal["drop", "truncate", "error"] = Field(
        "drop", description="Examples longer than the cutoff: drop, truncate (the answer's tail) or error."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, description="AdamW beta2.")
    lr_scheduler_type: str = Field("linear", description="Scheduler: linear, cosine, constant, …")
    max_grad_norm: float = Field(1.0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    seed: int = Field(42, description="Random seed (adapter init, shuffling, data order).")

    # Precision, devices, distribution
    bf16: bool | None = Field(None, description="bf16 mixed precision. [default: on for CUDA with bf16, else off]")
    dtype: Dtype = Field(
        "auto", description="Dtype the base weights load in (auto: fp32 on CPU and for full; bf16 on CUDA for LoRA)."
    )
    attn_implementation: AttnImplementation = Field(
        "auto", description=ATTN_HELP, json_schema_extra={"cli": ["--flash_attn"], "flag_value": "fa2"})
    deepspeed: str | None = Field(
        None, description="DeepSpeed JSON file or shipped name (zero3); not needed under an accelerate DS config."
    )

    # Held-out validation and the checkpoint kept (dpa_rag.llm.validation)
    valid: Path | None = Field(
        None,
        description="Held-out training-split questions with passages (a retrieval file; build-llm-data's valid.jsonl) "
        "answered with the reader being trained and the base reader, the answer step's way; the kept weights are "
        "chosen by --select.",
    )
    eval_steps: int = Field(
        0, ge=0, description="Validate every N optimizer steps (also at step 0 and at the end). [default: 0 = about "
        "four times per run]"
    )
    select: Literal["f1-no-hit-loss", "hits", "final"] = Field(
        "f1-no-hit-loss",
        description="Which validated weights to keep: f1-no-hit-loss (highest F1 among steps whose Hits@1 is not "
        "below the base reader's minus --hit-tolerance; none: the starting weights), hits, or final.",
    )
    hit_tolerance: float = Field(
        0.0, ge=0.0, description="Hits@1 points a kept step may lose against the base reader (f1-no-hit-loss)."
    )
    valid_top_k: int = Field(3, ge=0, description="Passages per validation prompt (the answer step's top_k).")
    valid_template: str = Field("qa", description="Validation prompt template (the answer step's).")
    valid_chat: bool = Field(True, description="Validation prompts as chat messages (the answer step's --chat).")
    valid_max_new_tokens: int = Field(32, ge=1, description="Validation decoding budget (greedy; the answer step's).")
    valid_closed_book: bool = Field(
        True, description="Also validate closed-book (reports forgetting: the answers the base reader had without "
        "passages)."
    )
    select_no_forgetting: bool = Field(
        False, description="f1-no-hit-loss: a kept step must not lose closed-book Hits@1 either (needs "
        "--valid-closed-book)."
    )
    valid_limit: int | None = Field(None, ge=1, description="Validate on the first N questions only.")
    valid_batch_size: int = Field(16, ge=1, description="Validation prompts per generation batch.")

    # Logging and saving
    logging_steps: int = Field(10, ge=1, description="Log the loss every N steps.")
    save_steps: int = Field(
        0, ge=0, description="Also checkpoint every N steps under out_dir/checkpoints (0: by time only)."
    )
    save_minutes: float = Field(
        30.0, ge=0, description="Checkpoint every N minutes of training under out_dir/checkpoints (0: by steps only; "
        "a SIGTERM/SIGINT always saves one)."
    )
    save_total_limit: int | None = Field(2, ge=1, description="Checkpoints to keep (older ones are deleted).")
    resume_from_checkpoint: str | None = Field(
        "auto", description="auto: resume from the newest complete checkpoint of the same config and inputs; "
        "never: start over; last: the newest checkpoint whatever wrote it; or a checkpoint folder."
    )
    keep_checkpoints: bool = Field(
        False, description="Keep out_dir/checkpoints after a finished run (default: deleted; the weights are saved)."
    )
    report_to: str = Field("none", description="none, tensorboard, wandb, …")
    merge: bool = Field(False, description="Also write a merged full model to out_dir/merged (LoRA/QLoRA).")

    @field_validator("data", "lora_target_modules", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, (str, Path)) else v

    @model_validator(mode="after")
    def _check(self) -> TrainLLMConfig:
        if not self.data:
            raise ValueError("give at least one --data file")
        if self.init_adapter is not None and self.init_model is not None:
            raise ValueError("give --init-adapter or --init-model, not both")
        n_sets = len(self.data) + (self.data_extra is not None)
        if self.stage == "mixed" and n_sets < 2 and not self.data[0].is_dir():
            raise ValueError("--stage mixed needs two data sets: --data twice, --data and --data-extra, "
                "or a build-llm-data folder")
        return self

    def resolved_out_dir(self) -> Path:
        return self.out_dir if self.out_dir is not None else Path("runs") / f"llm-{self.stage}"
