"""``dpa-rag train-reranker`` as a library function: :func:`run` ``(cfg) -> TrainRerankerOutputs``.

Steps: load and check the data → load the backbone with the chosen head → (optional) ranking baseline on
``--eval-retrieval`` → (optional) relevance warm-up → preference alignment with :class:`RerankerTrainer` → valid and
test metrics of the best checkpoint → (optional) retriever-fusion weight chosen on the held-out questions of
``--eval-retrieval`` (:mod:`dpa_rag.reranker.fusion`) → ``model/`` (weights, tokenizer, model card) and the logs.

Outputs in ``out_dir``: ``model/`` (``save_pretrained`` + tokenizer + ``README.md``), ``train_log.json`` (Trainer log
history and per-step losses/weights), ``valid_metrics.json``, ``test_metrics.json``, ``retrieval_metrics.json`` (with
``--eval-retrieval``), ``tensorboard/``, ``checkpoints/``, ``config.yaml`` and ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from dpa_rag.checkpoints import CheckpointCallback, checkpoint_state, finished_checkpoints, resolve_resume
from dpa_rag.data.reranker_records import load_reranker_pairs, load_reranker_train
from dpa_rag.io import write_json, write_text
from dpa_rag.models import pick_device
from dpa_rag.reranker.calibration import calibrate_trained
from dpa_rag.reranker.config import (
    AUTHORS_BACKBONE,
    TrainRerankerConfig,
    apply_authors_backbone,
    apply_gpu_flag,
    parse_loss_weights,
)
from dpa_rag.reranker.data import RerankerTrainDataset, check_train_records
from dpa_rag.reranker.evaluation import PairEvaluator, load_utility_lists
from dpa_rag.reranker.fast_dropout import fast_cpu_dropout
from dpa_rag.reranker.held_out import HeldOut, fusion_weight, held_out_records
from dpa_rag.reranker.kinds import DEFAULT_KIND, get_kind, resolve_kind
from dpa_rag.reranker.kinds.base import RerankerKind
from dpa_rag.reranker.losses.base import LossOptions
from dpa_rag.reranker.losses.registry import get_loss_class, warmup_loss_name
from dpa_rag.reranker.metrics import answer_ranking_metrics, utility_table
from dpa_rag.reranker.model import head_of
from dpa_rag.reranker.model_card import render_model_card
from dpa_rag.reranker.processes import Ranks, single_process_warning
from dpa_rag.reranker.step import build_losses
from dpa_rag.reranker.trainer import RerankerTrainer, check_weighting_supported
from dpa_rag.reranker.training_args import RerankerTrainingArguments
from dpa_rag.reranker.weighting import Weighting, build_weighting
from dpa_rag.stage import StageOutputs, stage_recorder

__all__ = [
    "CHECKPOINTS_DIR", "MODEL_DIR", "RETRIEVAL_METRICS", "TEST_METRICS", "TRAIN_LOG", "UTILITY_METRICS",
    "VALID_METRICS", "Config", "Outputs", "TrainRerankerOutputs", "build_collator", "run",
]

logger = logging.getLogger(__name__)

MODEL_DIR = "model"  # the reranker (HF save_pretrained / SentenceTransformer folder) with its README.md model card
TRAIN_LOG = "train_log.json"
VALID_METRICS = "valid_metrics.json"
TEST_METRICS = "test_metrics.json"
RETRIEVAL_METRICS = "retrieval_metrics.json"  # answer ranking on held-out retrieval lists (with --eval-retrieval)
UTILITY_METRICS = "utility_metrics.json"  # utility ranking on held-out graded lists (with --utility-test)
CHECKPOINTS_DIR = "checkpoints"
MODEL_CARD = "README.md"


@dataclasses.dataclass(frozen=True)
class TrainRerankerOutputs(StageOutputs):
    """What ``train-reranker`` writes: the model, the training log and the held-out metrics (the ranking and utility
    files only with their inputs; also ``tensorboard/``, ``checkpoints/`` and a warm-up folder)."""

    FILES: ClassVar[dict[str, str]] = {
        "model": MODEL_DIR, "train_log": TRAIN_LOG, "valid_metrics": VALID_METRICS, "test_metrics": TEST_METRICS,
        "retrieval_metrics": RETRIEVAL_METRICS, "utility_metrics": UTILITY_METRICS,
    }
    OPEN: ClassVar[bool] = True
    model: Path
    train_log: Path
    valid_metrics: Path
    test_metrics: Path
    retrieval_metrics: Path
    utility_metrics: Path


Config = TrainRerankerConfig
Outputs = TrainRerankerOutputs


def _tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


def _point_tensorboard(trainer: Any, log_dir: str) -> None:
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.logging_dir = log_dir


def _log_to_logging(trainer: Any) -> None:
    from transformers.trainer_callback import PrinterCallback

    from dpa_rag.reranker.trainer import LogCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogCallback())


def _relevance_warmup(cfg: TrainRerankerConfig, model: Any, tokenizer: Any, train: list, out_dir: Path,
                      use_cpu: bool, device: str | None = None) -> dict[str, Any] | None:
    """The relevance warm-up (:mod:`dpa_rag.reranker.warmup`): has-answer listwise CE on the training questions, or
    label-free distillation of a bi-encoder's / BM25's order over every ``--warmup-retrieval`` list (held-out
    ``--eval-retrieval`` questions excluded); the target's registered warm-up loss, trained by
    :class:`RerankerTrainer`. Returns the summary logged in ``train_log.json``."""
    if not cfg.warmup.relevance:
        return None
    if not cfg.warmup.retrieval:
        logger.info("relevance warm-up skipped: no --warmup-retrieval file (retrieval of the training questions)")
        return None
    from dpa_rag.data.loaders import load_retrieval
    from dpa_rag.reranker import warmup as wu

    target = wu.resolve_warmup_target(cfg.warmup.target, cfg.backbone, cfg.warmup.teacher)
    retrieval = load_retrieval(cfg.warmup.retrieval)
    info: dict[str, Any] = {"target": target}
    if target == "has-answer":
        examples: list = wu.build_warmup_examples(train, retrieval, cfg.warmup.negatives)
        if not examples:
            logger.warning("relevance warm-up skipped: no training question has both answer-bearing and other "
                           "passages")
            return {"skipped": "no examples", "target": target}
    else:
        eval_records = load_retrieval(cfg.held_out.eval_retrieval) if cfg.held_out.eval_retrieval else None
        records, counts = wu.select_distill_questions(retrieval, train, eval_records)
        temperature = cfg.warmup.temperature or wu.DEFAULT_TEMPERATURE[target]
        info.update(questions=counts, temperature=temperature, list_size=cfg.warmup.list_size)
        logger.info("distilled warm-up (%s): %d of %d questions of %s (%d reranker training queries; %d held-out "
                    "questions of --eval-retrieval excluded, %d repeated, %d lists under 2 passages)", target,
                    counts["kept"], counts["questions"], cfg.warmup.retrieval, counts["training_queries"],
                    counts["held_out_excluded"], counts["repeated"], counts["short_lists"])
        if not records:
            logger.warning("distilled warm-up skipped: no usable question in %s", cfg.warmup.retrieval)
            return {"skipped": "no examples", **info}
        if target == "bi-encoder":
            teacher = cfg.warmup.teacher or cfg.backbone
            info["teacher"] = teacher
            scores = wu.bi_encoder_teacher_scores(teacher, records, cfg.max_length,
                                                  device=device or str(next(model.parameters()).device))
        else:
            info["teacher"] = "bm25 over the lists' passages"
            scores = wu.bm25_teacher_scores(records)
        examples = wu.build_distill_examples(records, scores, cfg.warmup.list_size, cfg.seed)
    loss_cls = get_loss_class(warmup_loss_name(target))
    loss = loss_cls.from_options(LossOptions(warmup_temperature=info.get("temperature", 1.0)))
    trainer = RerankerTrainer(
        model=model, args=_warmup_args(cfg, out_dir, use_cpu), train_dataset=wu.make_warmup_dataset(examples),
        processing_class=tokenizer, data_collator=loss_cls.collator(tokenizer, cfg.max_length),
        loss_modules={loss.name: loss}, weighting=build_weighting("equal"),
    )
    _log_to_logging(trainer)
    with fast_cpu_dropout(model, enabled=resolve_fast_dropout(cfg.fast_dropout, use_cpu)):
        result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    logger.info("relevance warm-up (%s): %d examples, %d steps, loss %.4f → %.4f", target, len(examples),
                result.global_step, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"))
    return {"examples": len(examples), "steps": result.global_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, **info}


CPU_FORWARD_CHUNK = 4


def resolve_chunk_size(value: int | None, use_cpu: bool) -> int | None:
    """Rows per training forward: ``value`` if set (0 = one forward), else :data:`CPU_FORWARD_CHUNK` on a CPU.

    On a CPU, forwards of a few length-sorted rows keep activations in cache and cut padding; the whole step ran
    about 1.5x faster with chunks of 4 than with one 32-row forward (MiniLM: 8.79 vs 13.13 CPU s/step in
    benchmarks/bench_reranker.py, rows ``ours-mgda-ub`` and ``ours-mgda-ub/1-forward``). On a GPU
    one forward keeps the device busy.
    """
    if value is not None:
        return value or None
    return CPU_FORWARD_CHUNK if use_cpu else None


def resolve_fast_dropout(value: bool | None, use_cpu: bool) -> bool:
    """:func:`~dpa_rag.reranker.fast_dropout.fast_cpu_dropout` on or off: ``value`` if set, else on for a CPU."""
    return use_cpu if value is None else value


def _warmup_args(cfg: TrainRerankerConfig, out_dir: Path, use_cpu: bool) -> RerankerTrainingArguments:
    """The relevance warm-up's ``TrainingArguments`` (:meth:`RerankerTrainingArguments.for_warmup`)."""
    return RerankerTrainingArguments.for_warmup(cfg, str(out_dir / "warmup"), use_cpu=use_cpu)


