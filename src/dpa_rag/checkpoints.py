"""Training checkpoints that resume by themselves: tied to the run's config and inputs, saved on a step or time
interval and on SIGTERM/SIGINT (used by ``train-llm`` and ``train-reranker``).

Each HF Trainer checkpoint (``<out_dir>/checkpoints/checkpoint-N``) gets ``dpa_rag_resume.json`` once it is complete
(written in ``on_save``, after the trainer's own files and any extra state such as the held-out validation's). It
holds :func:`~dpa_rag.stage.resume_state` of the run: the config hash (without the fields that do not change the
trained weights: output paths, checkpoint interval, logging sinks) and the input fingerprints. With
``resume_from_checkpoint: auto`` (the default) a run resumes from the newest checkpoint whose file matches, and logs
which; a checkpoint of another config or input, or one cut by a kill before it was complete, is never used (a fresh
run deletes them, so a checkpoint folder never mixes two configs).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dpa_rag.jobs import Preempted, _rank, preempt_requested
from dpa_rag.stage import resume_state

__all__ = ["CHECKPOINT_NEUTRAL", "RESUME_FILE", "CheckpointCallback", "checkpoint_state", "complete_checkpoints",
           "finished_checkpoints", "resolve_resume"]

logger = logging.getLogger(__name__)

RESUME_FILE = "dpa_rag_resume.json"
# config fields that change when or where checkpoints are written, or where logs go: never the trained weights
CHECKPOINT_NEUTRAL = frozenset({
    "save_steps", "save_minutes", "save_total_limit", "resume_from_checkpoint", "keep_checkpoints", "report_to",
    "tensorboard_log_dir", "logging_dir",
})
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_state(cfg: BaseModel, inputs: Iterable[str | Path | None]) -> dict[str, Any]:
    """What ties a checkpoint to its run: the config hash (checkpoint and logging options left out) and inputs."""
    return resume_state(cfg, inputs, exclude=CHECKPOINT_NEUTRAL)


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return sorted(found, reverse=True)


def _state_of(ckpt: Path) -> dict[str, Any] | None:
    try:
        return json.loads((ckpt / RESUME_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def complete_checkpoints(folder: Path, state: dict[str, Any]) -> list[Path]:
    """The checkpoints in ``folder`` written by a run with ``state``, newest first."""
    return [p for _, p in _checkpoints(folder) if _state_of(p) == state]


def resolve_resume(option: str | None, folder: Path, state: dict[str, Any], what: str) -> str | None:
    """The checkpoint to resume from for the config option ``resume_from_checkpoint``.

    ``auto``: the newest complete checkpoint of the same config and inputs (others are deleted when there is none,
    so a fresh run never mixes with them); ``last``: the newest checkpoint whatever wrote it; ``never``/``None``:
    none; anything else: that folder.
    """
    if option in (None, "never"):
        return None
    if option == "last":
        found = _checkpoints(folder)
        if not found:
            logger.warning("%s: no checkpoint in %s; starting from scratch", what, folder)
            return None
        logger.info("%s: resuming from %s (resume_from_checkpoint: last)", what, found[0][1])
        return str(found[0][1])
    if option != "auto":
        return option
    same = complete_checkpoints(folder, state)
    others = [p for _, p in _checkpoints(folder) if p not in same]
    if same:
        step = _STEP.match(same[0].name).group(1)  # type: ignore[union-attr]
        logger.info("%s: resuming from %s (step %s, same config and inputs)", what, same[0], step)
        if others:
            logger.info("%s: ignoring %d checkpoint(s) of another config, input or an unfinished save", what,
                        len(others))
        return str(same[0])
    if _rank() != 0:
        return None
    for p in others:
        logger.warning("%s: removing %s (another config or input, or cut by a kill before it was complete)", what, p)
        shutil.rmtree(p, ignore_errors=True)
    return None


def finished_checkpoints(folder: Path) -> None:
    """The run finished: its checkpoints (kept for inspection) are no longer resumed from (their marks go), so a
    forced re-run trains from the start."""
    if _rank() != 0:
        return
    for _, p in _checkpoints(folder):
        (p / RESUME_FILE).unlink(missing_ok=True)


class CheckpointCallback:
    """Checkpoints every ``save_minutes`` (besides the trainer's ``save_steps``), marks each complete checkpoint
    with the run's state, and on SIGTERM/SIGINT saves a checkpoint and stops the trainer at the end of the step.

    Under a launcher the ranks agree on stopping (one all-reduce per step), so every rank stops at the same step
    and saves together (rank 0 writes). ``hooks`` is the ``TrainerCallback`` to give the trainer; add it after any
    callback that saves its own state into the checkpoint, so the mark comes last.
    """

    def __init__(self, state: dict[str, Any], save_minutes: float) -> None:
        from transformers import TrainerCallback

        owner = self

        class _Hooks(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                owner._last_save = time.monotonic()

            def on_step_end(self, args, state, control, **kw):
                if owner._stop_requested():
                    owner.preempted = preempt_requested() or "SIGTERM"
                    control.should_save = True
                    control.should_training_stop = True
                elif owner.save_s and time.monotonic() - owner._last_save >= owner.save_s:
                    control.should_save = True

            def on_save(self, args, state, control, **kw):
                owner._last_save = time.monotonic()
                if state.is_world_process_zero:
                    ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                    if ckpt.is_dir():
                        (ckpt / RESUME_FILE).write_text(json.dumps(owner.state, sort_keys=True), encoding="utf-8")
                        owner.saved = ckpt

        self.hooks = _Hooks()
        self.state = state
        self.save_s = save_minutes * 60
        self.preempted: str | None = None
        self.saved: Path | None = None
        self._last_save = time.monotonic()

    def _stop_requested(self) -> bool:
        flag = preempt_requested() is not None
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                import torch

                t = torch.tensor([1.0 if flag else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                return bool(t.item())
        except (ImportError, RuntimeError):  # pragma: no cover - no usable process group
            pass
        return flag

    def raise_if_preempted(self) -> None:
        """After ``train()`` returned: raise :class:`~dpa_rag.jobs.Preempted` if it stopped on a signal."""
        if self.preempted is not None:
            where = f"checkpoint {self.saved} is saved" if self.saved else "the last checkpoint is kept"
            raise Preempted(self.preempted, where)
