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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from dpa_rag.checkpoints import CheckpointCallback, checkpoint_state, finished_checkpoints, resolve_resume
from dpa_rag.data.authors import load_reranker_pairs, load_reranker_train
from dpa_rag.io import write_json, write_text
from dpa_rag.models import pick_device
from dpa_rag.reranker.biencoder import BiEncoderCollator, load_biencoder, resolve_kind
from dpa_rag.reranker.calibration import calibrate_trained
from dpa_rag.reranker.config import TrainRerankerConfig, parse_loss_weights
from dpa_rag.reranker.data import FusedCollator, RerankerTrainDataset, check_train_records
from dpa_rag.reranker.evaluation import PairEvaluator, load_utility_lists, score_utility_lists
from dpa_rag.reranker.fast_dropout import fast_cpu_dropout
from dpa_rag.reranker.fusion import select_alpha
from dpa_rag.reranker.inference import record_lists, score_lists
from dpa_rag.reranker.metrics import answer_ranking_metrics, utility_metrics, utility_table
from dpa_rag.reranker.model import CONFIG_KEY, head_of, load_reranker_model
from dpa_rag.reranker.model_card import render_model_card
from dpa_rag.reranker.step import build_losses
from dpa_rag.reranker.trainer import RerankerTrainer, check_weighting_supported, make_training_args
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


@dataclass
class _HeldOut:
    """The held-out reports of the model before, during and after training: the utility lists (``--utility-test``,
    else ``--utility-valid``) and the answer ranking of ``--eval-retrieval``'s held-out questions, scored with
    :mod:`dpa_rag.reranker.inference` by the processes that score (:attr:`_Ranks.scores`)."""

    cfg: TrainRerankerConfig
    ranks: _Ranks
    utility: list | None = None
    records: list | None = None
    utility_report: dict[str, dict[str, float]] = field(default_factory=dict)
    retrieval_report: dict[str, dict[str, float]] = field(default_factory=dict)

    def retrieval_scores(self, model: Any, tokenizer: Any) -> list[list[float]]:
        c = self.cfg
        return score_lists(model, tokenizer, record_lists(self.records or []), c.per_device_eval_batch_size,
                           c.max_length, c.score)

    def add(self, model: Any, tokenizer: Any, utility_row: str | None, retrieval_row: str | None) -> None:
        """Score ``model`` and add a row to each report (``None``: not to that one)."""
        if not self.ranks.scores:
            return
        c = self.cfg
        if self.utility and utility_row:
            self.utility_report[utility_row] = utility_metrics(self.utility, score_utility_lists(
                model, tokenizer, self.utility, c.per_device_eval_batch_size, c.max_length, c.score))
        if self.records is not None and retrieval_row:
            self.retrieval_report[retrieval_row] = answer_ranking_metrics(
                self.records, self.retrieval_scores(model, tokenizer))

    def baselines(self, model: Any, tokenizer: Any) -> None:
        """The retriever's order, the oracle's (utility) and the untrained model."""
        if not self.ranks.scores:
            return
        if self.utility:
            self.utility_report["retriever order"] = utility_metrics(self.utility, "retriever")
            self.utility_report["oracle (largest gain first)"] = utility_metrics(self.utility, "oracle")
        if self.records is not None:
            self.retrieval_report["retriever order"] = answer_ranking_metrics(self.records)
        self.add(model, tokenizer, "untrained model", "backbone (untrained)")


def _held_out(records: list, train: list, source: str) -> list:
    """``records`` without the questions the reranker trains on (normalised match), so its report is held out."""
    from dpa_rag.eval.metrics import normalize_answer

    seen = {normalize_answer(r.query) for r in train}
    kept = [r for r in records if normalize_answer(r.question) not in seen]
    if len(kept) < len(records):
        logger.info("%s: %d of %d questions are training questions; the ranking report and the fusion weight use "
                    "the other %d", source, len(records) - len(kept), len(records), len(kept))
    return kept


