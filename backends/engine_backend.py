"""What every supervised-engine backend shares (``llama_server``, ``vllm_serve``): start the child
and wait until it serves, run each job in its own task over the engine's HTTP API, and turn the
child's death into ``engine_crashed`` for its jobs and :class:`~backends.base.EngineCrashed` for
the scheduler, which restarts the replica with backoff.

A subclass says how its engine is started and asked (``argv``, a readiness probe, ``_generate``
for one job); this module owns the lifetime rules, so both engines keep them alike:

* :meth:`EngineBackend.start_engine`: the child is started through
  :class:`~backends.engine_process.EngineProcess` (own process group, output in our logs, no
  orphan ever), and must become ready within ``start_timeout_s``; an engine that exits first
  fails the load at once with its last lines, and a failed start leaves no process behind.
* :meth:`EngineBackend.serve`: one task per job, at most ``capability`` at once (the scheduler
  never sends more).  When the child exits on its own, every job it ran ends with
  ``engine_crashed``, jobs it never started end likewise, and ``serve`` raises
  :class:`EngineCrashed`.
* A cancelled job (client gone, unload) has its scope cancelled at once
  (:func:`~backends.base.cancel_when_stopped`); the stream to the engine is then closed
  (shielded, :func:`~backends.engine_http.post_stream`), which is what makes the engine abort
  that sequence and free its slot.

Failures of one job::

    engine died while the job ran       → 502 engine_crashed (the replica restarts)
    engine answered an error status     → 502 backend_error with the engine's message
    connection lost, engine still alive → 502 backend_error

This module imports no quart and no engine library.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import trio

from llm_pool.backends.base import EngineCrashed, StreamTimer, cancel_when_stopped
from llm_pool.backends.engine_http import EngineConnectionLost
from llm_pool.backends.engine_process import EngineProcess, describe_exit
from llm_pool.backends.prompts import input_chars
from llm_pool.pool.errors import PoolError, backend_error, engine_crashed, request_cancelled
from llm_pool.pool.jobs import GenerationStats, Job

if TYPE_CHECKING:
    from llm_pool.backends.base import BackendContext
    from llm_pool.backends.prompts import Prompt, PromptPrep, StopMatcher

log = logging.getLogger("llm_pool.engine")

#: After a lost connection, how long to wait for the child's exit before calling it a crash.
CRASH_CONFIRM_S = 1.0
#: How long a crash report waits for the child's last output lines.
LAST_WORDS_S = 0.5
#: Prompts of at most this many caller characters are rendered and tokenized on the event loop:
#: that takes ≈0.5 ms, the hop to a worker thread and back ≈1 ms more of time to first token.
INLINE_PREPARE_CHARS = 4096
#: Engine error text quoted in a message is cut to this many characters.
QUOTE_MAX = 300


class EngineBackend:
    """One replica: one engine child; see the module docstring.  Subclasses set
    :attr:`engine_name` and write ``_generate``."""

    threaded = False
    #: Each job's request is sent before its handler starts the response (``Job.hand_over``,
    #: via ``post_stream(sent=...)``): that start is ≈1 ms of the event loop, on the critical
    #: path of time to first token when it runs first.
    reports_handover = True
    #: How messages name the engine (``llama-server``, ``vllm serve``).
    engine_name: ClassVar[str] = "engine"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.replica = f"{ctx.name}#{ctx.replica_index}"
        self.model = ctx.model
        self.capability = ctx.model.target_inflight
        #: Set by each engine: its prompt preparation and the context its prompts must fit.
        self.prompts: PromptPrep[Any]
        self.n_ctx: int | None = None
        self.engine: EngineProcess | None = None
        self.base_url = ""
        self.starts = 0
        self._client: httpx.AsyncClient | None = None
        self._api_key = ""
        self._started_at = 0.0
        self._running: dict[Job, trio.CancelScope] = {}
        self._crash: str | None = None
        #: True from the moment the engine died until the next load: the scheduler then gives
        #: this replica no job (see ``Replica.free``).
        self.crashed = False

    # ------------------------------------------------------------------ configuration
    def _binary(self) -> Path:  # pragma: no cover - each engine names its own
        raise NotImplementedError

    def _path(self, value: str) -> Path:
        """A configured path: ``~`` expanded, relative to the settings file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.ctx.settings.base_dir) / path

    def _process_facts(self) -> dict[str, object]:
        """What every engine replica shows an admin (``describe``): its binary, URL, pids, starts."""
        engine = self.engine
        return {
            "binary": str(self._binary()),
            "url": self.base_url or None,
            "pid": engine.pid if engine else None,
            "engine_pid": engine.engine_pid if engine else None,
            "starts": self.starts,
        }

    # ------------------------------------------------------------------ lifetime
    async def start_engine(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        api_key: str,
        ready: Callable[[EngineProcess, httpx.AsyncClient], Awaitable[None]],
        *,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        """Start the child and return once ``ready`` returned (it probes the engine over
        ``client``, and sets :attr:`base_url`); raise with the reason (and the engine's last
        lines) otherwise, leaving no process behind.  ``api_key`` goes in every request."""
        m = self.model
        self._crash = None
        self.crashed = False
        engine = EngineProcess(
            argv, env=env, model=self.name, replica=self.replica, stop_timeout_s=m.stop_timeout_s, on_line=on_line
        )
        self.engine = engine
        client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=max(4, 2 * self.capability)),
        )
        try:
            try:
                await engine.start()
            except OSError as e:
                raise RuntimeError(f"cannot start {self.engine_name} {argv[0]}: {e.strerror or e}") from None
            with trio.move_on_after(m.start_timeout_s) as timer:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(engine.run_io)

                    async def exited() -> None:
                        await engine.exited.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(exited)
                    await ready(engine, client)
                    nursery.cancel_scope.cancel()
            if engine.exited.is_set():
                with trio.move_on_after(LAST_WORDS_S):
                    await engine.output_closed.wait()
                raise RuntimeError(
                    f"{self.engine_name} exited while starting ({describe_exit(engine.returncode)}): {engine.tail()}"
                )
            if timer.cancelled_caught:
                raise RuntimeError(
                    f"{self.engine_name} did not become ready within {m.start_timeout_s:g}s (start_timeout_s); "
                    f"its last lines: {engine.tail()}"
                )
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
                await engine.stop()
            raise
        self._client = client
        self._api_key = api_key
        self.starts += 1
        self._started_at = time.monotonic()

    async def close(self) -> None:
        client, self._client = self._client, None
        engine = self.engine
        with trio.CancelScope(shield=True):
            if client is not None:
                await client.aclose()
            if engine is not None:
                await engine.stop()

    # ------------------------------------------------------------------ serving
    async def serve(self, inbox: trio.MemoryReceiveChannel[Job | None]) -> None:
        """Run each job in its own task until ``inbox`` is closed and every job ended; raise
        :class:`EngineCrashed` if the engine died first (its jobs already ended)."""
        engine = self.engine
        assert engine is not None, "not loaded"
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(engine.run_io)
                outer.start_soon(self._watch_exit, engine, outer.cancel_scope)
                async with trio.open_nursery() as jobs:
                    async for job in inbox:
                        if job is not None:
                            jobs.start_soon(self._run_job, job, name=f"{self.replica} {job.id}")
                outer.cancel_scope.cancel()
        finally:
            self._end_undelivered(inbox)
        if self._crash is not None:
            raise EngineCrashed(self._crash, uptime_s=time.monotonic() - self._started_at)

    async def _watch_exit(self, engine: EngineProcess, scope: trio.CancelScope) -> None:
        """The engine died on its own: end its jobs with ``engine_crashed``, stop serving."""
        await engine.exited.wait()
        self.crashed = True  # no new job for this replica from now on (Replica.free)
        with trio.move_on_after(LAST_WORDS_S):
            await engine.output_closed.wait()
        self._crash = f"{self.engine_name} died ({describe_exit(engine.returncode)}): {engine.tail()}"
        error = self._crash_error()
        for job in list(self._running):
            job.fail(job.cancel_error or error)
        scope.cancel()

    def _end_undelivered(self, inbox: trio.MemoryReceiveChannel[Job | None]) -> None:
        """Jobs dispatched to this replica that it never started (stopped or crashed first)."""
        while True:
            try:
                job = inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if job is not None:
                if self._crash is not None:
                    job.fail(job.cancel_error or engine_crashed(self.name, f"replica {self.replica} restarting"))
                else:
                    job.fail(job.cancel_error or request_cancelled(self.name, f"replica {self.replica} stopped"))

    async def _run_job(self, job: Job) -> None:
        scope = trio.CancelScope()
        self._running[job] = scope
        stats: GenerationStats | None = None
        error: BaseException | None = None
        timer = StreamTimer()
        try:
            if job.should_stop():
                return
            job.begin()
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_stopped, job, scope)
                    try:
                        stats = await self._generate(job, timer)
                    except Exception as e:  # caught here, not wrapped in the nursery's group
                        error = e
                    nursery.cancel_scope.cancel()
        except Exception as e:
            error = e
        finally:
            del self._running[job]
            if stats is not None:
                job.finish(stats)
            elif error is not None:
                job.fail(error)
            elif job.should_stop():  # client gone (or the pool's cancel error, delivered by Job)
                job.finish(timer.stats(finish_reason="cancelled", prompt_tokens=None))
            else:  # serve() was cancelled under it: the engine died, or the replica stopped
                job.fail(self._crash_error() if self.crashed else request_cancelled(self.name, f"replica {self.replica} stopped"))

    async def _generate(self, job: Job, timer: StreamTimer) -> GenerationStats:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _prepare(self, job: Job, **kwargs: Any) -> tuple[Prompt, list[Any], StopMatcher]:
        """The job's prompt, tokens and stop matcher (``self.prompts.prepare``): on the event loop
        for a prompt of at most :data:`INLINE_PREPARE_CHARS` caller characters, on a worker
        thread otherwise (bounded by the size checks, but a long one can take ~0.2 s)."""
        prepare = functools.partial(self.prompts.prepare, job, self.n_ctx, **kwargs)
        if input_chars(job.request) <= INLINE_PREPARE_CHARS:
            return prepare()
        return await trio.to_thread.run_sync(prepare)

    # ------------------------------------------------------------------ errors
    async def _lost(self, e: Exception) -> PoolError:
        """A connection error: ``engine_crashed`` if the child is dying, else a backend error."""
        engine = self.engine
        if engine is not None:
            with trio.move_on_after(CRASH_CONFIRM_S):
                await engine.exited.wait()
            if engine.exited.is_set():
                return self._crash_error()
        what = str(e) if isinstance(e, EngineConnectionLost) else type(e).__name__
        return backend_error(self.name, f"lost the connection to {self.engine_name} at {self.base_url}: {what}")

    def _crash_error(self) -> PoolError:
        code = self.engine.returncode if self.engine is not None else None
        return engine_crashed(self.name, f"the engine of replica {self.replica} died while running the request "
                                         f"({describe_exit(code)}); the replica restarts")

    def _status_error(self, status: int, body: bytes) -> PoolError:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and "error" in data:
            return self._engine_error(data["error"], status)
        if isinstance(data, dict) and isinstance(data.get("message"), str):  # vLLM's older ErrorResponse
            return self._engine_error(data, status)
        return backend_error(self.name, f"{self.engine_name} answered HTTP {status}: {quote(body.decode('utf-8', 'replace'))}")

    def _engine_error(self, error: Any, status: int | None = None) -> PoolError:
        message = error.get("message") if isinstance(error, dict) else error
        code = f"HTTP {status}" if status else "an error"
        return backend_error(self.name, f"{self.engine_name} answered {code}: {quote(str(message))}")


def quote(text: str) -> str:
    """Engine text for one of our messages: whitespace folded, cut to :data:`QUOTE_MAX`."""
    text = " ".join(text.split())
    return text if len(text) <= QUOTE_MAX else text[: QUOTE_MAX - 1] + "…"
