"""Long jobs on shared machines: one writer per folder, and preemption by SIGTERM/SIGINT.

**One writer per folder.** :func:`folder_lock` writes ``.dpa-rag.lock`` (PID, host, start time, command) into an
output folder for as long as a stage or ``dpa-rag run`` writes there. A second writer fails at once with
:class:`FolderBusy`, whose one-line message names the holder. A lock left by a dead process on the same host (a
``kill -9``, a crash of the node's previous job) is taken over with a warning. Under a launcher only rank 0 locks.

**Preemption.** Inside :func:`handle_preemption` (every CLI command but ``serve``), SIGTERM and SIGINT do not kill
the process: they set a flag, and the stage stops at its next safe point (a finished chunk, a stored batch of LLM
calls, a training step) by raising :class:`Preempted` from :func:`check_preempted`, after saving what resumes (the
partial file, the generation cache, a checkpoint). The CLI turns it into one line that says how to resume and exit
code :data:`PREEMPTED_EXIT`. A second signal stops at once (outputs are still only ever renamed into place). The
signal is forwarded to launched child processes (:func:`forward_signals`), which stop the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpa_rag.config import ConfigError

__all__ = [
    "LOCK_FILE", "PREEMPTED_EXIT", "FolderBusy", "Preempted", "check_preempted", "folder_lock", "forward_signals",
    "handle_preemption", "preempt_requested", "resume_hint",
]

logger = logging.getLogger(__name__)

LOCK_FILE = ".dpa-rag.lock"
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request; re-run the same command to resume


class FolderBusy(ConfigError):
    """Another live process writes into the folder (one line: the folder and the holder)."""


class Preempted(Exception):
    """Stopped at a safe point after SIGTERM/SIGINT; ``saved`` says what a re-run resumes from."""

    def __init__(self, signame: str, saved: str = "") -> None:
        self.signame = signame
        self.saved = saved
        super().__init__(f"stopped by {signame}" + (f"; {saved}" if saved else ""))


# ---------------------------------------------------------------- one writer per folder

_held: dict[Path, int] = {}  # folder -> nesting depth, for this process
_held_lock = threading.Lock()


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _holder(info: dict[str, Any]) -> str:
    return (f"PID {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            + (f" ({info['command']})" if info.get("command") else ""))


def _try_create(path: Path, info: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(info, fh)
    return True


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "") -> Iterator[None]:
    """Hold ``folder/.dpa-rag.lock`` while the body runs (re-entrant within a process; no-op on ranks other than 0).

    Raises:
        FolderBusy: a live process (or one on another host) holds the folder.
    """
    if _rank() != 0:
        yield
        return
    folder = Path(folder).absolute()
    with _held_lock:
        if folder in _held:
            _held[folder] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield
        finally:
            with _held_lock:
                _held[folder] -= 1
        return
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # what mkdir below makes (deepest first)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": what or shlex.join(["dpa-rag", *sys.argv[1:]])[:200]}
    for _ in range(3):
        if _try_create(path, info):
            break
        other = _read_lock(path)
        if other is None:  # being written this instant, or garbage: look again, then take it over
            time.sleep(0.05)
            other = _read_lock(path)
            if other is None:
                logger.warning("%s: unreadable lock file; taking it over", path)
                path.unlink(missing_ok=True)
                continue
        same_host = other.get("host") == info["host"]
        pid = other.get("pid")
        if same_host and isinstance(pid, int) and (pid == os.getpid() or not _pid_alive(pid)):
            logger.warning("%s: taking over a stale lock (%s is no longer running)", folder, _holder(other))
            path.unlink(missing_ok=True)
            continue
        raise FolderBusy(
            f"{folder}: another dpa-rag process is writing here ({_holder(other)}); wait for it to finish or stop "
            f"it; if it is gone (another host), remove {path}"
        )
    else:
        raise FolderBusy(f"{folder}: could not take {path}; remove it if no dpa-rag process writes here")
    with _held_lock:
        _held[folder] = 1
    try:
        yield
    finally:
        with _held_lock:
            _held.pop(folder, None)
        current = _read_lock(path)
        if current is not None and current.get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                path.unlink()
        for d in created:  # a run that failed and rolled back leaves no empty folder the lock made
            with contextlib.suppress(OSError):
                d.rmdir()  # only when empty


# ---------------------------------------------------------------- preemption

_signal: list[str] = []  # the first signal received inside handle_preemption (empty: none)
_forwarding: list[bool] = []  # inside forward_signals(): pass the signal on to this process's children


def preempt_requested() -> str | None:
    """The name of the signal that asked this process to stop (``None``: none)."""
    return _signal[0] if _signal else None


def check_preempted(saved: str = "") -> None:
    """A safe point: raise :class:`Preempted` if a stop was requested (``saved``: what a re-run resumes from).
    """
    if preempt_requested() is not None:
        raise Preempted(preempt_requested() or "SIGTERM", saved)


def _handler(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if _forwarding:
        for pid in _child_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signum)
    if _signal:
        raise Preempted(name, "stopped at once on a second signal; finished work is kept")
    _signal.append(name)
    logger.warning("%s received: stopping at the next safe point (send it again to stop at once)", name)


@contextlib.contextmanager
def handle_preemption() -> Iterator[None]:
    """SIGTERM/SIGINT set the stop flag instead of killing the process (main thread only; restored afterwards)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    _signal.clear()
    for s in old:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _signal.clear()


def _child_pids() -> list[int]:
    """The direct children of this process (Linux ``/proc``; none found elsewhere)."""
    pids: list[int] = []
    for task in Path(f"/proc/{os.getpid()}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            pids += [int(x) for x in task.read_text().split()]
    return pids


@contextlib.contextmanager
def forward_signals() -> Iterator[None]:
    """Pass SIGTERM/SIGINT on to the child processes (a launcher, which passes them to every rank) while the body
    runs."""
    _forwarding.append(True)
    try:
        yield
    finally:
        _forwarding.pop()


def resume_hint() -> str:
    """How to resume: the command line this process was started with."""
    argv = sys.argv[1:]
    if not argv:
        return "re-run the same command"
    return "re-run `" + shlex.join(["dpa-rag", *argv]) + "` to resume"

