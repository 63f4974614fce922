"""A supervised engine process: one child per replica, started and stopped from the replica's task.

Used by backends whose engine is a server of its own (``llama_server``; ``vllm_serve`` later).
What this module promises, whatever the engine:

* **Its own process group.**  The child is :mod:`backends.engine_guard` (a ~20 ms stdlib
  script), started in a new session; the guard starts the engine in the same group.  Stopping
  signals the group, so nothing the engine started is left behind.
* **No orphan, even if the pool is SIGKILLed.**  The guard's stdin is a pipe only the pool
  holds; its EOF stops the engine (see the guard's docstring for why not ``PR_SET_PDEATHSIG``
  on the engine directly).
* **Its output in our logs.**  stdout and stderr are read line by line into the
  ``llm_pool.engine`` logger, tagged with ``model``, ``replica`` and ``pid``; llama.cpp's JSON
  log lines (``--log-jsonl``) keep their level.  The last :data:`TAIL_LINES` lines are kept:
  they are the error when the engine dies (:meth:`EngineProcess.tail`).
* **A stop that always ends.**  :meth:`EngineProcess.stop`: SIGTERM to the guard (which passes
  it on to the group once), SIGKILL to the group after ``stop_timeout_s``, then reap.  It runs
  shielded, so a cancelled replica still stops its child.

The output readers and the exit watcher run in :meth:`EngineProcess.run_io`, which the owner
runs in a nursery of its own for as long as it wants them (a load, then a serve loop); a line cut
by a restart of the readers is kept and completed by the next one.

This module imports no quart; it knows nothing of jobs.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import trio

log = logging.getLogger("llm_pool.engine")

#: Lines of engine output kept for the error message of a failed start or a crash.
TAIL_LINES = 12
#: A single output line longer than this is cut (a runaway engine must not eat our memory).
MAX_LINE_BYTES = 16_384
#: How long :meth:`EngineProcess.stop` keeps reading output after the process ended (the
#: engine's last words), bounded in case something else still holds the pipes.
DRAIN_AFTER_EXIT_S = 1.0
GUARD = Path(__file__).with_name("engine_guard.py")
_PID_LINE = re.compile(r"^llm-pool-guard: engine pid (\d+)$")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
           "error": logging.ERROR}


def describe_exit(code: int | None) -> str:
    """``exit code 1`` / ``killed by SIGKILL`` (the guard reports a signal as 128 + signal)."""
    if code is None:
        return "still running"
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            pass
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


def engine_env(base: Mapping[str, str], *, library_path: str | None, extra: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: ours, ``library_path`` prepended to ``LD_LIBRARY_PATH``, then
    ``extra`` (the config's ``*_env``) on top."""
    env = dict(base)
    if library_path:
        old = env.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = f"{library_path}:{old}" if old else library_path
    env.update(extra)
    return env


