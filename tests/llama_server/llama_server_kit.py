"""Helpers for the llama_server tests: where the binary is, waiting for a process to be gone."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from llm_pool.backends.llama_server import default_binary


def binary_or_skip() -> Path:
    """The llama-server ``make install`` built; skips the calling module if there is none."""
    path = default_binary()
    if not os.access(path, os.X_OK):
        pytest.skip(f"llama-server is not built ({path} missing): run `make install`", allow_module_level=True)
    return path


def exe_of(pid: int) -> Path:
    """The executable process ``pid`` runs."""
    return Path(f"/proc/{pid}/exe").resolve()


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, their children...), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    parents[int(entry)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass  # gone meanwhile
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def gone(pid: int) -> bool:
    """True when no process ``pid`` exists (a zombie still counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def wait_gone(pid: int) -> None:
    """Wait until process ``pid`` (not necessarily our child) has exited: a pidfd is readable
    from that moment.  A zombie is our own child's business: callers reap theirs."""
    try:
        fd = os.pidfd_open(pid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return
        raise
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
