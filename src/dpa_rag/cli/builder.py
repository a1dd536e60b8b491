"""Turn a stage's config class and run function into a typer command.

Each field of the :class:`~dpa_rag.config.StageConfig` becomes a ``--kebab-case`` option whose help is the field's
``description``; ``--config FILE`` reads a YAML file; flags given on the command line win over the file. Extra option
names for a field (e.g. the authors' ``--train_data_path``) come from ``json_schema_extra={"cli": [...]}``.
A field with ``json_schema_extra={"flag_value": "True"}`` also works as a bare switch: ``--cls_loss`` alone (last, or
followed by another option) means ``--cls_loss True``, like an ``argparse`` ``store_true`` flag.
Each option's help ends with its default (``[default: 2e-4]``; escaped so rich help shows it rather than reading it
as markup). Every command runs inside :func:`~dpa_rag.cli.errors.error_boundary` (one ``error:`` line and exit code
2 for expected failures); commands whose stage reads question files also get ``--dedupe-ids``.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from typer.core import TyperCommand

from dpa_rag.cli.errors import error_boundary
from dpa_rag.config import StageConfig, load_config
from dpa_rag.data.loaders import DEDUPE_IDS_HELP, dedupe_ids
from dpa_rag.jobs import Preempted, folder_lock
from dpa_rag.stage import check_out_dir, discard_unfinished, recorder_mark

__all__ = ["add_stage_command", "bare_switches", "fail"]

_SCALARS = (str, int, float, bool, Path)


# stages that load question or retrieval files (their ids must be unique unless --dedupe-ids); a config with a
# `dedupe_ids` field (dpa_rag.data.loaders.dedupe_ids_field) gets the flag from the field, so it lands in config.yaml
LOADS_QUESTIONS = {"retrieve", "mine", "augment", "rerank", "answer", "build-llm-data", "train-reranker"}
DEDUPE_HELP = DEDUPE_IDS_HELP


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Print an error for the user on one line and exit (no traceback)."""
    message = " ".join(p.strip() for p in str(message).splitlines() if p.strip())
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _cli_type(annotation: Any) -> tuple[Any, str]:
    """Map a field annotation to a type typer understands, plus a note for the help text."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _cli_type(args[0])
        return str, ""
    if origin is Literal:
        choices = get_args(annotation)
        return type(choices[0]), "one of: " + ", ".join(map(str, choices))
    if origin in (list, tuple, typing.List):  # noqa: UP006
        args = get_args(annotation)
        inner = args[0] if args and args[0] in _SCALARS else str
        return list[inner], "repeat the flag for several values"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return str, "one of: " + ", ".join(str(m.value) for m in annotation)
    if annotation in _SCALARS:
        return annotation, ""
    return None, ""  # dicts and nested models: YAML only


def _default_text(field: FieldInfo) -> str:
    if field.is_required():  # no default to show (typer marks the option [required])
        return ""
    if field.default_factory is not None:
        try:
            value = field.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return ""
    else:
        value = field.default
    if value is None or value == "" or value == [] or value == {}:
        return ""
    if isinstance(value, Enum):
        value = value.value
    return f"[default: {value}]"


def _plain(text: str) -> str:
    """``text`` shown as written by typer's rich help (``[default: 16]`` is not read as a markup tag)."""
    from typer import core

    if not getattr(core, "HAS_RICH", False):
        return text
    from rich.markup import escape

    return escape(text)


def bare_switches(args: list[str], flag_values: dict[str, str]) -> list[str]:
    """Rewrite a bare ``--name`` of an optional-value option to ``--name=VALUE`` (the next token is not its value
    when there is none or it starts with ``-``); ``--name True`` and ``--name=False`` pass unchanged."""
    out = []
    for i, arg in enumerate(args):
        nxt = args[i + 1] if i + 1 < len(args) else None
        if arg in flag_values and (nxt is None or nxt.startswith("-")):
            arg = f"{arg}={flag_values[arg]}"
        out.append(arg)
    return out


def _switch_command(flag_values: dict[str, str]) -> type[TyperCommand]:
    class SwitchCommand(TyperCommand):
        def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
            return super().parse_args(ctx, bare_switches(args, flag_values))

    return SwitchCommand


