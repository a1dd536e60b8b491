"""``dpa-rag run``: the whole DPA-RAG pipeline from one YAML config, resumable step by step."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from dpa_rag.config import save_config
from dpa_rag.pipeline.config import SECTION_NAMES, PipelineConfig
from dpa_rag.pipeline.runner import Step, StepResult, run_steps

__all__ = ["SECTION_NAMES", "PipelineConfig", "Step", "StepResult", "demo_config", "run_pipeline", "step_names"]

logger = logging.getLogger(__name__)

PIPELINE_CONFIG = "pipeline.yaml"  # the run's resolved pipeline config, in the run folder
DEMO_CONFIG = "demo.yaml"  # the bundled demo config, in dpa_rag/configs


def step_names(cfg: PipelineConfig) -> list[str]:
    """Names of the enabled steps, in order."""
    from dpa_rag.pipeline.dpa import build_steps

    return [s.name for s in build_steps(cfg) if s.enabled]


def run_pipeline(
    cfg: PipelineConfig,
    from_step: str | None = None,
    force: bool = False,
    until: str | None = None,
    on_step: Callable[[StepResult], None] | None = None,
) -> Path:
    """Run (or resume) every enabled step; returns the report's path (or the run folder with ``until``)."""
    from dpa_rag.data.loaders import dedupe_ids
    from dpa_rag.jobs import folder_lock
    from dpa_rag.pipeline import report as report_stage
    from dpa_rag.pipeline.dpa import build_steps

    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(cfg.out_dir):  # one writer per run folder: a second `dpa-rag run` here fails at once
        save_config(cfg, cfg.out_dir / PIPELINE_CONFIG)
        steps = build_steps(cfg)
        # steps whose stage config has no dedupe_ids field (and launched steps, through the environment) follow this
        with dedupe_ids(True) if cfg.dedupe_ids else contextlib.nullcontext():
            run_steps(steps, cfg.out_dir, from_step=from_step, force=force, until=until, on_step=on_step)
    report = report_stage.Outputs.at(cfg.out_dir / "report").report
    return report if until is None and report.exists() else cfg.out_dir


def demo_config() -> Path:
    """The bundled demo config (bundled sample + bundled models); returns its path."""
    from importlib.resources import files

    return Path(str(files("dpa_rag") / "configs" / DEMO_CONFIG))
