"""``dpa-rag train-llm``: the reader's self-alignment (pre-aligned stage, then SFT) on TRL's ``SFTTrainer``.

Data become conversational prompt-completion rows, so the loss covers the answer tokens only
(``completion_only_loss=True``; the prompt is rendered with the model's chat template and the generation prompt).
LoRA by default, QLoRA where bitsandbytes and CUDA are usable, full fine-tuning on request. The SFT stage starts
from the pre-aligned run: ``--init-adapter <prealign>/adapter`` keeps training the same adapter,
``--init-model <prealign>/merged`` (or ``model/``) starts from full weights.

Outputs in ``out_dir``: ``adapter/`` or ``model/``, ``merged/`` (``--merge``), ``train_log.json``, ``loss.png``,
``data_report.json``, ``train_info.json``, ``config.yaml``, ``manifest.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from dpa_rag.checkpoints import CheckpointCallback, checkpoint_state, finished_checkpoints, resolve_resume
from dpa_rag.io import write_json
from dpa_rag.jobs import preempt_requested
from dpa_rag.llm.config import TrainLLMConfig
from dpa_rag.llm.data import DataReport, LengthBuckets, LLMExample, check_lengths, find_data_file, load_examples
from dpa_rag.llm.merge import TRAIN_INFO, merge_adapter
from dpa_rag.llm.plot import plot_loss
from dpa_rag.llm.recipes import deepspeed_config_path
from dpa_rag.llm.templates import apply_chat_template_option
from dpa_rag.llm.validation import (
    CLOSED,
    METRICS,
    VALIDATION,
    VALIDATION_FILES,
    ValidationResult,
    Validator,
    compare_to_base,
    select_step,
    write_model_card_section,
    write_validation,
)
from dpa_rag.models import attn_kwargs, pick_device, pick_dtype, resolve_llm
from dpa_rag.stage import StageOutputs, stage_recorder

__all__ = [
    "ADAPTER_DIR", "DATA_REPORT", "MERGED_DIR", "MODEL_DIR", "TRAIN_LOG", "Config", "Outputs", "TrainLLMOutputs",
    "build_model", "build_trainer", "data_files", "load_tokenizer", "run",
]

logger = logging.getLogger(__name__)

TRAIN_LOG = "train_log.json"
DATA_REPORT = "data_report.json"
MODEL_DIR = "model"  # full fine-tuning: the trained model
ADAPTER_DIR = "adapter"  # LoRA/QLoRA: the adapter
MERGED_DIR = "merged"  # LoRA/QLoRA with merge: the base model with the adapter merged in
VALIDATION_STATE = "dpa_rag_validation.pt"  # in each checkpoint: the validation so far, for a resumed run
CHECKPOINTS_DIR = "checkpoints"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class TrainLLMOutputs(StageOutputs):
    """What ``train-llm`` writes: the weights (``model/`` after full fine-tuning, ``adapter/`` for LoRA/QLoRA, plus
    ``merged/`` when merged), the training log, the data report and ``train_info.json``."""

    FILES: ClassVar[dict[str, str]] = {
        "info": TRAIN_INFO, "train_log": TRAIN_LOG, "data_report": DATA_REPORT, "model": MODEL_DIR,
        "adapter": ADAPTER_DIR, "merged": MERGED_DIR, "validation": VALIDATION,
    }
    info: Path
    train_log: Path
    data_report: Path
    model: Path
    adapter: Path
    merged: Path
    validation: Path

    @classmethod
    def written(cls, cfg: Any) -> set[str] | None:
        """The files plus only the weights folders ``cfg``'s method writes (``run --check`` catches a reader of
        ``merged/`` after full fine-tuning)."""
        weights = {MODEL_DIR} if cfg.method == "full" else {ADAPTER_DIR, MERGED_DIR} if cfg.merge else {ADAPTER_DIR}
        validation = set(VALIDATION_FILES) if cfg.valid else set()
        return {TRAIN_INFO, TRAIN_LOG, DATA_REPORT, "loss.png", "checkpoints", *weights, *validation}

    def weights(self, method: str, merged: bool) -> Path:
        """The loadable model of a run with ``method``: ``model/`` (full), else ``merged/`` or ``adapter/``."""
        if method == "full":
            return self.model
        return self.merged if merged else self.adapter


Config = TrainLLMConfig
Outputs = TrainLLMOutputs


def data_files(cfg: TrainLLMConfig) -> list[Path]:
    """The data files of a run: ``--data`` then ``--data-extra``; a ``build-llm-data`` folder gives ``<stage>.jsonl``.

    For ``--stage mixed``, a lone folder gives both ``prealign.jsonl`` and ``sft.jsonl``; with two sources, a folder
    in the first place gives ``prealign.jsonl`` and in a later place ``sft.jsonl``.
    """
    sources = [*cfg.data, *([cfg.data_extra] if cfg.data_extra is not None else [])]
    if cfg.stage == "mixed" and len(sources) == 1:
        return [find_data_file(sources[0], "prealign"), find_data_file(sources[0], "sft")]
    files = []
    for i, p in enumerate(sources):
        name = cfg.stage if cfg.stage != "mixed" else ("prealign" if i == 0 else "sft")
        files.append(find_data_file(p, name))
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: no such data file")
    return files


def _base_name(cfg: TrainLLMConfig) -> str:
    return resolve_llm(cfg.init_model) if cfg.init_model else resolve_llm(cfg.model)


def load_tokenizer(cfg: TrainLLMConfig):
    """The tokenizer (from the init adapter if it carries one, else the model) with the chat template set."""
    from transformers import AutoTokenizer

    src = _base_name(cfg)
    if cfg.init_adapter is not None and (Path(cfg.init_adapter) / "tokenizer_config.json").exists():
        src = str(cfg.init_adapter)
    tokenizer = AutoTokenizer.from_pretrained(src)
    apply_chat_template_option(tokenizer, cfg.chat_template, src)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_dtype(cfg: TrainLLMConfig, device: str):
    import torch

    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    if cfg.method == "qlora":
        return torch.bfloat16
    if cfg.method == "full" or device == "cpu":
        return torch.float32  # master weights in fp32; bf16 compute comes from mixed precision
    return pick_dtype("auto", device)


def _check_qlora(device: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("--method qlora needs bitsandbytes (pip install bitsandbytes) and a CUDA GPU; use lora")
    if not device.startswith("cuda"):
        raise ValueError(f"--method qlora needs a CUDA GPU (device here: {device}); use --method lora")


def build_model(cfg: TrainLLMConfig, device: str | None = None) -> tuple[Any, Any]:
    """Load the model to train: ``(model, peft_config)``; ``peft_config`` is ``None`` when the model is ready.

    With ``--init-adapter`` the adapter is loaded trainable (LoRA/QLoRA) or merged first (full).
    """
    import torch
    from transformers import AutoModelForCausalLM

    device = device or pick_device(cfg.device)
    base = _base_name(cfg)
    kwargs: dict[str, Any] = {"dtype": _load_dtype(cfg, device), **attn_kwargs(cfg.attn_implementation)}
    if cfg.method == "qlora":
        _check_qlora(device)
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)

    if cfg.init_adapter is not None:
        from peft import PeftModel

        from dpa_rag.llm.merge import _adapter_base

        adapter = Path(cfg.init_adapter)
        adapter_base = _adapter_base(adapter)
        both_local = Path(adapter_base).exists() and Path(base).exists()
        if both_local and Path(adapter_base).resolve() != Path(base).resolve():
            logger.warning("adapter %s was trained on %s, but the base model here is %s", adapter, adapter_base, base)
        if cfg.method == "full":
            logger.info("merging %s into the base model, then full fine-tuning", adapter)
            return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload(), None
        logger.info("continuing to train the adapter %s", adapter)
        config = _continued_adapter_config(adapter, cfg)
        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True, config=config), None
    if cfg.method == "full":
        return model, None
    from peft import LoraConfig

    targets: list[str] | str = "all-linear" if cfg.lora_target_modules == ["all-linear"] else cfg.lora_target_modules
    layers = _top_layers(model, cfg.lora_top_layers)
    if layers is not None and targets == "all-linear":  # PEFT takes a layer list only with named modules
        targets = _linear_module_names(model)
    peft_config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
        target_modules=targets, layers_to_transform=layers,
    )
    return model, peft_config


def _continued_adapter_config(adapter: Path, cfg: TrainLLMConfig) -> Any:
    """The saved adapter's config with this run's dropout, for ``PeftModel.from_pretrained(config=...)``.

    PEFT would restore the adapter with the dropout it was trained with; dropout is a training setting, not part of
    the adapter, so ``--lora-dropout`` wins (and is what the adapter saved by this run records). Rank and alpha are
    the adapter's shape: they stay, with a warning when the run asked for others.
    """
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter))
    if hasattr(config, "lora_dropout"):
        config.lora_dropout = cfg.lora_dropout
    kept = [f"{field}={getattr(config, attr)} (asked {getattr(cfg, field)})"
            for field, attr in (("lora_r", "r"), ("lora_alpha", "lora_alpha"))
            if field in cfg.model_fields_set and getattr(config, attr, getattr(cfg, field)) != getattr(cfg, field)]
    if kept:
        logger.warning("--init-adapter keeps the adapter's own %s", ", ".join(kept))
    return config


def _top_layers(model, top: int | None) -> list[int] | None:
    """The indices of the top ``top`` decoder layers (None: all of them)."""
    if top is None:
        return None
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if n is None:
        raise ValueError("--lora-top-layers needs a model config with num_hidden_layers")
    return None if top >= n else list(range(n - top, n))


def _linear_module_names(model) -> list[str]:
    """The names of the linear layers PEFT's "all-linear" would adapt (every linear layer but the output head)."""
    import torch

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def _load_data(cfg: TrainLLMConfig, tokenizer) -> tuple[list[LLMExample], DataReport]:
    examples, report = load_examples(data_files(cfg))
    examples = check_lengths(examples, tokenizer, cfg.max_length, cfg.on_overlength, report)
    if len(cfg.data) + (cfg.data_extra is not None) > 1 or cfg.stage == "mixed":
        random.Random(cfg.seed).shuffle(examples)
    return examples, report