def build_collator(kind: str, tokenizer: Any, losses: list[str], weighting: Weighting, max_length: int,
                   query_anchor: bool = False) -> Any:
    """The training collator of ``kind``, its grouping chosen by what ``weighting`` needs
    (:attr:`~dpa_rag.reranker.weighting.Weighting.grouped_batches`: per-group passes, so a loss's parameter gradient
    sees only its rows; otherwise one sorted, deduplicated batch)."""
    return get_kind(kind).collator(tokenizer, losses, max_length, query_anchor=query_anchor,
                                   grouped=weighting.grouped_batches)


@dataclass
class _Inputs:
    """The loaded and checked input files."""

    train: list
    valid: list | None
    test: list | None
    utility_valid: list | None
    utility_test: list | None

    @classmethod
    def load(cls, cfg: TrainRerankerConfig, losses: list[str]) -> _Inputs:
        train = check_train_records(load_reranker_train(cfg.train), losses, source=cfg.train)
        valid = load_reranker_pairs(cfg.valid) if cfg.valid else None
        test = load_reranker_pairs(cfg.test) if cfg.test else None
        utility_valid = load_utility_lists(cfg.held_out.utility_valid) if cfg.held_out.utility_valid else None
        utility_test = load_utility_lists(cfg.held_out.utility_test) if cfg.held_out.utility_test else utility_valid
        if utility_test is not None and not cfg.held_out.utility_test:
            logger.warning("utility report on --utility-valid, the lists that also pick the best checkpoint: the "
                           "aligned reranker's row is optimistic (pass --utility-test for an unbiased one)")
        return cls(train, valid, test, utility_valid, utility_test)


