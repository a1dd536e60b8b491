"""Run a graph of stages with manifest-based skipping, ``--from`` and ``--force``.

A :class:`Step` knows its name, the steps it depends on, how to build its stage config and how to run. A step is
skipped when its folder holds a complete manifest for the same config hash, its recorded input files are unchanged
*and* its upstream steps have not been re-run since (each manifest records their run ids), so re-running an upstream
step re-runs everything after it. A step that was killed has no complete manifest and runs again; the stages
themselves resume their own partial work (mining, augmentation, training checkpoints) and the generation cache serves
finished LLM calls. After SIGTERM/SIGINT no new step starts (:mod:`dpa_rag.jobs`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dpa_rag.io import write_json
from dpa_rag.jobs import check_preempted
from dpa_rag.stage import MANIFEST, manifest_matches, read_manifest, recorded_run_dir

__all__ = ["Step", "StepResult", "run_steps"]

logger = logging.getLogger(__name__)


@dataclass
class Step:
    """One node of the pipeline graph.

    Attributes:
        name: the step's name (also its folder under the run directory, unless ``folder`` is set).
        deps: names of steps whose outputs this one reads.
        make_config: builds the stage config; receives the folders of all steps by name.
        run: runs the stage with its config.
        enabled: a disabled step is neither run nor required.
        outputs: what the step writes in its folder for a config (first path components; ``None``: not declared),
            for ``run --check``.
    """

    name: str
    deps: Sequence[str]
    make_config: Callable[[dict[str, Path]], BaseModel]
    run: Callable[[BaseModel], Any]
    enabled: bool = True
    folder: str | None = None
    outputs: Callable[[BaseModel], set[str] | None] | None = None


@dataclass
class StepResult:
    name: str
    status: str  # "ran" | "skipped" | "disabled"
    seconds: float = 0.0
    out_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _run_id(out_dir: Path) -> str | None:
    m = read_manifest(out_dir)
    return m.get("run_id") if m else None


def _stamp(out_dir: Path, upstream: dict[str, str | None]) -> str:
    """Add a fresh run id and the upstream run ids to a finished stage's manifest."""
    path = out_dir / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"status": "complete"}
    manifest["run_id"] = uuid.uuid4().hex
    manifest["upstream"] = upstream
    write_json(path, manifest)
    return manifest["run_id"]


def _moved(step_dir: Path, run_dir: Path) -> tuple[str, Path] | None:
    """``(recorded, run_dir)`` when the step was written in a run folder named otherwise (the folder was moved or
    copied, or the run is resumed from another directory): its finished outputs still match by their place in the
    run folder."""
    recorded = recorded_run_dir(step_dir)
    return None if recorded is None or recorded == str(run_dir) else (recorded, run_dir)


def run_steps(
    steps: Sequence[Step],
    run_dir: Path,
    from_step: str | None = None,
    force: bool = False,
    until: str | None = None,
    on_step: Callable[[StepResult], None] | None = None,
) -> list[StepResult]:
    """Run ``steps`` in order (they must be topologically sorted).

    Args:
        steps: the graph, dependencies first.
        run_dir: the run folder; step ``x`` writes to ``run_dir/x``.
        from_step: re-run this step and every enabled step after it, whatever the manifests say.
        force: re-run every step.
        until: stop after this step.
        on_step: called after each step (progress reporting).
    """
    names = [s.name for s in steps]
    for opt, val in (("--from", from_step), ("--until", until)):
        if val is not None and val not in names:
            raise ValueError(f"{opt} {val!r}: unknown step (steps: {', '.join(names)})")
    folders = {s.name: run_dir / (s.folder or s.name) for s in steps}
    enabled = {s.name for s in steps if s.enabled}
    if until is not None and until not in enabled:
        raise ValueError(f"--until {until!r}: that step is disabled in this config")
    for step in steps:  # a typo in a late step's options fails now, not after hours of earlier steps
        if step.enabled:
            step.make_config(folders)
    forced_from = names.index(from_step) if from_step else None
    results: list[StepResult] = []
    for i, step in enumerate(steps):
        if not step.enabled:
            results.append(StepResult(step.name, "disabled"))
            if on_step:
                on_step(results[-1])
            continue
        missing = [d for d in step.deps if d not in enabled]
        if missing:
            raise ValueError(f"step '{step.name}' needs {', '.join(missing)}, which is disabled in this config")
        check_preempted(f"the steps before '{step.name}' are finished")
        out_dir = folders[step.name]
        cfg = step.make_config(folders)
        upstream = {d: _run_id(folders[d]) for d in step.deps}
        must_run = force or (forced_from is not None and i >= forced_from)
        manifest = read_manifest(out_dir)
        up_to_date = (
            not must_run
            and manifest_matches(out_dir, cfg, moved=_moved(out_dir, run_dir))
            and manifest is not None
            and manifest.get("upstream") == upstream
        )
        if up_to_date:
            res = StepResult(step.name, "skipped", out_dir=out_dir)
            logger.info("step %-20s up to date, skipped", step.name)
        else:
            logger.info("step %-20s running", step.name)
            t = time.perf_counter()
            step.run(cfg)
            _stamp(out_dir, upstream)
            res = StepResult(step.name, "ran", seconds=round(time.perf_counter() - t, 1), out_dir=out_dir)
        results.append(res)
        if on_step:
            on_step(res)
        if until is not None and step.name == until:
            break
    return results