def _sft_args(cfg: TrainLLMConfig, device: str, out_dir: Path):
    import torch
    from trl import SFTConfig

    bf16 = cfg.bf16
    if bf16 is None:
        bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
    deepspeed = None
    if cfg.deepspeed:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            logger.info("DeepSpeed is configured by `accelerate launch`; ignoring --deepspeed %s", cfg.deepspeed)
        elif importlib.util.find_spec("deepspeed") is None:
            raise ValueError("--deepspeed needs the deepspeed package and CUDA GPUs (pip install deepspeed)")
        else:
            deepspeed = str(deepspeed_config_path(cfg.deepspeed))
    # transformers 5 renamed gradient_checkpointing (a deprecated alias now); TRL defaults it to True
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    ckpt_key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return SFTConfig(
        output_dir=str(out_dir / CHECKPOINTS_DIR),
        **{ckpt_key: cfg.gradient_checkpointing},
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        lr_scheduler_type=cfg.lr_scheduler_type,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        bf16=bf16,
        fp16=False,
        use_cpu=device == "cpu",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if cfg.save_steps else "no",  # by time and on SIGTERM: CheckpointCallback
        save_steps=cfg.save_steps or 500,
        save_total_limit=cfg.save_total_limit,
        report_to=cfg.report_to,
        deepspeed=deepspeed,
        max_length=cfg.max_length,
        completion_only_loss=True,
        truncation_mode="keep_start",
    )