class EngineProcess:
    """One engine child (behind its guard); see the module docstring."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        model: str,
        replica: str,
        stop_timeout_s: float,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.model = model
        self.replica = replica
        self.stop_timeout_s = stop_timeout_s
        #: Called with every output line (after logging it): how an owner waits for a line.
        self.on_line = on_line
        self.process: trio.Process | None = None
        #: The engine's pid (the guard's child), once the guard reported it.
        self.engine_pid: int | None = None
        self.exited = trio.Event()
        self.returncode: int | None = None
        self.stopping = False
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._partial = {"stdout": b"", "stderr": b""}
        self._eof: set[str] = set()
        #: Set once both output pipes reached EOF (every line was logged).
        self.output_closed = trio.Event()

    @property
    def pid(self) -> int | None:
        """The guard's pid, which is also the process group's id."""
        return self.process.pid if self.process is not None else None

    # ------------------------------------------------------------------ lifetime
    async def start(self) -> None:
        """Start the guard (and through it the engine).  Raises ``OSError`` if it cannot."""
        guard = [sys.executable, "-I", "-S", str(GUARD), repr(self.stop_timeout_s), "--", *self.argv]
        self.process = await trio.lowlevel.open_process(
            guard,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            start_new_session=True,  # its own session, so its own process group
        )
        log.info(
            "engine process started",
            extra={"fields": {"model": self.model, "replica": self.replica, "pid": self.process.pid,
                              "argv": self.argv}},
        )

    async def run_io(self) -> None:
        """Read the child's output into the logs and watch for its exit; returns once it exited
        and its output ended.  Cancel it to pause reading (the pipes keep what is unread)."""
        assert self.process is not None
        async with trio.open_nursery() as nursery:
            for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
                if stream is not None and name not in self._eof:
                    nursery.start_soon(self._read, stream, name)
            await self._wait_exit()

    async def _wait_exit(self) -> None:
        assert self.process is not None
        if not self.exited.is_set():
            code = await self.process.wait()
            self.returncode = code
            self.exited.set()
            level = logging.INFO if self.stopping else logging.ERROR
            log.log(
                level,
                "engine process exited" if self.stopping else "engine process died",
                extra={"fields": {"model": self.model, "replica": self.replica, "pid": self.process.pid,
                                  "exit": describe_exit(code)}},
            )

    async def _read(self, stream: trio.abc.ReceiveStream, name: str) -> None:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                if self._partial[name]:
                    self._line(self._partial[name], name)
                    self._partial[name] = b""
                self._eof.add(name)
                if len(self._eof) == 2:
                    self.output_closed.set()
                return
            buf = self._partial[name] + data
            *lines, rest = buf.split(b"\n")
            for line in lines:
                self._line(line, name)
            if len(rest) > MAX_LINE_BYTES:
                self._line(rest, name)
                rest = b""
            self._partial[name] = rest

    def _line(self, raw: bytes, stream: str) -> None:
        text = raw[:MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r")
        if not text.strip():
            return
        level, message = logging.INFO, text
        if text.startswith("{"):  # llama.cpp's --log-jsonl: {"type":"log","level":"info","msg":"..."}
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and isinstance(obj.get("msg"), str):
                message = obj["msg"].rstrip()
                level = _LEVELS.get(str(obj.get("level", "")).lower(), logging.INFO)
        if not message.strip():
            return
        if self.engine_pid is None and (m := _PID_LINE.match(message)):
            self.engine_pid = int(m.group(1))
        self._tail.append(message.strip())
        # info lines are the engine's chatter (per slot, per request): debug in our logs
        log.log(
            logging.DEBUG if level <= logging.INFO else level,
            message,
            extra={"fields": {"model": self.model, "replica": self.replica, "pid": self.pid, "stream": stream}},
        )
        if self.on_line is not None:
            self.on_line(message)

    def tail(self, n: int = 5) -> str:
        """The engine's last ``n`` output lines, joined with `` | `` (for an error message)."""
        lines = [line for line in self._tail if not _PID_LINE.match(line)][-n:]
        return " | ".join(lines) if lines else "(no output)"

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to the child's whole process group (gone already: nothing to do)."""
        if self.process is None or self.exited.is_set():
            return
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    async def stop(self) -> None:
        """SIGTERM (through the guard), SIGKILL the group after ``stop_timeout_s``, reap, and
        close our ends of the pipes.  Idempotent.

        Cancellation: shielded; it always returns with the process reaped (SIGKILL cannot be
        refused), at most ``stop_timeout_s`` + :data:`DRAIN_AFTER_EXIT_S` later.
        """
        process = self.process
        if process is None:
            return
        self.stopping = True
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                io_scope = trio.CancelScope()

                async def io() -> None:
                    with io_scope:
                        await self.run_io()

                nursery.start_soon(io)
                if not self.exited.is_set():
                    try:
                        process.send_signal(signal.SIGTERM)  # the guard passes it on to the group once
                    except ProcessLookupError:
                        pass
                    with trio.move_on_after(self.stop_timeout_s):
                        await self.exited.wait()
                    if not self.exited.is_set():
                        log.warning(
                            "engine process did not stop in time; killing it",
                            extra={"fields": {"model": self.model, "replica": self.replica, "pid": process.pid,
                                              "stop_timeout_s": self.stop_timeout_s}},
                        )
                        self.signal_group(signal.SIGKILL)
                        await self.exited.wait()
                with trio.move_on_after(DRAIN_AFTER_EXIT_S):
                    await self.output_closed.wait()
                io_scope.cancel()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    await stream.aclose()

    async def wait_exited(self) -> int:
        await self.exited.wait()
        assert self.returncode is not None
        return self.returncode
