"""A real ``llm-pool serve`` subprocess, read through its JSON log lines (stderr).

Such a test runs on the real clock: it waits on the server's own log lines
(:meth:`ServerLog.wait_for`), never on a sleep, and bounds itself with ``trio.fail_after``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

#: The repository root: the subprocess runs there, as a user's ``llm-pool serve`` would.
ROOT = Path(__file__).resolve().parents[2]


async def open_serve(
    config: Path, *, env: dict[str, str] | None = None, command: list[str] | None = None, cwd: Path = ROOT
) -> trio.Process:
    """``llm-pool serve --config CONFIG`` as a child: stdin and stdout closed, stderr (its JSON
    log) piped for :meth:`ServerLog.read`.  ``env``: ours less any ``LLM_POOL_*`` variable by
    default; ``command``: how to run llm-pool (default ``python -m llm_pool.pool.cli``)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_POOL_")}
    return await trio.lowlevel.open_process(
        [*(command or [sys.executable, "-m", "llm_pool.pool.cli"]), "serve", "--config", str(config)],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@asynccontextmanager
async def serve_process(config: Path, **kw: Any) -> AsyncIterator[tuple[trio.Process, ServerLog]]:
    """:func:`open_serve` with its log read in the background (:meth:`ServerLog.wait_for`); a
    process still running at exit, however the block ended, is killed and reaped."""
    log = ServerLog()
    proc = await open_serve(config, **kw)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.read, proc)
            try:
                yield proc, log
            finally:
                if proc.returncode is None:  # its log ends only once it is gone
                    proc.kill()
    finally:
        if proc.returncode is None:
            proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


class ServerLog:
    """The subprocess's JSON log lines, and a way to wait for one."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.ended = False
        self._changed = trio.Event()

    async def read(self, proc: trio.Process) -> None:
        assert proc.stderr is not None
        buffer = b""
        async for chunk in proc.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    self.records.append(json.loads(line))
                except ValueError:  # a library printing: not one of our lines
                    self.records.append({"level": "raw", "event": line.decode(errors="replace")})
            self._changed.set()
            self._changed = trio.Event()
        self.ended = True
        self._changed.set()

    async def wait_for(self, event: str, after: int = 0) -> dict[str, Any]:
        """The first record with ``event`` from index ``after`` on, once it is logged."""
        while True:
            for record in self.records[after:]:
                if record.get("event") == event:
                    return record
            if self.ended:
                raise AssertionError(f"the server's log ended before {event!r}: {self.records[after:]}")
            changed = self._changed
            await changed.wait()
