"""Typed stage configuration: pydantic models, YAML files, command-line overrides, resolved copies.

Every stage has a :class:`StageConfig` subclass whose fields carry a ``description`` (it becomes the ``--help`` text).
Values are merged as *defaults < YAML file < command-line flags*; unknown keys are an error that names the key; the
resolved configuration is written next to the stage's outputs (``config.yaml``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from dpa_rag.io import write_text

__all__ = [
    "ATTN_HELP",
    "ATTN_IMPLEMENTATIONS",
    "AttnImplementation",
    "DTYPES",
    "ConfigError",
    "ConfigSection",
    "DeviceOption",
    "Dtype",
    "Placement",
    "Runtime",
    "StageConfig",
    "config_hash",
    "load_config",
    "load_yaml",
    "normalize_attn",
    "normalize_dtype",
    "save_config",
]

C = TypeVar("C", bound="StageConfig")


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key."""


class StageConfig(BaseModel):
    """Base class of every stage configuration: strict (unknown keys rejected), validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def normalize_dtype(value: object) -> object:
    """The one spelling of a dtype (``float32``, ``bfloat16``, ``float16``, ``auto``); ``fp32``/``bf16``/``fp16`` (the
    short names of older configs and the authors' scripts) and ``torch.float32``-style strings are accepted."""
    if isinstance(value, str):
        v = value.strip().lower().removeprefix("torch.")
        return _DTYPE_ALIASES.get(v, v)
    return value


Dtype = Annotated[Literal["auto", "float32", "bfloat16", "float16"], BeforeValidator(normalize_dtype)]

ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
# LLaMA-Factory's --flash_attn values (v0.8: auto, off, sdpa, fa2; later: disabled; v0.6: a bool, `--flash_attn no`)
_ATTN_ALIASES = {
    "fa2": "flash_attention_2", "flash_attn": "flash_attention_2", "flash-attention-2": "flash_attention_2",
    "disabled": "eager", "off": "eager", "true": "flash_attention_2", "yes": "flash_attention_2", "false": "auto",
    "no": "auto",
}
ATTN_HELP = ("Attention kernel of the model: auto (transformers chooses, sdpa where supported), sdpa, eager or "
             "flash_attention_2 (needs the flash-attn package and a CUDA GPU); LLaMA-Factory's --flash_attn values "
             "(fa2, sdpa, disabled, auto) are accepted.")


def normalize_attn(value: object) -> object:
    """The one spelling of an attention implementation (transformers' ``attn_implementation`` names, or ``auto``);
    LLaMA-Factory's ``--flash_attn`` values (``fa2``, ``disabled``, ``auto``, ``sdpa``, an old bool) map to it."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        v = value.strip().lower()
        return _ATTN_ALIASES.get(v, v)
    return value


AttnImplementation = Annotated[Literal["auto", "sdpa", "eager", "flash_attention_2"], BeforeValidator(normalize_attn)]


class ConfigSection(BaseModel):
    """A nested section of a stage config. Its fields are also accepted flat, as ``flat_prefix + name`` (the
    spelling of older configs, pipeline YAMLs and the command line: ``warmup_lr`` = ``warmup.lr``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    flat_prefix: ClassVar[str] = ""

    @classmethod
    def flat_keys(cls) -> dict[str, str]:
        """``{flat key: field name}``."""
        return {cls.flat_prefix + name: name for name in cls.model_fields}


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DeviceOption(_Options):
    """Where a stage's model runs (mixed into every config that loads a model)."""

    device: str = Field("auto", description="Device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps.")


class Placement(DeviceOption):
    """Device and dtype of a stage's model."""

    dtype: Dtype = Field(
        "auto",
        description="Weights/compute dtype: auto, float32, bfloat16, float16 (fp32/bf16/fp16 accepted); auto picks "
        "bf16 where a measurement on this machine says it runs fast, else fp32 (GPUs: bf16 where supported).",
    )


class Runtime(Placement):
    """Device, dtype and batch size of a stage's model: the one declaration of these options (stages override only
    the batch size's default where their unit differs)."""

    batch_size: int = Field(16, ge=1, description="Items per model call.")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is ``{}``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def _owner(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model that holds the last key of ``loc`` (nested sections such as ``reader.template``), if it is one."""
    for part in loc[:-1]:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        nested = [a for a in (field.annotation, *get_args(field.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        cls = nested[0]
    return cls


def _explain(exc: ValidationError, cls: type[BaseModel], source: str) -> str:
    lines = []
    for e in exc.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            owner = _owner(cls, tuple(e["loc"]))
            known = f" (known keys: {', '.join(sorted(owner.model_fields))})" if owner is not None else ""
            lines.append(f"unknown key '{key}'{known}")
        else:
            lines.append(f"'{key}': {e['msg']}")
    return f"{source}: invalid {cls.__name__}: " + "; ".join(lines)


def load_config(
    cls: type[C],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    section: str | None = None,
) -> C:
    """Build a config from defaults, an optional YAML file and overrides (``None`` values are ignored).

    Args:
        cls: the stage's config class.
        path: YAML file; with ``section``, only that top-level key of the file is used (pipeline configs).
        overrides: values from the command line; they win over the file.
        section: top-level key to read from the YAML file.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        raw = load_yaml(path)
        if section is not None:
            raw = raw.get(section) or {}
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: section '{section}' must be a mapping")
        data.update(raw)
        source = str(path)
    if overrides:
        data.update({k: v for k, v in overrides.items() if v is not None})
        source = f"{source} + command line" if path else "command line"
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, cls, source)) from None


def save_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    return write_text(path, text)


def config_hash(cfg: BaseModel, exclude: set[str] | None = None) -> str:
    """Stable hash of a config's values (for manifests and caches)."""
    data = cfg.model_dump(mode="json", exclude=exclude)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