@dataclass
class _Run:
    """One ``train-reranker`` run: what was resolved and built, handed from step to step (instead of long argument
    lists); filled in as the run goes."""

    cfg: TrainRerankerConfig
    out_dir: Path
    kind: RerankerKind
    losses: list[str]
    weighting: Weighting
    ranks: Ranks
    device: str
    use_cpu: bool
    rec: Any
    inputs: _Inputs
    model: Any = None
    tokenizer: Any = None
    modules: dict[str, Any] = field(default_factory=dict)
    held: HeldOut | None = None
    warmup: dict[str, Any] | None = None
    trainer: Any = None
    result: Any = None
    chunk_size: int | None = None
    fast_dropout: bool = False
    valid_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    fusion: dict[str, Any] | None = None

    @property
    def loss_objects(self) -> list[Any]:
        return list(self.modules.values())


def _place_model(run: _Run, pre_scoring: bool) -> None:
    """Put the model on its device before training: in one process on ``device``; under a launcher the Trainer
    places each process's copy on its own device (cuda:LOCAL_RANK), so only a process that scores before training
    puts it there itself (never every process on cuda:0)."""
    if not run.ranks.multi:
        if not run.use_cpu:
            run.model.to(run.device)
    elif run.ranks.scores and pre_scoring and not run.use_cpu:
        run.model.to(run.ranks.device(run.use_cpu))


