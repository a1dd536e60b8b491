"""Run the training steps of ``dpa-rag run`` under a multi-process launcher (``accelerate launch``, ``deepspeed``).

With ``launcher: {kind: accelerate, ...}`` in the pipeline config, the ``train-reranker`` and ``train-llm-*`` steps
run as a subprocess::

    accelerate launch --config_file FILE --num_processes N -m dpa_rag.cli.main train-reranker --config STEP.yaml

where ``STEP.yaml`` is the step's resolved config (written to ``<step>/launch.yaml``). The stage inside the
subprocess writes its own ``config.yaml`` and ``manifest.json`` as in-process, so the resume rules of
:func:`~dpa_rag.pipeline.runner.run_steps` are unchanged; the other steps stay in the pipeline's process.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dpa_rag.config import ConfigError, save_config
from dpa_rag.jobs import Preempted, forward_signals, preempt_requested

__all__ = ["LAUNCHED_COMMANDS", "LaunchError", "LauncherConfig", "launch_command", "launched"]

logger = logging.getLogger(__name__)

LAUNCH_CONFIG = "launch.yaml"  # the launched step's config, in its folder (the subprocess reads it)

class LaunchError(RuntimeError):
    """A launched step failed (its process exited non-zero, or the launcher is not installed). The step's own
    error is in the output above; the message names the step and the command, for one ``error:`` line."""


# pipeline step name prefix → the dpa-rag command the step runs
LAUNCHED_COMMANDS = {"train-reranker": "train-reranker", "train-llm": "train-llm"}


class LauncherConfig(BaseModel):
    """The ``launcher`` section of a pipeline config.

    Args:
        kind: ``none`` (every step in-process), ``accelerate`` (``accelerate launch``) or ``deepspeed`` (the
            ``deepspeed`` launcher; give the stage's ``deepspeed`` JSON in its section, e.g. ``zero3``).
        config_file: accelerate config: a file or a shipped name (``multi_gpu``, ``deepspeed_zero3``).
        num_processes: processes (GPUs) on this machine; default: the accelerate config's (``--num_gpus`` for
            deepspeed: all GPUs).
        extra_args: more launcher arguments, placed before the module (e.g. ``["--main_process_port", "29501"]``).
        steps: which step kinds run launched.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "accelerate", "deepspeed"] = Field("none", description="none, accelerate or deepspeed.")
    config_file: str | None = Field(
        None, description="accelerate config file or shipped name (multi_gpu, deepspeed_zero3)."
    )
    num_processes: int | None = Field(None, ge=1, description="Processes on this machine (GPUs).")
    extra_args: list[str] = Field(default_factory=list, description="More launcher arguments.")
    steps: list[Literal["train-reranker", "train-llm"]] = Field(
        default_factory=lambda: ["train-reranker", "train-llm"], description="Step kinds to launch."
    )

    def resolved_config_file(self) -> Path | None:
        """The accelerate config path: a shipped name resolves to the package's file."""
        if self.config_file is None:
            return None
        path = Path(self.config_file)
        if path.suffix or path.exists():
            return path
        from dpa_rag.llm.recipes import accelerate_config_path

        try:
            return Path(accelerate_config_path(self.config_file))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"launcher.config_file: {exc}") from None

    def applies_to(self, step_name: str) -> str | None:
        """The dpa-rag command to launch for ``step_name``, or ``None`` when it runs in-process."""
        if self.kind == "none":
            return None
        for prefix, command in LAUNCHED_COMMANDS.items():
            if step_name.startswith(prefix) and prefix in self.steps:
                return command
        return None


def launch_command(launcher: LauncherConfig, command: str, config_yaml: Path) -> list[str]:
    """The argv that runs ``dpa-rag COMMAND --config CONFIG_YAML`` under ``launcher``."""
    module = ["-m", "dpa_rag.cli.main", command, "--config", str(config_yaml)]
    if launcher.kind == "accelerate":
        argv = [sys.executable, "-m", "accelerate.commands.launch"]
        config_file = launcher.resolved_config_file()
        if config_file is not None:
            argv += ["--config_file", str(config_file)]
        elif (launcher.num_processes or 1) > 1 and "--multi_gpu" not in launcher.extra_args:
            # without a config file, accelerate starts N processes only with --multi_gpu (torchrun underneath, on
            # GPUs and on CPUs); otherwise it starts one
            argv += ["--multi_gpu"]
        if launcher.num_processes is not None:
            argv += ["--num_processes", str(launcher.num_processes)]
        return [*argv, *launcher.extra_args, *module]
    if launcher.kind == "deepspeed":
        argv = ["deepspeed"]
        if launcher.num_processes is not None:
            argv += ["--num_gpus", str(launcher.num_processes)]
        return [*argv, *launcher.extra_args, "--module", "dpa_rag.cli.main", command, "--config", str(config_yaml)]
    raise ValueError(f"launcher kind {launcher.kind!r} runs nothing as a subprocess")


def _wait(argv: list[str], env: dict[str, Any]) -> int:
    """Run the launcher; its exit code."""
    return subprocess.run(argv, check=False, **env).returncode


def launched(
    launcher: LauncherConfig, step_name: str, run: Callable[[Any], Any], out_dir: Callable[[Any], Path]
) -> Callable[[Any], Any]:
    """``run`` itself when the step stays in-process, else a function that launches the step's command.

    Args:
        launcher: the pipeline's launcher section.
        step_name: the pipeline step (``train-reranker``, ``train-llm-sft``, ...).
        run: the in-process stage function.
        out_dir: gives the step's output folder from its config.
    """
    command = launcher.applies_to(step_name)
    if command is None:
        return run

    def run_launched(stage_cfg: BaseModel) -> Path:
        folder = Path(out_dir(stage_cfg))
        folder.mkdir(parents=True, exist_ok=True)
        config_yaml = save_config(stage_cfg, folder / LAUNCH_CONFIG)
        argv = launch_command(launcher, command, config_yaml)
        logger.info("step %s: %s", step_name, shlex.join(argv))
        from dpa_rag.data.loaders import DEDUPE_ENV, _dedupe_enabled

        # --dedupe-ids reaches the launched processes through the environment
        env = {"env": {**os.environ, DEDUPE_ENV: "1"}} if _dedupe_enabled(None) else {}
        try:
            with forward_signals():  # SIGTERM/SIGINT reach the launcher, which passes them to every rank
                returncode = _wait(argv, env)
        except FileNotFoundError:
            raise LaunchError(
                f"step '{step_name}': launcher `{argv[0]}` not found; install it (pip install "
                "'dpa-rag[deepspeed]' for deepspeed) or set launcher.kind: none"
            ) from None
        if preempt_requested() is not None:
            raise Preempted(preempt_requested() or "SIGTERM", f"step '{step_name}' saved its checkpoint (exit code "
                            f"{returncode})")
        if returncode != 0:
            raise LaunchError(
                f"step '{step_name}': `{shlex.join(argv)}` exited with code {returncode}; its own error is "
                f"printed above; fix the cause and re-run (finished steps are skipped); to debug it in one process: "
                f"dpa-rag {command} --config {config_yaml}"
            )
        return folder

    return run_launched