def _relevance_warmup(cfg: TrainRerankerConfig, model: Any, tokenizer: Any, train: list, out_dir: Path,
                      use_cpu: bool, device: str | None = None) -> dict[str, Any] | None:
    """The cross-encoder's warm-up (:mod:`dpa_rag.reranker.warmup`): has-answer listwise CE on the training
    questions, or label-free distillation of a bi-encoder's / BM25's order over every ``--warmup-retrieval`` list
    (held-out ``--eval-retrieval`` questions excluded). Returns the summary logged in ``train_log.json``."""
    if not cfg.warmup_relevance:
        return None
    if not cfg.warmup_retrieval:
        logger.info("relevance warm-up skipped: no --warmup-retrieval file (retrieval of the training questions)")
        return None
    from dpa_rag.data.loaders import load_retrieval
    from dpa_rag.reranker import warmup as wu

    target = wu.resolve_warmup_target(cfg.warmup_target, cfg.backbone, cfg.warmup_teacher)
    retrieval = load_retrieval(cfg.warmup_retrieval)
    info: dict[str, Any] = {"target": target}
    if target == "has-answer":
        examples: list = wu.build_warmup_examples(train, retrieval, cfg.warmup_negatives)
        if not examples:
            logger.warning("relevance warm-up skipped: no training question has both answer-bearing and other "
                           "passages")
            return {"skipped": "no examples", "target": target}
    else:
        eval_records = load_retrieval(cfg.eval_retrieval) if cfg.eval_retrieval else None
        records, counts = wu.select_distill_questions(retrieval, train, eval_records)
        temperature = cfg.warmup_temperature or wu.DEFAULT_TEMPERATURE[target]
        info.update(questions=counts, temperature=temperature, list_size=cfg.warmup_list_size)
        logger.info("distilled warm-up (%s): %d of %d questions of %s (%d reranker training queries; %d held-out "
                    "questions of --eval-retrieval excluded, %d repeated, %d lists under 2 passages)", target,
                    counts["kept"], counts["questions"], cfg.warmup_retrieval, counts["training_queries"],
                    counts["held_out_excluded"], counts["repeated"], counts["short_lists"])
        if not records:
            logger.warning("distilled warm-up skipped: no usable question in %s", cfg.warmup_retrieval)
            return {"skipped": "no examples", **info}
        if target == "bi-encoder":
            teacher = cfg.warmup_teacher or cfg.backbone
            info["teacher"] = teacher
            scores = wu.bi_encoder_teacher_scores(teacher, records, cfg.max_length,
                                                  device=device or str(next(model.parameters()).device))
        else:
            info["teacher"] = "bm25 over the lists' passages"
            scores = wu.bm25_teacher_scores(records)
        examples = wu.build_distill_examples(records, scores, cfg.warmup_list_size, cfg.seed)
    common = {"model": model, "args": _warmup_args(cfg, out_dir, use_cpu),
              "train_dataset": wu.make_warmup_dataset(examples), "processing_class": tokenizer}
    if target == "has-answer":
        trainer: Any = wu.RelevanceWarmupTrainer(data_collator=wu.WarmupCollator(tokenizer, cfg.max_length), **common)
    else:
        trainer = wu.DistillWarmupTrainer(data_collator=wu.DistillCollator(tokenizer, cfg.max_length),
                                          temperature=info["temperature"], **common)
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


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.lstrip("-").isdigit():
            return int(value)
    return default