def _align(run: _Run, evaluator: PairEvaluator | None) -> None:
    """Preference alignment with :class:`RerankerTrainer` (sets ``trainer``, ``result``, ``chunk_size``,
    ``fast_dropout``)."""
    cfg, ranks, model = run.cfg, run.ranks, run.model
    args = RerankerTrainingArguments.for_alignment(cfg, str(run.out_dir / CHECKPOINTS_DIR), use_cpu=run.use_cpu,
                                                   evaluate=evaluator is not None,
                                                   tensorboard=_tensorboard_available())
    if ranks.multi:
        _ = args.device  # sets up the process group (accelerate's PartialState) now
        ranks.sync_with(args)
        # DDP's unused-parameter search (the Trainer's default) passes the forward's outputs through an autograd
        # function: the returned hidden states are then copies that the logits do not depend on, so mgda-ub's
        # gradients w.r.t. them would be zero for the point and pair losses; and the bi-encoder's scale and bias
        # are used outside the DDP forward, which that search cannot see. Off, with the parameters no enabled loss
        # reaches frozen (they get no gradient in one process either)
        args.ddp_find_unused_parameters = False
        frozen = run.kind.freeze_unreached(model, run.loss_objects)
        if frozen:
            logger.info("data parallel: %d parameter tensor(s) no enabled loss reaches are frozen (%s, ...)",
                        len(frozen), frozen[0])
    run.chunk_size = resolve_chunk_size(cfg.forward_chunk_size, run.use_cpu)
    logger.info("training forwards: %s rows each", run.chunk_size or "all")
    collator = run.kind.collator(run.tokenizer, run.losses, run.kind.train_max_length(model, cfg.max_length),
                                 query_anchor=cfg.alignment.contrastive_anchor == "query",
                                 grouped=run.weighting.grouped_batches)
    trainer = RerankerTrainer(
        model=model, args=args, train_dataset=RerankerTrainDataset(run.inputs.train), eval_dataset=evaluator,
        data_collator=collator, processing_class=run.tokenizer, loss_modules=run.modules, weighting=run.weighting,
        forward_chunk_size=run.chunk_size, kind=run.kind,
    )
    _point_tensorboard(trainer, cfg.tensorboard_log_dir or str(run.out_dir / "tensorboard"))
    _log_to_logging(trainer)
    # automatic resume (dpa_rag.checkpoints): checkpoints tied to this config and these inputs, saved on SIGTERM
    checkpoints = CheckpointCallback(checkpoint_state(cfg, _input_paths(cfg)), cfg.save_minutes)
    trainer.add_callback(checkpoints.hooks)
    resume = resolve_resume(cfg.resume_from_checkpoint, run.out_dir / CHECKPOINTS_DIR, checkpoints.state,
                            "train-reranker")
    run.fast_dropout = resolve_fast_dropout(cfg.fast_dropout, run.use_cpu)
    ranks.barrier()  # the other processes wait for the main one's scoring before training together
    with run.rec.timer("train"), fast_cpu_dropout(model, enabled=run.fast_dropout):
        run.result = trainer.train(resume_from_checkpoint=resume)
    checkpoints.raise_if_preempted()
    finished_checkpoints(run.out_dir / CHECKPOINTS_DIR)
    logger.info("trained %d steps; best checkpoint: %s", run.result.global_step, trainer.state.best_model_checkpoint)
    run.trainer = trainer


def _input_paths(cfg: TrainRerankerConfig) -> list[Any]:
    held = cfg.held_out
    return [cfg.train, cfg.valid, cfg.test, cfg.warmup.retrieval, held.eval_retrieval, held.utility_valid,
            held.utility_test]


def _report_trained(run: _Run) -> None:
    """The trained model's test metrics, utility and answer-ranking rows (written by the main process) and the
    fusion weight (sets ``test_metrics`` and ``fusion``)."""
    cfg, model, tokenizer, held = run.cfg, run.model, run.tokenizer, run.held
    assert held is not None
    if not run.ranks.scores:
        return
    if run.inputs.test:
        evaluate = PairEvaluator(run.inputs.test, cfg.per_device_eval_batch_size, cfg.max_length, score=cfg.score)
        run.test_metrics = {f"test_{k}": float(v) for k, v in evaluate(model, tokenizer).items()}
    if held.utility:
        held.add(model, tokenizer, "aligned reranker", None)
        if run.ranks.main:
            write_json(run.out_dir / UTILITY_METRICS, held.utility_report)
        report = held.utility_report
        logger.info("utility on %d held-out lists: nDCG@3 retriever %.4f, aligned %.4f, oracle %.4f",
                    len(held.utility), report["retriever order"].get("ndcg@3", 0.0),
                    report["aligned reranker"].get("ndcg@3", 0.0),
                    report["oracle (largest gain first)"].get("ndcg@3", 0.0))
    if held.records is not None:
        scores = held.retrieval_scores(model, tokenizer)
        held.retrieval_report["reranker"] = answer_ranking_metrics(held.records, scores)
        if cfg.held_out.retriever_fusion:
            run.fusion = fusion_weight(model, held, scores)
        if run.ranks.main:
            write_json(run.out_dir / RETRIEVAL_METRICS, held.retrieval_report)
            calibrate_trained(TrainRerankerOutputs.at(run.out_dir).model, model, held.records, scores, cfg.score)


