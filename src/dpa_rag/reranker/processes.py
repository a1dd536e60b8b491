"""Which process does what in a ``train-reranker`` run under a launcher (``accelerate launch``, torchrun, deepspeed,
mpirun): :class:`Ranks`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Ranks", "single_process_warning"]


_WORLD = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.lstrip("-").isdigit():
            return int(value)
    return default


@dataclass
class Ranks:
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
    def from_env(cls) -> Ranks:
        from dpa_rag.reranker.trainer import deepspeed_zero3_enabled

        world = _env_int(_WORLD, 1)
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


def single_process_warning() -> str | None:
    """Why this process, launched as one of several, runs alone; ``None`` when nothing says so.

    ``accelerate launch --num_processes N`` (N > 1) with ``--cpu``, or without ``--multi_gpu`` on a machine with fewer
    than two GPUs, uses accelerate's one-process launcher: it sets ``MASTER_ADDR``/``MASTER_PORT`` for N processes
    (and its ``ACCELERATE_*`` variables) but starts one, with no ``WORLD_SIZE``. Nothing else is detectable: a plain
    ``python`` run cannot know how many processes were meant.
    """
    if "ACCELERATE_MIXED_PRECISION" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    if _env_int(_WORLD, 1) > 1:
        return None
    return ("accelerate launch was asked for several processes but started only this one (its --cpu / single-device "
            "launcher runs one process): training in 1 process. For N processes use `accelerate launch --multi_gpu "
            "--num_processes N` (CPUs too: gloo) or `torchrun --nproc_per_node N`")