@dataclass
class _Ranks:
    """Which process does what under a launcher (``accelerate launch``, torchrun, deepspeed, mpirun).

    Every process trains (the Trainer's DDP/DeepSpeed). Only the main process writes (``model/``, metrics, model card,
    ``train_log.json``, the manifest) and scores the held-out lists; the others wait at a barrier. Under DeepSpeed
    ZeRO-3 every process scores (a forward gathers the partitioned weights with collectives), the main one writes.
    Taken from the launcher's environment before the Trainer exists, then from the ``TrainingArguments``.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    zero3: bool = False

    @classmethod
    def from_env(cls) -> _Ranks:
        from dpa_rag.reranker.trainer import deepspeed_zero3_enabled

        world = _env_int(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1)
        rank = _env_int(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0)
        local = _env_int(("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),
                         0)
        return cls(rank=rank if world > 1 else 0, world=max(world, 1), local_rank=local if world > 1 else 0,
                   zero3=world > 1 and deepspeed_zero3_enabled())

    def sync_with(self, args: Any) -> None:
        """Take rank and world size from set-up ``TrainingArguments`` (what the Trainer will use)."""
        self.rank, self.world, self.local_rank = args.process_index, args.world_size, args.local_process_index

    @property
    def multi(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def scores(self) -> bool:
        """This process scores held-out data (the main one; every one under ZeRO-3)."""
        return self.main or self.zero3

    def device(self, use_cpu: bool) -> str:
        """This process's own device (``cuda:LOCAL_RANK``), where the Trainer will put its copy of the model."""
        if use_cpu or not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{self.local_rank}"

    def barrier(self) -> None:
        """Every process waits here for the others (nothing in one process)."""
        if self.multi:
            from accelerate import PartialState

            PartialState().wait_for_everyone()


def _freeze_unreached(model: Any, kind: str, losses: list[str]) -> list[str]:
    """Freeze the parameters that no enabled loss reaches; returns their names.

    DDP with ``find_unused_parameters=False`` needs a gradient for every trainable parameter in every step. Without
    the point and pair losses no loss reads the logits (the cross-encoder's head and pooler, the bi-encoder's scale
    and bias); a sentence-transformers forward never uses its encoder's pooler.
    """
    from dpa_rag.reranker.model import shared_parameters

    uses_logits = bool({"point", "pair"} & set(losses))
    named = list(model.named_parameters())
    if kind == "bi-encoder":
        names = [n for n, _ in named if "pooler" in n.split(".")]
        if not uses_logits:
            names += ["log_scale", "bias"]
    elif uses_logits:
        names = []
    else:
        shared = {id(p) for p in shared_parameters(model)}
        names = [n for n, p in named if id(p) not in shared]
    out = []
    for n, p in named:
        if n in names and p.requires_grad:
            p.requires_grad_(False)
            out.append(n)
    return out


def _warmup_args(cfg: TrainRerankerConfig, out_dir: Path, use_cpu: bool) -> Any:
    """The relevance warm-up's ``TrainingArguments``: a constant ``--warmup-lr``, no evaluation, checkpoints or
    TensorBoard, a loss logged every step."""
    return make_training_args(
        str(out_dir / "warmup"), num_train_epochs=cfg.warmup_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size, learning_rate=cfg.warmup_lr,
        lr_scheduler_type="constant", max_steps=cfg.max_steps, bf16=cfg.bf16, seed=cfg.seed, use_cpu=use_cpu,
        evaluate=False, logging_steps=1, tensorboard=False, max_grad_norm=cfg.max_grad_norm, save=False,
        seed_data=False,
    )


def _training_args(cfg: TrainRerankerConfig, out_dir: Path, use_cpu: bool, evaluate: bool) -> Any:
    """The preference alignment's ``TrainingArguments`` (checkpoints in ``out_dir/checkpoints``)."""
    return make_training_args(
        str(out_dir / CHECKPOINTS_DIR), num_train_epochs=cfg.num_train_epochs,
        per_device_train_batch_size=cfg.per_device_train_batch_size, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_steps=cfg.max_steps, bf16=cfg.bf16,
        seed=cfg.seed, use_cpu=use_cpu, evaluate=evaluate, eval_strategy=cfg.eval_strategy,
        eval_steps=cfg.eval_steps, metric_for_best_model=cfg.metric_for_best_model,
        save_total_limit=cfg.save_total_limit, logging_steps=cfg.logging_steps, tensorboard=_tensorboard_available(),
        max_grad_norm=cfg.max_grad_norm,
    )


