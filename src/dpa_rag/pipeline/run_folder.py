"""Read a finished (or partly finished) pipeline run folder, wherever it now lies.

The stage configs a run writes (``<step>/config.yaml``) hold the paths the pipeline wired, relative to the folder
``dpa-rag run`` was started from (``runs/demo/train-llm-sft/merged``, ``cache_dir: runs/demo/cache``) or absolute.
:class:`RunFolder` maps every path under the run folder *as it was recorded* (the parent of the step config's own
``out_dir``, else ``pipeline.yaml: out_dir``) onto the folder where the run is now, so a run folder that was moved
or copied, or is read from another working directory, is read correctly. Paths outside the run folder (the data,
model aliases, hub ids) are left as they are.

Steps are found through :func:`dpa_rag.pipeline.dpa.build_steps` and :func:`~dpa_rag.pipeline.dpa.system_steps`
(the pipeline's own table) and the files inside a step through the stage ``Outputs`` classes; a step counts only
when its ``manifest.json`` says ``complete``. This is the one place a consumer of a run (``dpa-rag serve``) reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpa_rag.config import ConfigError, load_yaml
from dpa_rag.pipeline import PIPELINE_CONFIG
from dpa_rag.pipeline.config import PipelineConfig
from dpa_rag.stage import STAGE_CONFIG, read_manifest, rebase_path, rebase_values, recorded_run_dir

__all__ = ["RunFolder", "rebase_path", "rebase_values"]


@dataclass(frozen=True)
class RunFolder:
    """A pipeline run folder: its config, its steps and their files, with paths mapped to where it is now.

    Attributes:
        root: the run folder as given (absolute or relative to the current directory).
        config: the run's ``pipeline.yaml``.
        recorded: the run folder's path as the run recorded it (``out_dir``; what its stage configs start with).
    """

    root: Path
    config: PipelineConfig
    recorded: str

    @classmethod
    def open(cls, root: str | Path) -> RunFolder:
        """Read ``root/pipeline.yaml`` (:class:`~dpa_rag.config.ConfigError` when it is not a run folder)."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: run folder not found")
        path = root / PIPELINE_CONFIG
        if not path.exists():
            raise ConfigError(f"{root}: not a pipeline run folder ({PIPELINE_CONFIG} missing; create it with "
                              "`dpa-rag run`)")
        data = load_yaml(path)
        recorded = str(data.get("out_dir") or root)
        try:
            cfg = PipelineConfig.model_validate(data)
        except Exception as exc:  # pydantic's error names the key
            raise ConfigError(f"{path}: {exc}") from None
        return cls(root=root, config=cfg, recorded=recorded)

    # --- paths ---------------------------------------------------------------------------------------------------

    def path(self, value: str | Path) -> Path:
        """A path the run recorded, as it is now (paths outside the run folder unchanged)."""
        return rebase_path(value, self.recorded, self.root) or Path(value)

    def values(self, data: Any) -> Any:
        """``data`` with every path inside the run folder mapped to where it is now."""
        return rebase_values(data, self.recorded, self.root)

    # --- steps ---------------------------------------------------------------------------------------------------

    def steps(self) -> dict[str, Path]:
        """The folders of the run's enabled steps, by step name (the pipeline's table for this config)."""
        from dpa_rag.pipeline.dpa import build_steps

        return {s.name: self.root / (s.folder or s.name) for s in build_steps(self.config) if s.enabled}

    def step_dir(self, name: str) -> Path:
        """The folder of step ``name`` (an error naming the steps when the config has no such step)."""
        steps = self.steps()
        if name not in steps:
            raise ConfigError(f"{self.root}: this run has no step '{name}' (steps: {', '.join(steps)})")
        return steps[name]

    def complete(self, name: str) -> bool:
        """Step ``name`` is enabled and finished (its ``manifest.json`` says ``complete``)."""
        folder = self.steps().get(name)
        m = read_manifest(folder) if folder is not None else None
        return bool(m) and m.get("status") == "complete"

    def step_config(self, name: str) -> dict[str, Any] | None:
        """A finished step's resolved ``config.yaml`` with its paths mapped (``None``: not finished)."""
        if not self.complete(name):
            return None
        folder = self.steps()[name]
        path = folder / STAGE_CONFIG
        if not path.exists():
            return None
        roots = [r for r in (recorded_run_dir(folder), self.recorded) if r is not None]
        return rebase_values(load_yaml(path), roots, self.root)

    def system_step(self, system: str) -> str | None:
        """The answer step of a report system (``retriever``, ``full``, ``aligned_reader``, …) in this run."""
        from dpa_rag.pipeline.dpa import system_steps

        return system_steps(self.config).get(system)

    # --- what the run produced ----------------------------------------------------------------------------------

    def index_dir(self) -> Path | None:
        """The finished retrieval index (``None``: the run built none, or it has not finished)."""
        from dpa_rag.retrieval import index

        return index.Outputs.at(self.step_dir("index")).out_dir if self.complete("index") else None

    def reranker_model(self) -> Path | None:
        """The trained reranker's folder (``model/`` of a finished ``train-reranker`` step)."""
        from dpa_rag.reranker import train as reranker_train

        if not self.complete("train-reranker"):
            return None
        model = reranker_train.Outputs.at(self.step_dir("train-reranker")).model
        return model if model.is_dir() and any(model.iterdir()) else None

    def rerank_options(self) -> dict[str, Any]:
        """The options the run reranked its evaluation questions with (``rerank-eval/config.yaml``)."""
        return (self.step_config("rerank-eval") or {}) if "rerank-eval" in self.steps() else {}

    def sft_model(self) -> Path | None:
        """The self-aligned reader's weights (``train-llm-sft``: ``model/``, else ``merged/``)."""
        from dpa_rag.llm import train as llm_train

        if not self.complete("train-llm-sft"):
            return None
        sft = llm_train.Outputs.at(self.step_dir("train-llm-sft"))
        for model in (sft.model, sft.merged):
            if model.is_dir() and any(model.iterdir()):
                return model
        return None

    def promotion(self) -> dict[str, dict[str, Any]]:
        """The promotion gate's decisions (``{"reader": {"promoted", "reason", …}, "reranker": …}``); empty when the
        run has no finished ``promote`` step (older runs: everything trained is served)."""
        from dpa_rag.pipeline import promote

        if "promote" not in self.steps() or not self.complete("promote"):
            return {}
        return promote.read_promotion(self.step_dir("promote")) or {}

    def answer_config(self, system: str) -> dict[str, Any] | None:
        """The finished answer step's config of a report system (``None``: not run or not finished)."""
        step = self.system_step(system)
        return self.step_config(step) if step is not None else None

    def eval_questions(self) -> Path | None:
        """The held-out evaluation questions (the split step's file), if written."""
        from dpa_rag.pipeline import split

        if "split" not in self.steps() or not self.complete("split"):
            return None
        path = split.Outputs.at(self.step_dir("split")).eval_questions
        return path if path.exists() else None

    @property
    def cache_dir(self) -> Path:
        """The run's generation cache."""
        return self.root / "cache"
