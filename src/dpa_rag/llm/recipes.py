"""Shipped recipes (``dpa_rag/configs/llm/*.yaml``), accelerate configs and DeepSpeed JSON files."""

from __future__ import annotations

from pathlib import Path

from dpa_rag.config import ConfigError

__all__ = [
    "accelerate_config_path",
    "deepspeed_config_path",
    "list_recipes",
    "recipe_path",
    "resolve_config_arg",
]

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"


def _shipped(folder: str, name: str, suffix: str, what: str) -> Path:
    root = CONFIG_ROOT / folder
    stem = name[: -len(suffix)] if name.endswith(suffix) else name
    path = root / f"{stem}{suffix}"
    if not path.is_file():
        known = ", ".join(sorted(p.name[: -len(suffix)] for p in root.glob(f"*{suffix}"))) or "none"
        raise ConfigError(f"no shipped {what} named '{name}' (shipped: {known})")
    return path


def list_recipes() -> list[str]:
    """Names of the shipped LLM training recipes."""
    return sorted(p.stem for p in (CONFIG_ROOT / "llm").glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """Path of a shipped LLM recipe, e.g. ``recipe_path("paper")`` → ``…/configs/llm/paper.yaml``.

    Raises:
        ConfigError: no recipe of that name (the message lists the shipped ones).
    """
    return _shipped("llm", name, ".yaml", "LLM recipe")


def accelerate_config_path(name: str) -> Path:
    """Path of a shipped accelerate config: ``multi_gpu`` or ``deepspeed_zero3``."""
    return _shipped("accelerate", name, ".yaml", "accelerate config")


def deepspeed_config_path(name: str) -> Path:
    """A DeepSpeed JSON: an existing file, or a shipped name (``zero3`` → ``deepspeed_zero3.json``)."""
    if Path(name).is_file():
        return Path(name)
    stem = name[: -len(".json")] if name.endswith(".json") else name
    if not stem.startswith("deepspeed_"):
        stem = f"deepspeed_{stem}"
    return _shipped("accelerate", stem, ".json", "DeepSpeed config")


def resolve_config_arg(value: str | Path) -> Path:
    """``--config`` value: an existing file wins, else a shipped recipe name (with or without ``.yaml``)."""
    path = Path(value)
    if path.is_file():
        return path
    if path.parent == Path(".") and path.suffix in ("", ".yaml"):
        try:
            return recipe_path(path.name)
        except ConfigError:
            pass
    shipped = ", ".join(list_recipes())
    raise ConfigError(f"{value}: config file not found, and no shipped recipe of that name (shipped: {shipped})")