def build_collator(kind: str, tokenizer: Any, losses: list[str], weighting: Weighting, max_length: int,
                   query_anchor: bool = False) -> Any:
    """The training collator of ``kind``, its grouping chosen by what ``weighting`` needs
    (:attr:`~dpa_rag.reranker.weighting.Weighting.grouped_batches`: per-group passes, so a loss's parameter gradient
    sees only its rows; otherwise one sorted, deduplicated batch)."""
    grouped = weighting.grouped_batches
    if kind == "bi-encoder":
        return BiEncoderCollator(tokenizer, losses, max_length, query_anchor=query_anchor, grouped=grouped)
    return FusedCollator(tokenizer, losses, max_length, query_anchor=query_anchor, sort=not grouped,
                         dedupe=not grouped)


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
        utility_valid = load_utility_lists(cfg.utility_valid) if cfg.utility_valid else None
        utility_test = load_utility_lists(cfg.utility_test) if cfg.utility_test else utility_valid
        if utility_test is not None and not cfg.utility_test:
            logger.warning("utility report on --utility-valid, the lists that also pick the best checkpoint: the "
                           "aligned reranker's row is optimistic (pass --utility-test for an unbiased one)")
        return cls(train, valid, test, utility_valid, utility_test)


def _load_model(cfg: TrainRerankerConfig, kind: str) -> tuple[Any, Any]:
    """The backbone with its head (a bi-encoder: with the initial ``--bi-scale`` and bias) and its tokenizer."""
    if kind == "bi-encoder":
        model = load_biencoder(cfg.backbone, max_length=cfg.max_length)
        model.log_scale.data.fill_(math.log(cfg.bi_scale))
        model.bias.data.fill_(-cfg.bi_scale / 2)
        tokenizer = model.tokenizer
    else:
        model, tokenizer = load_reranker_model(cfg.backbone, cfg.head, cfg.score)
    logger.info("reranker kind: %s (backbone %s)", kind, cfg.backbone)
    return model, tokenizer


def _place_model(model: Any, device: str, use_cpu: bool, ranks: _Ranks, pre_scoring: bool) -> None:
    """Put the model on its device before training: in one process on ``device``; under a launcher the Trainer
    places each process's copy on its own device (cuda:LOCAL_RANK), so only a process that scores before training
    puts it there itself (never every process on cuda:0)."""
    if not ranks.multi:
        if not use_cpu:
            model.to(device)
    elif ranks.scores and pre_scoring and not use_cpu:
        model.to(ranks.device(use_cpu))


def _align(cfg: TrainRerankerConfig, model: Any, tokenizer: Any, kind: str, inputs: _Inputs, losses: list[str],
           modules: dict[str, Any], weighting: Weighting, evaluator: PairEvaluator | None, out_dir: Path,
           use_cpu: bool, ranks: _Ranks, rec: Any) -> tuple[Any, Any, int | None, bool]:
    """Preference alignment with :class:`RerankerTrainer`; returns ``(trainer, result, chunk size, fast dropout)``."""
    args = _training_args(cfg, out_dir, use_cpu, evaluate=evaluator is not None)
    if ranks.multi:
        _ = args.device  # sets up the process group (accelerate's PartialState) now
        ranks.sync_with(args)
        # DDP's unused-parameter search (the Trainer's default) passes the forward's outputs through an autograd
        # function: the returned hidden states are then copies that the logits do not depend on, so mgda-ub's
        # gradients w.r.t. them would be zero for the point and pair losses; and the bi-encoder's scale and bias
        # are used outside the DDP forward, which that search cannot see. Off, with the parameters no enabled loss
        # reaches frozen (they get no gradient in one process either)
        args.ddp_find_unused_parameters = False
        frozen = _freeze_unreached(model, kind, losses)
        if frozen:
            logger.info("data parallel: %d parameter tensor(s) no enabled loss reaches are frozen (%s, ...)",
                        len(frozen), frozen[0])
    chunk_size = resolve_chunk_size(cfg.forward_chunk_size, use_cpu)
    logger.info("training forwards: %s rows each", chunk_size or "all")
    max_length = (model.st.max_seq_length or cfg.max_length) if kind == "bi-encoder" else cfg.max_length
    collator = build_collator(kind, tokenizer, losses, weighting, max_length,
                              query_anchor=cfg.contrastive_anchor == "query")
    trainer = RerankerTrainer(
        model=model, args=args, train_dataset=RerankerTrainDataset(inputs.train), eval_dataset=evaluator,
        data_collator=collator, processing_class=tokenizer, loss_modules=modules, weighting=weighting,
        forward_chunk_size=chunk_size,
    )
    _point_tensorboard(trainer, cfg.tensorboard_log_dir or str(out_dir / "tensorboard"))
    _log_to_logging(trainer)
    # automatic resume (dpa_rag.checkpoints): checkpoints tied to this config and these inputs, saved on SIGTERM
    checkpoints = CheckpointCallback(checkpoint_state(cfg, _input_paths(cfg)), cfg.save_minutes)
    trainer.add_callback(checkpoints.hooks)
    resume = resolve_resume(cfg.resume_from_checkpoint, out_dir / CHECKPOINTS_DIR, checkpoints.state,
                            "train-reranker")
    fast_dropout = resolve_fast_dropout(cfg.fast_dropout, use_cpu)
    ranks.barrier()  # the other processes wait for the main one's scoring before training together
    with rec.timer("train"), fast_cpu_dropout(model, enabled=fast_dropout):
        result = trainer.train(resume_from_checkpoint=resume)
    checkpoints.raise_if_preempted()
    finished_checkpoints(out_dir / CHECKPOINTS_DIR)
    logger.info("trained %d steps; best checkpoint: %s", result.global_step, trainer.state.best_model_checkpoint)
    return trainer, result, chunk_size, fast_dropout


