"""``dpa-rag run CONFIG --check``: a dry run that validates a pipeline before hours of compute.

For every enabled step it builds the step's config (unknown keys and bad values fail here, naming the section) and
checks each path the step reads: a path inside the run folder must be written by a step upstream of it (its
dependency, transitively), and, where the writing step's outputs are known (its stage's ``Outputs.written``), be one
of them (e.g. ``model/`` after full fine-tuning, ``merged/`` after a merged LoRA run); a path outside the run folder
must exist. A path that names a model is also checked for the right kind of model: a reader (causal LM) where a
reader is loaded, an encoder or reranker (a sentence-transformers folder, a classification or plain encoder) where a
reranker, backbone or retrieval encoder is loaded: an existing folder by its ``config.json``/``adapter_config.json``/
``modules.json``, a folder a step will write by that step's stage (``train-llm`` writes readers, ``train-reranker``
rerankers). Nothing runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dpa_rag.config import ConfigError
from dpa_rag.models import ENCODER_KIND as ENCODER
from dpa_rag.models import LLM_KIND as LLM
from dpa_rag.models import model_kind
from dpa_rag.pipeline.config import PipelineConfig
from dpa_rag.pipeline.runner import Step

__all__ = ["CheckReport", "check_pipeline", "check_steps"]

# config fields that a step writes or that are not files (never checked as inputs)
_NOT_READ = {"out_dir", "cache_dir", "tensorboard_log_dir", "run_dir", "resume_from_checkpoint", "steps"}
# fields outside the run folder that must exist (a hub id or an alias elsewhere is not a path)
_EXTERNAL_INPUTS = {
    "questions", "eval_questions", "corpus", "input", "retrieval", "train", "valid", "test", "data", "data_extra",
    "preferences", "warmup_retrieval", "eval_retrieval", "include_augmented", "index_dir", "init_adapter",
}


@dataclass
class CheckReport:
    """What ``--check`` found: per step the paths it reads, and the problems (empty = the config is runnable)."""

    reads: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _strings(value: Any, key: str) -> Iterator[tuple[str, str]]:
    """(field, value) for every string or path inside ``value`` (lists and dicts walked)."""
    if isinstance(value, (str, Path)):
        yield key, str(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v, key)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v, key)


def _flat_items(stage_cfg: BaseModel) -> Iterator[tuple[str, Any]]:
    """A config's values by key; a nested section's (``ConfigSection``: it has ``flat_keys()``) under their flat keys
    (``warmup.retrieval`` as ``warmup_retrieval``), so the input checks below see the same keys either way."""
    for key, value in stage_cfg.model_dump(mode="json").items():
        section = getattr(type(stage_cfg).model_fields.get(key), "annotation", None)
        if isinstance(value, dict) and hasattr(section, "flat_keys"):
            yield from ((flat, value[name]) for flat, name in section.flat_keys().items())
        else:
            yield key, value


def _model_roles(cfg: BaseModel) -> dict[str, str]:
    """The fields of a stage config that name a model it loads, and the kind each must be."""
    from dpa_rag.generation.base import GeneratorOptions
    from dpa_rag.llm.config import TrainLLMConfig
    from dpa_rag.rag.answer import AnswerConfig
    from dpa_rag.reranker.config import RerankConfig, TrainRerankerConfig

    roles: dict[str, str] = {}
    if isinstance(cfg, TrainLLMConfig):
        roles.update(model=LLM, init_model=LLM)
    elif isinstance(cfg, GeneratorOptions) and cfg.backend in ("hf", "vllm"):
        roles["model"] = LLM
    if isinstance(cfg, AnswerConfig):
        roles["reranker"] = ENCODER
    if isinstance(cfg, RerankConfig):
        roles["model"] = ENCODER
    if isinstance(cfg, TrainRerankerConfig):
        roles["backbone"] = ENCODER
    for name in ("encoder", "query_encoder", "nli_model"):
        if name in type(cfg).model_fields:
            roles[name] = ENCODER
    return roles


def _produced_kind(cfg: BaseModel | None) -> str | None:
    """The kind of model a step's stage writes (``None``: no model, or not known)."""
    from dpa_rag.llm.config import TrainLLMConfig
    from dpa_rag.reranker.config import TrainRerankerConfig

    if isinstance(cfg, TrainLLMConfig):
        return LLM
    if isinstance(cfg, TrainRerankerConfig):
        return ENCODER
    return None


def _kind_problem(name: str, key: str, text: str, want: str, owner: str | None,
                  configs: dict[str, BaseModel]) -> str | None:
    """Why the model ``text`` that step ``name`` loads as ``key`` is the wrong kind, or ``None``."""
    if owner is not None:
        made = _produced_kind(configs.get(owner))
        if made is not None and made != want:
            return f"step '{name}': {key} = {text} is written by step '{owner}' ({made}), but {key} needs {want}"
        return None
    path = Path(text).expanduser()
    found = model_kind(path) if path.is_dir() else None
    if found is not None and found[0] != want:
        return f"step '{name}': {key} = {text} is {found[0]} ({found[1]}), but {key} needs {want}"
    return None