def _option_fields(config_cls: type[StageConfig]) -> list[tuple[str, FieldInfo]]:
    """``(option name, field)`` for every command-line option of ``config_cls``: its fields, the fields of a nested
    section under their flat names (a field whose type has ``flat_keys()``, e.g. ``warmup.lr`` as ``warmup_lr``;
    the config folds flat keys into the section), and extra options it declares in ``cli_options`` (aliases it
    folds itself: ``{name: {"description": ..., "cli": [...], "flag_value": ...}}``)."""
    out: list[tuple[str, FieldInfo]] = []
    for fname, field in config_cls.model_fields.items():
        section = field.annotation if isinstance(field.annotation, type) else None
        if section is not None and hasattr(section, "flat_keys"):
            out += [(flat, section.model_fields[sub]) for flat, sub in section.flat_keys().items()]
        else:
            out.append((fname, field))
    for fname, spec in getattr(config_cls, "cli_options", {}).items():
        extra = {k: v for k, v in spec.items() if k != "description"}
        out.append((fname, FieldInfo(annotation=Optional[str], default=None,  # noqa: UP045
                                     description=spec.get("description"), json_schema_extra=extra)))
    return out


def add_stage_command(
    app: typer.Typer,
    name: str,
    config_cls: type[StageConfig],
    run: Callable[[Any], Any],
    help: str,
    rich_help_panel: str | None = None,
) -> Callable[..., None]:
    """Register ``name`` on ``app``: options from ``config_cls`` fields, then ``run(cfg)``."""
    params = [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--config", "-c", help="YAML file with any of the options below (flags win)."),
            annotation=Optional[Path],  # noqa: UP045
        )
    ]
    field_names: list[str] = []
    yaml_only: list[str] = []
    flag_values: dict[str, str] = {}
    for fname, field in _option_fields(config_cls):
        cli_type, note = _cli_type(field.annotation)
        if cli_type is None:
            yaml_only.append(fname)
            continue
        flag = "--" + fname.replace("_", "-")
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        aliases = list(extra.get("cli", []))
        decls = [f"{flag}/--no-{fname.replace('_', '-')}"] if cli_type is bool else [flag]
        decls += [a for a in aliases if a != flag]
        if "flag_value" in extra:
            flag_values.update({d: str(extra["flag_value"]) for d in [flag, *aliases]})
        default = "" if "[default:" in (field.description or "") else _default_text(field)
        help_text = " ".join(x for x in (field.description or "", note, default) if x)
        if field.is_required():
            help_text += " [required]"
        help_text = _plain(help_text)
        params.append(
            inspect.Parameter(
                fname,
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(None, *decls, help=help_text, show_default=False),
                annotation=Optional[cli_type],  # noqa: UP045
            )
        )
        field_names.append(fname)
    add_dedupe = name in LOADS_QUESTIONS and "dedupe_ids" not in config_cls.model_fields
    if add_dedupe:
        params.append(
            inspect.Parameter(
                "dedupe_ids",
                inspect.Parameter.KEYWORD_ONLY,
                default=typer.Option(False, "--dedupe-ids", help=DEDUPE_HELP),
                annotation=bool,
            )
        )

    def command(**kwargs: Any) -> None:
        config_path = kwargs.pop("config", None)
        dedupe = bool(kwargs.pop("dedupe_ids", False)) if add_dedupe else False
        overrides = {k: v for k, v in kwargs.items() if v is not None and v != []}
        with error_boundary(name):
            cfg = load_config(config_cls, config_path, overrides)
            out_dir = cfg.resolved_out_dir() if hasattr(cfg, "resolved_out_dir") else getattr(cfg, "out_dir", None)
            if out_dir is not None:
                check_out_dir(out_dir)  # a file in the way is named as such before the lock creates the folder
            lock = folder_lock(out_dir) if out_dir is not None else contextlib.nullcontext()
            with lock, dedupe_ids(dedupe or bool(getattr(cfg, "dedupe_ids", False))):
                mark = recorder_mark()
                try:
                    result = run(cfg)
                except Preempted:  # what resumes stays
                    raise
                except Exception:  # roll the folder back while the lock still holds it (the lock then tidies up)
                    discard_unfinished(since=mark)
                    raise
        if result is not None:
            typer.echo(f"{name}: wrote {result}")

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = name.replace("-", "_")
    doc = help
    if yaml_only:
        doc += "\n\nSet in the YAML file only: " + ", ".join(yaml_only) + "."
    command.__doc__ = doc
    extra_kw = {"cls": _switch_command(flag_values)} if flag_values else {}
    command.command_kwargs = extra_kw  # type: ignore[attr-defined]  # for wrappers that register it themselves
    app.command(name, help=doc, rich_help_panel=rich_help_panel, **extra_kw)(command)
    return command