def _input_paths(cfg: TrainRerankerConfig) -> list[Any]:
    return [cfg.train, cfg.valid, cfg.test, cfg.warmup_retrieval, cfg.eval_retrieval, cfg.utility_valid,
            cfg.utility_test]


def _fusion_weight(model: Any, held: _HeldOut, scores: list[list[float]]) -> dict[str, Any] | None:
    """The retriever-fusion weight chosen on the held-out questions (saved in the model's config), or ``None``."""
    alpha, table = select_alpha(held.records or [], scores)
    if alpha is None:
        logger.info("retriever fusion skipped: no held-out question has an answer-bearing passage")
        return None
    fusion = {"alpha": alpha, "prior": "-log(retriever rank)", "metric": "mrr",
              "questions": int(table[str(alpha)]["n_questions"]), "grid": table}
    held.retrieval_report[f"reranker + retriever fusion (alpha={alpha:g}, chosen on these questions)"] = (
        table[str(alpha)]
    )
    settings = dict(getattr(model.config, CONFIG_KEY, None) or {})
    settings["retriever_fusion"] = {k: fusion[k] for k in ("alpha", "prior", "metric", "questions")}
    setattr(model.config, CONFIG_KEY, settings)
    logger.info("retriever fusion: alpha=%g (1 = reranker only, 0 = retriever order), held-out MRR "
                "%.4f (retriever %.4f, reranker %.4f)", alpha, table[str(alpha)]["mrr"],
                table["0.0"]["mrr"], table["1.0"]["mrr"])
    return fusion


def _report_trained(cfg: TrainRerankerConfig, model: Any, tokenizer: Any, held: _HeldOut, test: list | None,
                    ranks: _Ranks, out_dir: Path) -> tuple[dict[str, float], dict[str, Any] | None]:
    """The trained model's test metrics, utility and answer-ranking rows (written by the main process) and the
    fusion weight; returns ``(test metrics, fusion)``."""
    test_metrics: dict[str, float] = {}
    if not ranks.scores:
        return test_metrics, None
    if test:
        evaluate = PairEvaluator(test, cfg.per_device_eval_batch_size, cfg.max_length, score=cfg.score)
        test_raw = evaluate(model, tokenizer)
        test_metrics = {f"test_{k}": float(v) for k, v in test_raw.items()}
    if held.utility:
        held.add(model, tokenizer, "aligned reranker", None)
        if ranks.main:
            write_json(out_dir / UTILITY_METRICS, held.utility_report)
        report = held.utility_report
        logger.info("utility on %d held-out lists: nDCG@3 retriever %.4f, aligned %.4f, oracle %.4f",
                    len(held.utility), report["retriever order"].get("ndcg@3", 0.0),
                    report["aligned reranker"].get("ndcg@3", 0.0),
                    report["oracle (largest gain first)"].get("ndcg@3", 0.0))
    fusion: dict[str, Any] | None = None
    if held.records is not None:
        scores = held.retrieval_scores(model, tokenizer)
        held.retrieval_report["reranker"] = answer_ranking_metrics(held.records, scores)
        if cfg.retriever_fusion:
            fusion = _fusion_weight(model, held, scores)
        if ranks.main:
            write_json(out_dir / RETRIEVAL_METRICS, held.retrieval_report)
            calibrate_trained(TrainRerankerOutputs.at(out_dir).model, model, held.records, scores, cfg.score)
    return test_metrics, fusion