def _write_outputs(run: _Run) -> list[str]:
    """The main process's files: metrics, ``train_log.json``, the model card; returns the output names for the
    manifest (the model itself is saved before, by :meth:`~dpa_rag.reranker.kinds.base.RerankerKind.save`)."""
    cfg, model, trainer, held = run.cfg, run.model, run.trainer, run.held
    assert held is not None
    out = TrainRerankerOutputs.at(run.out_dir)
    write_json(out.valid_metrics, run.valid_metrics)
    write_json(out.test_metrics, run.test_metrics)
    write_json(out.train_log, {
        "log_history": trainer.state.log_history,
        "steps": trainer.step_history,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "global_step": run.result.global_step,
        "losses": run.losses,
        "weighting": run.weighting.get_config_dict(),
        "warmup": run.warmup,
        "retriever_fusion": run.fusion,
        "forward_chunk_size": run.chunk_size,
        "fast_dropout": run.fast_dropout,
        "kind": run.kind.name,
        "processes": run.ranks.world,
        **run.kind.log_fields(model),
    })
    write_text(out.model / MODEL_CARD, render_model_card(
        config=cfg.to_dict(), head=head_of(model), score=cfg.score if cfg.head == "two-class" else "logit",
        losses={k: m.get_config_dict() for k, m in run.modules.items()}, weighting=run.weighting.get_config_dict(),
        valid_metrics=run.valid_metrics, test_metrics=run.test_metrics,
        retrieval_report=held.retrieval_report or None, warmup=run.warmup, fusion=run.fusion, kind=run.kind.name,
        utility_report=utility_table(held.utility_report) if held.utility_report else None,
    ))
    outputs = [MODEL_DIR, TRAIN_LOG, VALID_METRICS, TEST_METRICS]
    if held.records is not None:
        outputs.append(RETRIEVAL_METRICS)
    if held.utility_report:
        outputs.append(UTILITY_METRICS)
    return outputs


def _log_kind(cfg: TrainRerankerConfig, kind: RerankerKind) -> None:
    """One line: the kind and backbone; for a kind other than the paper's cross-encoder (the bi-encoder), also what
    ``model/`` loads with and the option that gives the paper's setting (a warning when ``--kind auto`` chose it)."""
    if kind.name == DEFAULT_KIND:
        logger.info("reranker kind: %s (backbone %s)", kind.name, cfg.backbone)
        return
    if cfg.kind == "auto":
        why = "--kind auto: the backbone is a sentence-transformers embedding model"
    else:
        why = f"--kind {kind.name}"
    if cfg.authors_default_backbone:
        why += (f"; the authors' command without --pretrained_model_path, and {AUTHORS_BACKBONE} is not in the local "
                "Hugging Face cache")
    logger.log(
        logging.WARNING if cfg.kind == "auto" else logging.INFO,
        "reranker kind: %s, backbone %s (%s); model/ will load with sentence_transformers.%s(path) (score: its "
        "similarity()) or dpa_rag.reranker.Reranker, not with CrossEncoder. For the paper's cross-encoder pass a "
        "cross-encoder backbone: --backbone (their --pretrained_model_path) %s, or --kind cross-encoder for a new "
        "classification head on this one", kind.name, cfg.backbone, why, kind.card_fields("single")["st_class"],
        AUTHORS_BACKBONE)


