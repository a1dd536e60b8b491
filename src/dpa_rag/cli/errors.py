"""The error boundary every command runs inside: expected failures become one ``error:`` line and exit code 2.

Expected failures are bad data or configuration (:class:`~dpa_rag.io.DataError`, :class:`~dpa_rag.config.ConfigError`,
``ValueError``), models that cannot be found or loaded, file-system errors, a server that keeps failing after the
retries, a backend that cannot score answers (:class:`~dpa_rag.generation.base.LoglikUnsupported`), and running out of
memory. Each is printed as a single line that names the file (and line), the model or the endpoint, and what to do;
``-v``/``--debug`` adds the traceback. Anything else is a bug: a one-line summary, a pointer to ``dpa-rag env`` for the
report, then the traceback, and exit code 1. Either way a stage that failed after it started writing leaves its
output folder as it found it (:func:`dpa_rag.stage.discard_unfinished`; resume state is kept).
A stop on SIGTERM/SIGINT (:class:`~dpa_rag.jobs.Preempted`) is one ``stopped:`` line saying how to
resume, and exit code :data:`~dpa_rag.jobs.PREEMPTED_EXIT` (75); what resumes is kept.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import traceback
from collections.abc import Iterator

import typer

__all__ = ["EXPECTED_EXIT", "UNEXPECTED_EXIT", "error_boundary", "explain"]

EXPECTED_EXIT = 2
UNEXPECTED_EXIT = 1

_OS_HINTS = {
    errno.EACCES: "permission denied; fix the permissions or choose another path",
    errno.EPERM: "operation not permitted; fix the permissions or choose another path",
    errno.EROFS: "read-only file system; choose another --out-dir",
    errno.ENOSPC: "no space left on the device; free some space and re-run (finished work is kept)",
    errno.EDQUOT: "disk quota exceeded; free some space and re-run (finished work is kept)",
    errno.EEXIST: "already exists and is in the way; remove it or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "is a folder, expected a file; give the file inside it",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}


def _one_line(text: str) -> str:
    """Collapse a message to one line (YAML errors and server bodies span several); drop caret-only lines."""
    parts = [p.strip() for p in str(text).splitlines()]
    return " ".join(p for p in parts if p and set(p) != {"^"})


def _os_message(exc: OSError) -> str | None:
    if exc.errno not in _OS_HINTS:
        return None
    where = exc.filename if exc.filename is not None else None
    if exc.filename2 is not None:
        where = f"{exc.filename} -> {exc.filename2}"
    if where is None:
        return _one_line(str(exc)) + f" ({_OS_HINTS[exc.errno]})"
    return f"{where}: {_OS_HINTS[exc.errno]}"


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    return name in ("OutOfMemoryError", "OutOfMemoryError_") or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def explain(exc: BaseException) -> str | None:
    """The one-line message for an expected failure, or ``None`` when ``exc`` is unexpected (a bug)."""
    from dpa_rag.config import ConfigError
    from dpa_rag.generation.base import LoglikUnsupported
    from dpa_rag.generation.openai_compat import BackendError
    from dpa_rag.io import DataError
    from dpa_rag.models import ModelError, explain_model_error
    from dpa_rag.pipeline.launcher import LaunchError

    if isinstance(exc, (ConfigError, DataError, ModelError, BackendError, LoglikUnsupported, LaunchError)):
        return _one_line(str(exc))
    if _is_oom(exc):
        return (
            f"out of memory ({_one_line(str(exc))[:200] or type(exc).__name__}); lower --batch-size (or the "
            "model size / --max-length) and re-run: finished work and the generation cache are kept"
        )
    if isinstance(exc, OSError):
        model = explain_model_error(exc)
        if model is not None:
            return model
        if isinstance(exc, FileNotFoundError) and exc.errno is None:
            return _one_line(str(exc))  # raised by us: "<path>: no such file"
        return _os_message(exc)
    if isinstance(exc, (UnicodeDecodeError, EOFError)):
        return None  # the readers name file and line; a bare one here is a bug
    if isinstance(exc, ValueError):
        return explain_model_error(exc) or _one_line(str(exc))
    return None


def _debug() -> bool:
    return logging.getLogger("dpa_rag").isEnabledFor(logging.DEBUG)


def _is_usage_error(exc: BaseException) -> bool:
    """A click or typer usage/parameter exception (typer >= 0.2x bundles its own click: ``typer.TyperException``)."""
    bases: list[type] = []
    try:
        import click

        bases.append(click.exceptions.ClickException)
    except ImportError:  # pragma: no cover - click is optional with a typer that bundles it
        pass
    typer_base = getattr(typer, "TyperException", None) or getattr(getattr(typer, "exceptions", None),
                                                                   "TyperException", None)
    if isinstance(typer_base, type):
        bases.append(typer_base)
    return isinstance(exc, tuple(bases))


@contextlib.contextmanager
def error_boundary(command: str) -> Iterator[None]:
    """Run a command's body: expected failures → one ``error:`` line, exit 2; bugs → summary, traceback, exit 1."""
    from dpa_rag.jobs import PREEMPTED_EXIT, Preempted, resume_hint
    from dpa_rag.stage import discard_unfinished, recorder_mark

    mark = recorder_mark()
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
        raise
    except Preempted as exc:  # SIGTERM/SIGINT: stopped at a safe point, what resumes is saved
        typer.secho(f"stopped: {exc}; {resume_hint()} (exit code {PREEMPTED_EXIT})", fg=typer.colors.YELLOW,
                    err=True)
        raise typer.Exit(PREEMPTED_EXIT) from None
    except Exception as exc:  # noqa: BLE001 - this is the boundary
        if _is_usage_error(exc):  # click's / typer's own (bundled click since typer 0.2x): its usage message
            raise
        discard_unfinished(since=mark)
        message = explain(exc)
        if message is not None:
            if _debug():
                typer.echo(traceback.format_exc().rstrip(), err=True)
            typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXPECTED_EXIT) from None
        summary = _one_line(str(exc))[:300]
        typer.secho(
            f"error: {command} failed unexpectedly: {type(exc).__name__}: {summary} — this is probably a bug; please "
            "report it with the output of `dpa-rag env` and the traceback below",
            fg=typer.colors.RED,
            err=True,
        )
        typer.echo(traceback.format_exc().rstrip(), err=True)
        raise typer.Exit(UNEXPECTED_EXIT) from None