def _write_outputs(cfg: TrainRerankerConfig, model: Any, tokenizer: Any, kind: str, trainer: Any, result: Any,
                   losses: list[str], modules: dict[str, Any], weighting: Weighting, inputs: _Inputs,
                   held: _HeldOut, valid_metrics: dict[str, float], test_metrics: dict[str, float],
                   warmup: dict[str, Any] | None, fusion: dict[str, Any] | None, chunk_size: int | None,
                   fast_dropout: bool, ranks: _Ranks, out_dir: Path) -> list[str]:
    """The main process's files: metrics, ``train_log.json``, ``model/`` (tokenizer or bi-encoder, model card);
    returns the output names for the manifest (the cross-encoder's weights are saved before, by every process)."""
    out = TrainRerankerOutputs.at(out_dir)
    model_dir = out.model
    write_json(out.valid_metrics, valid_metrics)
    write_json(out.test_metrics, test_metrics)
    write_json(out.train_log, {
        "log_history": trainer.state.log_history,
        "steps": trainer.step_history,
        "best_model_checkpoint": trainer.state.best_model_checkpoint,
        "global_step": result.global_step,
        "losses": losses,
        "weighting": weighting.get_config_dict(),
        "warmup": warmup,
        "retriever_fusion": fusion,
        "forward_chunk_size": chunk_size,
        "fast_dropout": fast_dropout,
        "kind": kind,
        "processes": ranks.world,
        **({"scale": float(model.scale.detach()), "bias": float(model.bias.detach())} if kind == "bi-encoder" else {}),
    })
    if kind == "bi-encoder":
        model.save(model_dir)
    else:
        tokenizer.save_pretrained(str(model_dir))
    write_text(model_dir / MODEL_CARD, render_model_card(
        config=cfg.to_dict(), head=head_of(model), score=cfg.score if cfg.head == "two-class" else "logit",
        losses={k: m.get_config_dict() for k, m in modules.items()}, weighting=weighting.get_config_dict(),
        valid_metrics=valid_metrics, test_metrics=test_metrics, retrieval_report=held.retrieval_report or None,
        warmup=warmup, fusion=fusion, kind=kind,
        utility_report=utility_table(held.utility_report) if held.utility_report else None,
    ))
    outputs = [MODEL_DIR, TRAIN_LOG, VALID_METRICS, TEST_METRICS]
    if held.records is not None:
        outputs.append(RETRIEVAL_METRICS)
    if held.utility_report:
        outputs.append(UTILITY_METRICS)
    return outputs