def _start(cfg: TrainRerankerConfig) -> _Run:
    """Resolve the run: losses, inputs, weighting, processes, kind and device (fails before loading any model)."""
    if not cfg.train:
        raise ValueError("no training file: pass --train (or the authors' --train_data_path)")
    losses = cfg.enabled_losses()
    out_dir = Path(cfg.out_dir)
    rec = stage_recorder("train-reranker", cfg, out_dir, _input_paths(cfg))
    inputs = _Inputs.load(cfg, losses)
    fixed = parse_loss_weights(cfg.alignment.loss_weights) if cfg.alignment.loss_weights else None
    weighting = build_weighting(cfg.alignment.weighting, fixed)
    if cfg.alignment.weighting == "fixed":
        weighting.weights({k: torch.zeros(()) for k in losses})  # fail early on a missing weight
    ranks = Ranks.from_env()
    if not ranks.multi and (alone := single_process_warning()):
        logger.warning(alone)
    check_weighting_supported(weighting, len(losses))  # mgda under ZeRO-3: fail before loading anything
    kind = get_kind(resolve_kind(cfg.backbone, cfg.kind))
    if kind.zero3_error and ranks.zero3:
        raise ValueError(kind.zero3_error)
    if ranks.main:
        _log_kind(cfg, kind)
    device = pick_device(cfg.device)
    use_cpu = device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return _Run(cfg, out_dir, kind, losses, weighting, ranks, device, use_cpu, rec, inputs)


def run(cfg: TrainRerankerConfig) -> TrainRerankerOutputs:
    """Train a preference-aligned reranker.

    Under ``accelerate launch``/torchrun every process trains; the main process alone scores the held-out files
    and writes (see :class:`~dpa_rag.reranker.processes.Ranks`); the others wait for it and return the same outputs.
    The authors' ``--gpu=N`` is applied here (:func:`~dpa_rag.reranker.config.apply_gpu_flag`), so it also acts when
    the pipeline runs this step in-process.

    Raises:
        ValueError: no training file, an invalid loss/weighting combination (``mgda`` under DeepSpeed ZeRO-3).
        DataError: a malformed input file.
    """
    from transformers import set_seed

    cfg = apply_authors_backbone(apply_gpu_flag(cfg))
    r = _start(cfg)
    if r.ranks.multi:
        logger.info("process %d of %d (%s); the main process scores and writes", r.ranks.rank, r.ranks.world,
                    "DeepSpeed ZeRO-3: every process scores" if r.ranks.zero3 else "data parallel")
    set_seed(cfg.seed)
    r.model, r.tokenizer = r.kind.load_for_training(cfg)
    _place_model(r, pre_scoring=bool(r.inputs.utility_test or cfg.held_out.eval_retrieval))
    align = cfg.alignment
    r.modules = build_losses(r.losses, options=LossOptions(
        num_labels=r.model.config.num_labels, temperature=align.temperature, base_temperature=align.temperature,
        contrastive_anchor=align.contrastive_anchor, listwise_temperature=align.listwise_temperature))

    r.held = HeldOut(cfg, r.ranks, utility=r.inputs.utility_test or None)
    if cfg.held_out.eval_retrieval:
        from dpa_rag.data.loaders import load_retrieval

        source = cfg.held_out.eval_retrieval
        r.held.records = held_out_records(load_retrieval(source), r.inputs.train, source)
    r.held.baselines(r.model, r.tokenizer)

    with r.rec.timer("warmup"):
        if r.kind.warms_up:
            r.warmup = _relevance_warmup(cfg, r.model, r.tokenizer, r.inputs.train, r.out_dir, r.use_cpu,
                                         device=r.ranks.device(r.use_cpu) if r.ranks.multi else None)
    if r.warmup is not None and "examples" in r.warmup:
        r.held.add(r.model, r.tokenizer, "after relevance warm-up", "after relevance warm-up")

    inputs = r.inputs
    evaluator = (PairEvaluator(inputs.valid or [], cfg.per_device_eval_batch_size, cfg.max_length, score=cfg.score,
                               lists=inputs.utility_valid) if inputs.valid or inputs.utility_valid else None)
    _align(r, evaluator)
    r.model = r.trainer.accelerator.unwrap_model(r.trainer.model)

    r.valid_metrics = r.trainer.evaluate() if evaluator else {}  # every process: the main one's metrics, broadcast
    _report_trained(r)
    if r.ranks.main:
        r.rec.start()  # the old manifest goes before model/ is overwritten
    r.kind.save(r.trainer, r.model, r.tokenizer, r.out_dir / MODEL_DIR, main=r.ranks.main)
    if not r.ranks.main:
        r.ranks.barrier()  # wait until the main process has written everything
        return TrainRerankerOutputs.at(r.out_dir)
    outputs = _write_outputs(r)
    r.rec.finish(outputs=outputs, train_records=len(inputs.train), valid_pairs=len(inputs.valid or []),
                 test_pairs=len(inputs.test or []), steps=r.result.global_step)
    r.ranks.barrier()
    return TrainRerankerOutputs.at(r.out_dir)