def _require_train_deps() -> None:
    missing = [m for m in ("trl", "peft", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"train-llm needs {', '.join(missing)}: pip install 'dpa-rag[train]'")


def build_trainer(cfg: TrainLLMConfig) -> tuple[Any, DataReport]:
    """Tokenizer, validated data, model and ``SFTTrainer``, ready to ``train()``; also the data report."""
    _require_train_deps()
    from datasets import Dataset
    from trl import SFTTrainer

    device = pick_device(cfg.device)
    out_dir = cfg.resolved_out_dir()
    tokenizer = load_tokenizer(cfg)
    examples, report = _load_data(cfg, tokenizer)
    args = _sft_args(cfg, device, out_dir)
    model, peft_config = build_model(cfg, device)
    dataset = Dataset.from_list([ex.to_row() for ex in examples])
    if device == "cpu":
        score_labelled_positions_only()
    trainer = (_bucketed_trainer() if cfg.group_by_length else SFTTrainer)(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    if cfg.valid is not None:
        trainer.add_callback(ValidationCallback(cfg, _validator(cfg, tokenizer)).hooks)
    # last: it marks a checkpoint complete after the validation state is saved into it
    checkpoints = CheckpointCallback(checkpoint_state(cfg, _inputs(cfg)), cfg.save_minutes)
    checkpoints.hooks.owner = checkpoints
    trainer.add_callback(checkpoints.hooks)
    return trainer, report


@functools.cache
def score_labelled_positions_only() -> bool:
    """Make TRL's fused LM head score only the positions that have a label on CPU too; True if it now does.

    TRL (1.16) runs the 49k-token LM head, log-softmax, entropy and top-1 check over the labelled positions only on
    devices with Triton kernels, and over *every* position elsewhere (fixed tile shapes for graph compilers such as
    Neuron's). On CPU, with the loss on the answer only, that is the whole prompt scored for an answer of a few tokens:
    about a third of each step on the demo's data (docs/llm.md). The loss and gradients are the same either way (the
    unlabelled positions are masked out of both); CPU has no compiler to keep shapes for. TRL reads the switch
    ``trl.trainer.utils._use_triton`` at call time; a TRL without it keeps its own behaviour (False here).
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        return False

    def compact_on_cpu(device) -> bool:
        return device.type == "cpu" or original(device)

    trl_utils._use_triton = compact_on_cpu
    return True


@functools.cache
def _bucketed_trainer() -> type:
    """``SFTTrainer`` whose training batches group examples of similar length (:class:`LengthBuckets`); made on
    first use, so importing this module does not import TRL. Not transformers' ``group_by_length`` sampler: it sorts
    each megabatch (up to 50 batches; a quarter of a small data set) longest first, so training sweeps from long to
    short examples a few times per epoch instead of meeting them in random order."""
    from trl import SFTTrainer

    class BucketedSFTTrainer(SFTTrainer):
        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            lengths = [len(ids) for ids in dataset["input_ids"]]
            return LengthBuckets(lengths, self.args.per_device_train_batch_size, self.args.seed)

    return BucketedSFTTrainer


def _inputs(cfg: TrainLLMConfig) -> list[Path | str]:
    """The files a run depends on: the data, and the adapter or model it starts from."""
    inputs: list[Path | str] = [*data_files(cfg)]
    return inputs + [p for p in (cfg.init_adapter, cfg.init_model) if p is not None and Path(p).exists()]


def _owner(trainer, kind: type[T]) -> T | None:
    """The callback object of type ``kind`` behind one of the trainer's hooks."""
    return next((c.owner for c in trainer.callback_handler.callbacks if isinstance(getattr(c, "owner", None), kind)),
                None)


def _validator(cfg: TrainLLMConfig, tokenizer) -> Validator:
    from dpa_rag.data.loaders import load_retrieval

    records = load_retrieval(cfg.valid, limit=cfg.valid_limit)
    return Validator(
        records, tokenizer, top_k=cfg.valid_top_k, template=cfg.valid_template, chat=cfg.valid_chat,
        max_new_tokens=cfg.valid_max_new_tokens, batch_size=cfg.valid_batch_size, closed_book=cfg.valid_closed_book,
    )


class ValidationCallback:
    """Validates the reader at step 0, every ``eval_steps`` and at the end (:mod:`dpa_rag.llm.validation`), keeps
    an in-memory copy of the weights the selection rule prefers so far, and evaluates the base reader once.

    Every process validates (ZeRO-3 generation needs all ranks); only rank 0 writes the files. ``hooks`` is the
    ``TrainerCallback`` to give the trainer (made here, so importing this module does not import transformers).
    """

    def __init__(self, cfg: TrainLLMConfig, validator: Validator) -> None:
        from transformers import TrainerCallback

        # a TrainerCallback subclass made here keeps transformers out of this module's import
        class _Hooks(TrainerCallback):
            def on_train_begin(hooks, args, state, control, model=None, **kw):  # noqa: N805
                self._merge = self.cfg.method == "lora" and _can_merge(args)  # QLoRA: no merge into 4-bit weights
                self._begin(state, model)

            def on_step_end(hooks, args, state, control, model=None, **kw):  # noqa: N805
                if state.global_step % self.every == 0:
                    self._validate(state.global_step, model)

            def on_train_end(hooks, args, state, control, model=None, **kw):  # noqa: N805
                if preempt_requested() is not None:  # stopped early: the resumed run validates at its end
                    return
                if not self.result.steps or self.result.steps[-1]["step"] != state.global_step:
                    self._validate(state.global_step, model)

            def on_save(hooks, args, state, control, **kw):  # noqa: N805
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if state.is_world_process_zero and ckpt.is_dir():
                    self.save_state(ckpt)

        self.hooks = _Hooks()
        self.hooks.owner = self
        self.cfg = cfg
        self.validator = validator
        self.every = cfg.eval_steps or 1
        self.result = ValidationResult(
            rule=cfg.select, hit_tolerance=cfg.hit_tolerance, n_questions=len(validator.records),
            top_k=validator.top_k,
        )
        self.base_predictions: dict[str, list[dict[str, Any]]] = {}
        self.kept_predictions: dict[str, list[dict[str, Any]]] = {}
        self.snapshot: dict[str, Any] | None = None
        self.snapshot_step: int | None = None
        self.restored = False
        self._merge = False

    def save_state(self, folder: Path) -> None:
        """Write what the validation knows so far (rows, predictions, the kept weights) into a checkpoint."""
        import torch

        state = {"steps": self.result.steps, "base": self.result.base, "base_predictions": self.base_predictions,
                 "kept_predictions": self.kept_predictions, "snapshot": self.snapshot,
                 "snapshot_step": self.snapshot_step, "every": self.every}
        torch.save(state, folder / VALIDATION_STATE)

    def restore(self, folder: str | Path) -> None:
        """Continue from the state :meth:`save_state` wrote into the checkpoint ``folder`` (a resumed run)."""
        import torch

        path = Path(folder) / VALIDATION_STATE
        if not path.exists():
            logger.warning("%s has no validation state; validating from the resumed step on", folder)
            return
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.result.steps, self.result.base = state["steps"], state["base"]
        self.base_predictions, self.kept_predictions = state["base_predictions"], state["kept_predictions"]
        self.snapshot = state["snapshot"]
        self.snapshot_step, self.every = state["snapshot_step"], state["every"]
        self.restored = True
        logger.info("validation: resumed with %d validation(s) done, keeping step %s so far", len(self.result.steps),
                    self.snapshot_step)

    def _begin(self, state, model) -> None:
        if self.restored:
            return
        if not self.cfg.eval_steps:
            self.every = max(1, -(-state.max_steps // 4))
        self.result.base, self.base_predictions = self._base_evaluation(model)
        logger.info("validation: base reader %s", _fmt(self.result.base))
        # from the base model (a fresh LoRA adapter starts with B = 0) step 0 is the base reader, already answered
        from_base = self.cfg.init_adapter is None and self.cfg.init_model is None and state.global_step == 0
        self._validate(state.global_step, model, (self.result.base, self.base_predictions) if from_base else None)

    def _base_evaluation(self, model) -> tuple[dict[str, float], dict[str, list[dict[str, Any]]]]:
        if hasattr(model, "disable_adapter"):  # LoRA: the base model is the same model with the adapter off
            with model.disable_adapter():
                return self.validator.evaluate(model)
        if self.cfg.init_model is None and self.cfg.init_adapter is None:  # full fine-tuning from the base
            return self.validator.evaluate(model)
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(resolve_llm(self.cfg.model), dtype=next(model.parameters()).dtype)
        base.to(next(model.parameters()).device)
        try:
            return self.validator.evaluate(base)
        finally:
            del base

    def _validate(self, step: int, model, done: tuple[dict[str, float], dict[str, Any]] | None = None) -> None:
        if done is None:  # a LoRA reader answers through its merged weights where they can be merged in place
            with merged_lora(model) if self._merge else contextlib.nullcontext():
                done = self.validator.evaluate(model)
        metrics, preds = done
        row = {"step": step, **metrics}
        self.result.steps.append(row)
        logger.info("validation at step %d: %s", step, _fmt(row))
        chosen = select_step(self.result.steps, self.result.base, self.cfg.select, self.cfg.hit_tolerance,
                             self.cfg.select_no_forgetting)
        if chosen == step:
            self.kept_predictions = preds
            self.snapshot_step = step
            if self.cfg.select != "final":
                self.snapshot = _weights_snapshot(model)

    @property
    def predictions(self) -> dict[str, list[dict[str, Any]]]:
        """The base reader's and the kept weights' validation answers (closed-book ones too when measured)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for name, preds in (("base", self.base_predictions), ("kept", self.kept_predictions)):
            for kind, rows in preds.items():
                out[name if kind == "open_book" else f"{name} closed-book"] = rows
        return out

    def finish(self, model, deepspeed: bool) -> bool:
        """Put the chosen weights back into ``model`` (unless they are the last ones) and fill in the comparison
        with the base reader; returns whether the model's weights were replaced."""
        chosen = select_step(self.result.steps, self.result.base, self.cfg.select, self.cfg.hit_tolerance,
                             self.cfg.select_no_forgetting)
        self.result.selected_step = chosen
        self.result.selected = next(r for r in self.result.steps if r["step"] == chosen)
        self.result.selected = {k: v for k, v in self.result.selected.items() if k != "step"}
        self.result.versus_base = compare_to_base(self.base_predictions["open_book"],
                                                  self.kept_predictions["open_book"])
        if "closed_book" in self.kept_predictions:
            closed = compare_to_base(self.base_predictions["closed_book"], self.kept_predictions["closed_book"])
            self.result.versus_base.update({f"{CLOSED}{k}": v for k, v in closed.items()})
        last = self.result.steps[-1]["step"]
        if chosen == last:
            return False
        if deepspeed or self.snapshot is None:
            logger.warning("validation prefers step %d, but the weights of step %d are kept (no in-memory copy under "
                           "DeepSpeed)", chosen, last)
            self.result.selected_step = last
            return False
        logger.info("validation: keeping the weights of step %d (rule %s), not those of step %d", chosen,
                    self.cfg.select, last)
        params = dict(model.named_parameters())
        for name, value in self.snapshot.items():
            params[name].data.copy_(value)
        return True


def _can_merge(args) -> bool:
    """Whether validation may merge a LoRA adapter in place: not under DeepSpeed or FSDP (sharded weights)."""
    return not getattr(args, "deepspeed", None) and not getattr(args, "fsdp", None)


@contextlib.contextmanager
def merged_lora(model):
    """Generate through a LoRA model's merged weights (what ``merged/`` and the answer step use): on the demo's
    reader a validation pass took 11-29% less time than through the unmerged adapter's extra matmuls, with the same
    answers. The adapted layers' base weights are restored bit for bit afterwards (a plain unmerge subtracts the
    delta again and leaves float rounding in the weights still being trained). Anything but a PEFT model with an
    active, unmerged adapter is used as it is."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not hasattr(model, "merge_adapter") or not layers or any(m.merged or m.disable_adapters for m in layers):
        yield model
        return
    with torch.no_grad():
        saved = [(p, p.detach().clone()) for m in layers for p in m.get_base_layer().parameters(recurse=False)]
        model.merge_adapter()
    try:
        yield model
    finally:
        with torch.no_grad():
            model.unmerge_adapter()
            for p, copy in saved:
                p.copy_(copy)


def _weights_snapshot(model) -> dict[str, Any]:
    """A CPU copy of the trainable weights (LoRA: the adapter's; full fine-tuning: all)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _fmt(m: dict[str, Any]) -> str:
    keys = [*METRICS, *(CLOSED + x for x in METRICS)]
    return ", ".join(f"{k.replace(CLOSED, 'closed-book ')} {m[k]:.1f}" for k in keys if k in m)


def run(cfg: TrainLLMConfig) -> TrainLLMOutputs:
    """Train one stage and write its artefacts; a re-run after a kill resumes from the newest complete checkpoint
    of the same config and inputs (:mod:`dpa_rag.checkpoints`)."""
    out_dir = cfg.resolved_out_dir()
    out = TrainLLMOutputs.at(out_dir)
    trainer, report = build_trainer(cfg)
    main = trainer.is_world_process_zero()
    rec = stage_recorder("train-llm", cfg, out_dir, _inputs(cfg)) if main else None
    if main:
        write_json(out.data_report, report.to_dict())
    checkpoints = _owner(trainer, CheckpointCallback)
    validation = _owner(trainer, ValidationCallback)
    if checkpoints is None:  # build_trainer always adds it; a trainer built another way cannot resume
        raise RuntimeError("train-llm: the trainer has no checkpoint callback (make it with build_trainer)")
    resume = resolve_resume(cfg.resume_from_checkpoint, out_dir / CHECKPOINTS_DIR, checkpoints.state, "train-llm")
    if resume is not None and validation is not None:
        validation.restore(resume)
    logger.info("training %s (%s) on %d examples", cfg.stage, cfg.method, report.kept)
    result = trainer.train(resume_from_checkpoint=resume)
    checkpoints.raise_if_preempted()
    if validation is not None:
        validation.finish(trainer.model, deepspeed=trainer.is_deepspeed_enabled)
    peft = hasattr(trainer.model, "peft_config")
    weights_dir = out.adapter if peft else out.model
    if main:  # outputs of an earlier run in this folder would be stale now (load_for_inference prefers merged/)
        for stale in (out.merged, out.model if peft else out.adapter):
            if stale.is_dir():
                logger.info("removing %s from an earlier run", stale)
                shutil.rmtree(stale)
    trainer.save_model(str(weights_dir))  # every process: DeepSpeed gathers the shards here
    if not main:
        return out
    ckpt_dir = out_dir / CHECKPOINTS_DIR
    if ckpt_dir.is_dir() and (not cfg.keep_checkpoints or not any(ckpt_dir.iterdir())):
        shutil.rmtree(ckpt_dir)  # the weights are saved; checkpoints of a 7B reader take a lot of disk
    finished_checkpoints(ckpt_dir)  # kept ones (--keep-checkpoints) are not resumed from by a forced re-run
    history = trainer.state.log_history
    write_json(out.train_log, history)
    outputs = [weights_dir.name, TRAIN_LOG, DATA_REPORT, TRAIN_INFO]
    if validation is not None:
        outputs += write_validation(out_dir, validation.result, validation.predictions)
        write_model_card_section(weights_dir, validation.result.to_dict())
    if plot_loss(history, out_dir / "loss.png", title=f"train-llm {cfg.stage} ({cfg.method})"):
        outputs.append("loss.png")
    base = _base_name(cfg)
    info = {
        "stage": cfg.stage, "method": cfg.method, "base_model": base, "weights": weights_dir.name,
        "init_adapter": str(cfg.init_adapter) if cfg.init_adapter else None, "init_model": cfg.init_model,
    }
    if validation is not None:
        v = validation.result
        info["validation"] = {"selected_step": v.selected_step, "final_step": trainer.state.global_step,
                              "base": v.base, "selected": v.selected, "versus_base": v.versus_base, "rule": v.rule}
    write_json(out.info, info)
    if cfg.merge:
        if peft:
            with rec.timer("merge"):
                merge_adapter(weights_dir, out.merged, base_model=base)
            if validation is not None:
                write_model_card_section(out.merged, validation.result.to_dict())
            outputs.append(MERGED_DIR)
        else:
            logger.info("full fine-tuning: %s is already a plain model; --merge has nothing to do", weights_dir)
    losses = [e["loss"] for e in history if "loss" in e]
    rec.finish(
        outputs=outputs, records=report.records, kept=report.kept, empty_answers=report.empty_answers,
        overlength=report.overlength, steps=trainer.state.global_step,
        first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None,
        train_runtime_s=round(result.metrics.get("train_runtime", 0.0), 3),
    )
    return out