def run(cfg: TrainRerankerConfig) -> TrainRerankerOutputs:
    """Train a preference-aligned reranker.

    Under ``accelerate launch``/torchrun every process trains; the main process alone scores the held-out files
    and writes (see :class:`_Ranks`); the others wait for it and return the same outputs.

    Raises:
        ValueError: no training file, an invalid loss/weighting combination (``mgda`` under DeepSpeed ZeRO-3).
        DataError: a malformed input file.
    """
    from transformers import set_seed

    if not cfg.train:
        raise ValueError("no training file: pass --train (or the authors' --train_data_path)")
    losses = cfg.enabled_losses()
    out_dir = Path(cfg.out_dir)
    rec = stage_recorder("train-reranker", cfg, out_dir, _input_paths(cfg))
    inputs = _Inputs.load(cfg, losses)
    fixed = parse_loss_weights(cfg.loss_weights) if cfg.loss_weights else None
    weighting = build_weighting(cfg.weighting, fixed)
    if cfg.weighting == "fixed":
        weighting.weights({k: torch.zeros(()) for k in losses})  # fail early on a missing weight
    ranks = _Ranks.from_env()
    check_weighting_supported(weighting, len(losses))  # mgda under ZeRO-3: fail before loading anything
    kind = resolve_kind(cfg.backbone, cfg.kind)
    if kind == "bi-encoder" and ranks.zero3:
        raise ValueError("the bi-encoder kind saves its sentence-transformers model from the process's own weights, "
                         "which DeepSpeed ZeRO-3 partitions; use ZeRO stage 1/2 or plain DDP (accelerate launch)")

    device = pick_device(cfg.device)
    use_cpu = device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if ranks.multi:
        logger.info("process %d of %d (%s); the main process scores and writes", ranks.rank, ranks.world,
                    "DeepSpeed ZeRO-3: every process scores" if ranks.zero3 else "data parallel")
    set_seed(cfg.seed)
    model, tokenizer = _load_model(cfg, kind)
    _place_model(model, device, use_cpu, ranks, pre_scoring=bool(inputs.utility_test or cfg.eval_retrieval))
    modules = build_losses(losses, model.config.num_labels, cfg.temperature, cfg.temperature, cfg.contrastive_anchor)

    held = _HeldOut(cfg, ranks, utility=inputs.utility_test or None)
    if cfg.eval_retrieval:
        from dpa_rag.data.loaders import load_retrieval

        held.records = _held_out(load_retrieval(cfg.eval_retrieval), inputs.train, cfg.eval_retrieval)
    held.baselines(model, tokenizer)

    with rec.timer("warmup"):
        if kind == "bi-encoder":
            warmup = None  # an embedding model already ranks by relevance: nothing to warm up
        else:
            warmup = _relevance_warmup(cfg, model, tokenizer, inputs.train, out_dir, use_cpu,
                                       device=ranks.device(use_cpu) if ranks.multi else None)
    if warmup is not None and "examples" in warmup:
        held.add(model, tokenizer, "after relevance warm-up", "after relevance warm-up")

    evaluator = (PairEvaluator(inputs.valid or [], cfg.per_device_eval_batch_size, cfg.max_length, score=cfg.score,
                               lists=inputs.utility_valid) if inputs.valid or inputs.utility_valid else None)
    trainer, result, chunk_size, fast_dropout = _align(cfg, model, tokenizer, kind, inputs, losses, modules,
                                                       weighting, evaluator, out_dir, use_cpu, ranks, rec)
    model = trainer.accelerator.unwrap_model(trainer.model)

    valid_metrics = trainer.evaluate() if evaluator else {}  # every process: the main one's metrics, broadcast
    test_metrics, fusion = _report_trained(cfg, model, tokenizer, held, inputs.test, ranks, out_dir)
    if ranks.main:
        rec.start()  # the old manifest goes before model/ is overwritten
    if kind != "bi-encoder":
        trainer.save_model(str(out_dir / MODEL_DIR))  # every process (ZeRO-3 gathers the weights); the main one writes
    if not ranks.main:
        ranks.barrier()  # wait until the main process has written everything
        return TrainRerankerOutputs.at(out_dir)
    outputs = _write_outputs(cfg, model, tokenizer, kind, trainer, result, losses, modules, weighting, inputs, held,
                             valid_metrics, test_metrics, warmup, fusion, chunk_size, fast_dropout, ranks, out_dir)
    rec.finish(outputs=outputs, train_records=len(inputs.train), valid_pairs=len(inputs.valid or []),
               test_pairs=len(inputs.test or []), steps=result.global_step)
    ranks.barrier()
    return TrainRerankerOutputs.at(out_dir)