def _norm(path: str | Path) -> str:
    return os.path.normpath(os.path.abspath(path))


def _upstream(steps: Sequence[Step]) -> dict[str, set[str]]:
    """Each step's transitive dependencies."""
    out: dict[str, set[str]] = {}
    for s in steps:  # topologically sorted
        seen: set[str] = set()
        for d in s.deps:
            seen |= {d} | out.get(d, set())
        out[s.name] = seen
    return out


def check_steps(steps: Sequence[Step], run_dir: Path) -> CheckReport:
    """Validate ``steps`` (see the module docstring); returns a report instead of raising on wiring problems."""
    report = CheckReport()
    folders = {s.name: Path(run_dir) / (s.folder or s.name) for s in steps}
    enabled = {s.name for s in steps if s.enabled}
    upstream = _upstream(steps)
    by_name = {s.name: s for s in steps}
    configs: dict[str, BaseModel] = {}
    for step in steps:
        if not step.enabled:
            continue
        missing = [d for d in step.deps if d not in enabled]
        if missing:
            report.problems.append(f"step '{step.name}' needs {', '.join(missing)}, which is disabled in this config")
        try:
            configs[step.name] = step.make_config(folders)
        except (ConfigError, ValueError) as exc:
            report.problems.append(f"step '{step.name}': {exc}")
    run_root = _norm(run_dir)
    owners = sorted(((_norm(p), n) for n, p in folders.items()), key=lambda x: -len(x[0]))
    for name, stage_cfg in configs.items():
        reads: list[str] = []
        for key, want in _model_roles(stage_cfg).items():
            value = getattr(stage_cfg, key, None)
            if isinstance(value, (str, Path)) and str(value):
                path = _norm(value)
                inside = path == run_root or path.startswith(run_root + os.sep)
                owner = next((n for p, n in owners if path == p or path.startswith(p + os.sep)), None)
                problem = _kind_problem(name, key, str(value), want, owner if inside else None, configs)
                if problem:
                    report.problems.append(problem)
        for key, value in _flat_items(stage_cfg):
            if key in _NOT_READ or value is None:
                continue
            for _, text in _strings(value, key):
                path = _norm(text)
                inside = path == run_root or path.startswith(run_root + os.sep)
                if inside:
                    reads.append(text)
                    owner = next((n for p, n in owners if path == p or path.startswith(p + os.sep)), None)
                    problem = _inside_problem(
                        name, key, text, path, owner, folders, enabled, upstream, configs, by_name
                    )
                    if problem:
                        report.problems.append(problem)
                elif key in _EXTERNAL_INPUTS:
                    reads.append(text)
                    if not Path(text).exists():
                        report.problems.append(f"step '{name}': {key} = {text} does not exist")
        report.reads[name] = reads
    return report


def _inside_problem(
    name: str, key: str, text: str, path: str, owner: str | None, folders: dict[str, Path], enabled: set[str],
    upstream: dict[str, set[str]], configs: dict[str, BaseModel], steps: dict[str, Step],
) -> str | None:
    """Why the in-run path ``text`` read by step ``name`` would not be there, or ``None``."""
    if owner is None:
        return f"step '{name}': {key} = {text} is inside the run folder but no step writes it"
    if owner == name:
        return None
    if owner not in enabled:
        return f"step '{name}': {key} = {text} is written by step '{owner}', which is disabled in this config"
    if owner not in upstream.get(name, set()):
        return f"step '{name}': {key} = {text} is written by step '{owner}', which is not upstream of it"
    rel = Path(path).relative_to(_norm(folders[owner]))
    written = steps[owner].outputs
    outputs = written(configs[owner]) if owner in configs and written is not None else None
    if rel.parts and outputs is not None and rel.parts[0] not in outputs:
        return (
            f"step '{name}': {key} = {text}, but step '{owner}' writes only "
            f"{', '.join(sorted(outputs))} in {folders[owner]}"
        )
    return None


def check_pipeline(cfg: PipelineConfig) -> CheckReport:
    """``--check`` for a pipeline config: its steps' configs, their wiring, the data files and the launcher."""
    from dpa_rag.pipeline.dpa import build_steps

    try:
        steps = build_steps(cfg)
    except (ConfigError, ValueError) as exc:
        return CheckReport(problems=[str(exc)])
    report = check_steps(steps, cfg.out_dir)
    try:
        config_file = cfg.launcher.resolved_config_file()
    except ConfigError as exc:
        report.problems.append(str(exc))
    else:
        if config_file is not None and not config_file.exists():
            report.problems.append(f"launcher.config_file = {config_file} does not exist")
    return report
