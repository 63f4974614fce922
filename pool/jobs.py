"""A job: one generation request travelling from an HTTP handler to a replica and back.

A job is shared by two sides:

* the **trio side** (handler, scheduler, replica task) submits it, waits for it to start,
  iterates its output events and cancels it;
* the **runtime side** (a backend, usually on the replica's worker thread) reads the request,
  checks :meth:`Job.should_stop` once per token, calls :meth:`Job.emit` for each text chunk as it
  is produced, and ends with exactly one of :meth:`Job.finish` / :meth:`Job.fail`.

Runtime-side methods are safe to call from any thread: they hand their work to the trio loop with
``TrioToken.run_sync_soon`` (FIFO, never blocking the decode loop).  The first end call wins; the
replica slot is released right after the final event is queued, whatever happened, and then the
job's :attr:`Job.on_end` callbacks run (metrics, idle tracking).

Cancellation: :meth:`Job.cancel` sets the stop flag (a plain attribute: one atomic store that the
backend thread reads once per token; a ``threading.Event`` would cost ~1 KB per queued job).  A queued job then
never reaches a backend and ends at once (with the given error, else 503 ``request_cancelled``);
a running one stops at its next token (an async backend awaits :meth:`Job.wait_stopped`, which
``cancel`` wakes on the trio thread: no polling).  If ``cancel`` carries an error
(unload deadline), the caller receives that error instead of a result.

This module imports no quart and no backend library.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import msgspec
import trio

from llm_pool.config import DecodingSettings
from llm_pool.pool.errors import PoolError, backend_error, request_cancelled

log = logging.getLogger("llm_pool.jobs")

FinishReason = Literal["stop", "length", "cancelled"]


#: ``Decoding.top_k`` for "no top-k limit": what an OpenAI route asks for when the caller sets
#: ``temperature`` without llm-pool's ``top_k`` extension (OpenAI's API has no top-k, so its
#: sampling is over the whole vocabulary).  Every runtime llm-pool drives reads 0 that way.
NO_TOP_K = 0


class Decoding(DecodingSettings):
    """Fully resolved decoding settings (request values over ``engine.decoding``): the fields
    of :class:`~llm_pool.config.DecodingSettings` (``top_k`` 1 is greedy, :data:`NO_TOP_K` no
    limit), plus what only the OpenAI routes set."""

    #: The caller's seed (OpenAI routes only): the same seed, prompt and settings give the same
    #: text on a runtime whose kind has ``seeded_sampling``; None: a fresh random seed per request.
    seed: int | None = None
    #: OpenAI's penalties (OpenAI routes only; 0 asks for none).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        """Whether this picks the most likely token every step (a seed then changes nothing)."""
        return self.temperature == 0 or self.top_k == 1


class Message(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(kw_only=True)
class GenerationRequest:
    """What a backend needs to generate; independent of the HTTP API that produced it."""

    model: str
    #: The conversation; for ``/v1/responses`` one optional system turn and one user turn.
    messages: list[Message]
    decoding: Decoding = field(default_factory=Decoding)
    source_lang_code: str | None = None
    target_lang_code: str | None = None
    stream: bool = False
    #: Whose request this is, for fair sharing (:mod:`llm_pool.pool.fairness`); None: the
    #: anonymous bucket.  Already trimmed and checked (1..128 characters).
    fairness_key: str | None = None
    #: Lower runs first within a model, before fairness (vLLM's priority scheduling).
    priority: int = 0
    # -- prompt cache (issue 16)
    #: OpenAI's ``prompt_cache_key``: requests with the same key go to the replica that last
    #: served it while it has room (:meth:`pool.scheduler.ModelRuntime._pick`); None: routed by
    #: the longest prompt prefix a replica served recently.
    prompt_cache_key: str | None = None

    @property
    def system(self) -> str | None:
        return next((m.content for m in self.messages if m.role == "system"), None)

    @property
    def input(self) -> str:
        return next((m.content for m in reversed(self.messages) if m.role == "user"), "")


class GenerationStats(msgspec.Struct, kw_only=True):
    """What a backend measured for one job.  Times are milliseconds; None when unknown."""

    finish_reason: FinishReason = "stop"
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    tokenize_ms: float | None = None
    time_to_first_token_ms: float | None = None
    generate_total_ms: float | None = None
    decode_after_first_token_ms: float | None = None
    cost: float | None = None
    # -- prompt cache (issue 16)
    #: Prompt tokens not computed again: the engine's KV cache already held them (a prefix
    #: shared with the prompt that slot served last).  None where the runtime does not say.
    cached_prompt_tokens: int | None = None


class Delta(msgspec.Struct):
    text: str


class Done(msgspec.Struct):
    text: str
    stats: GenerationStats


class Failed(msgspec.Struct):
    error: PoolError


Event = Delta | Done | Failed

JobState = Literal["queued", "running", "done", "cancelled"]


def new_request_id() -> str:
    return "resp_" + secrets.token_hex(16)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class Job:
    """One request's journey; see the module docstring for who calls what."""

    def __init__(self, request: GenerationRequest, *, request_id: str | None = None) -> None:
        self.id = request_id or new_request_id()
        #: The ``X-Request-Id`` of the HTTP request that made this job (see :mod:`pool.tracing`):
        #: its log lines carry it and a remote upstream is sent it; the response id by default.
        self.trace_id = self.id
        self.request = request
        self.state: JobState = "queued"
        self.replica: str | None = None
        self._stop = False
        self.cancel_error: PoolError | None = None
        #: Set when the job leaves the queue: dispatched to a replica, or ended while queued.
        self.started = trio.Event()
        # perf_counter timestamps: submitted ≤ dispatched ≤ backend_begin ≤ backend_end ≤ done
        self.t_submitted = time.perf_counter()
        self.t_dispatched: float | None = None
        self.t_backend_begin: float | None = None
        self.t_backend_end: float | None = None
        self.t_done: float | None = None
        #: trio-clock times the job took and released its replica slot (fair sharing's slot
        #: time, :mod:`pool.fairness`); None until then.
        self.slot_start: float | None = None
        self.slot_end: float | None = None
        #: When the first chunk of output reached the trio side (time to first token).
        self.t_first_output: float | None = None
        self.output: list[str] = []
        self.stats: GenerationStats | None = None
        #: Set by the HTTP layer once it wrote this job's inference log line (one per request).
        self.reported = False
        #: False when nobody reads the deltas (a non-streamed answer): the backend's chunks after
        #: the first are then held on its side and handed over in one piece at the end, instead
        #: of one cross-thread wake-up of the event loop (and of the handler) per token.
        self.stream_deltas = True
        self._held: list[str] | None = None
        # the output channel is opened on first use: a job waiting in a queue needs none yet
        self._channel: tuple[trio.MemorySendChannel[Event], trio.MemoryReceiveChannel[Event]] | None = None
        self._token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        self._end_lock = threading.Lock()
        self._ended = False
        self._stopped: trio.Event | None = None
        self._on_release: Callable[[Job], None] | None = None
        #: The queue holding this job: called once, on the trio thread, if the job is cancelled
        #: while still queued (the queue's own bookkeeping); set by the queue when it takes the
        #: job, cleared when the job leaves it.  Others watch :attr:`on_end` instead.
        self.on_cancel_queued: Callable[[Job], None] | None = None
        #: Called as ``callback(job, error)`` once, on the trio thread, right after the job ended
        #: and released its replica slot, however it ended: ``error`` is the :class:`PoolError`
        #: its client receives, or None when it finished (``stats.finish_reason`` says how).
        #: For metrics and bookkeeping; a callback that raises is logged and the others still run.
        self.on_end: list[Callable[[Job, PoolError | None], None]] = []

    # ---------------------------------------------------------------- runtime side (any thread)
    def should_stop(self) -> bool:
        return self._stop

    async def wait_stopped(self) -> None:
        """Return once :meth:`cancel` was called: an async backend's way to stop a running job
        without polling its stop flag (a threaded backend reads :meth:`should_stop` per token)."""
        if self._stop:
            return
        if self._stopped is None:  # made on first use: most jobs never need one
            self._stopped = trio.Event()
        await self._stopped.wait()

    def begin(self) -> None:
        """The backend starts working on this job (marks the inference timer's start)."""
        self.t_backend_begin = time.perf_counter()

    def emit(self, text: str) -> None:
        """Hand one chunk of generated text to the client, now (see :attr:`stream_deltas`: the
        first chunk always goes at once, for the time-to-first-token metric)."""
        if not text:
            return
        if self.stream_deltas or self._held is None:
            if not self.stream_deltas:
                self._held = []
            self._post(self._deliver, Delta(text))
        else:
            self._held.append(text)

    def _flush_held(self) -> None:
        if self._held:
            self._post(self._deliver, Delta("".join(self._held)))
            self._held = []

    def finish(self, stats: GenerationStats) -> None:
        """The job ended normally (EOS, stop string, max_tokens, or stop flag)."""
        if self._end():
            self.stats = stats
            self._flush_held()
            self._post(self._complete, None)

    def fail(self, error: BaseException) -> None:
        """The job failed; ``error`` is reported to the client (PoolError as is, else 502)."""
        if self._end():
            if not isinstance(error, PoolError):
                log.error("job %s on %s failed", self.id, self.replica, exc_info=error)
                error = backend_error(self.request.model, f"{type(error).__name__}: {error}")
            self._flush_held()
            self._post(self._complete, error)

    def _end(self) -> bool:
        with self._end_lock:
            if self._ended:
                return False
            self._ended = True
        self.t_backend_end = time.perf_counter()
        if self.t_backend_begin is None:
            self.t_backend_begin = self.t_backend_end
        return True

    @property
    def ended(self) -> bool:
        return self._ended

    def _post(self, fn: Callable[..., None], arg: object) -> None:
        if threading.get_ident() == self._trio_thread:
            fn(arg)
        else:
            try:
                self._token.run_sync_soon(fn, arg)
            except trio.RunFinishedError:
                pass

    # ---------------------------------------------------------------- trio side
    @property
    def _send(self) -> trio.MemorySendChannel[Event]:
        return self._channels()[0]

    @property
    def _recv(self) -> trio.MemoryReceiveChannel[Event]:
        return self._channels()[1]

    def _channels(self) -> tuple[trio.MemorySendChannel[Event], trio.MemoryReceiveChannel[Event]]:
        if self._channel is None:
            self._channel = trio.open_memory_channel[Event](float("inf"))
        return self._channel

    def _deliver(self, event: Event) -> None:
        if isinstance(event, Delta):
            if not self.output:
                self.t_first_output = time.perf_counter()
            self.output.append(event.text)
        try:
            self._send.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; the stop flag is already set

    def _complete(self, error: PoolError | None) -> None:
        error = error or self.cancel_error
        try:
            self.t_done = time.perf_counter()
            self.started.set()  # wakes anyone waiting for the job to leave the queue
            if error is not None:
                self._deliver(Failed(error))
            else:
                assert self.stats is not None
                self._deliver(Done("".join(self.output), self.stats))
            self.state = "done"
            self._send.close()
        finally:
            release, self._on_release = self._on_release, None
            if release is not None:
                release(self)
            for callback in self.on_end:
                try:
                    callback(self, error)
                except Exception:
                    log.exception("job %s: an on_end callback failed", self.id)

    def mark_dispatched(self, replica: str, on_release: Callable[[Job], None]) -> None:
        self.state = "running"
        self.replica = replica
        self.t_dispatched = time.perf_counter()
        self._on_release = on_release
        self.started.set()

    def fail_nowait(self, error: PoolError) -> None:
        """Fail a job that no backend holds (queued, or refused at dispatch)."""
        if self._end():
            self._complete(error)

    def cancel(self, error: PoolError | None = None) -> None:
        """Stop this job: a queued one never runs; a running one stops at its next token.

        With ``error``, the caller gets that error instead of the (partial) result.
        Idempotent; safe to call at any point, including after the job ended; on the trio thread
        (every caller is: handlers, the queue, unload).
        """
        if error is not None and self.cancel_error is None and not self._ended:
            self.cancel_error = error
        self._stop = True
        if self._stopped is not None:
            self._stopped.set()
        if self.state == "queued":
            self.state = "cancelled"
            hook, self.on_cancel_queued = self.on_cancel_queued, None
            if hook is not None:
                hook(self)
            # a queued job always ends here: nobody else would ever end it
            self.fail_nowait(error or request_cancelled(self.request.model, "cancelled while queued"))

    def events(self) -> trio.MemoryReceiveChannel[Event]:
        """The job's output: any number of :class:`Delta`, then one :class:`Done` or
        :class:`Failed`, then the end.  A channel, not a generator: leaving an ``async for``
        early needs no clean-up."""
        return self._recv

    async def next_events(self) -> list[Event]:
        """Wait for the next event, then take every event already queued with it; ``[]`` at the
        end.  Lets a stream write a burst of tokens in one send instead of one per token."""
        try:
            batch = [await self._recv.receive()]
        except trio.EndOfChannel:
            return []
        while True:
            try:
                batch.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return batch

    async def result(self) -> Done:
        """Wait for the whole result; raises the job's :class:`PoolError` on failure.

        Events already queued are taken without a checkpoint each: ``receive()`` yields to the
        scheduler once per event, and a busy loop then delivers a 200-token answer 200 scheduling
        rounds after it was done (seconds under load, measured by the R1 reliability suite).

        Cancellation: a checkpoint only while the job has nothing new to report."""
        while True:
            try:
                event = self._recv.receive_nowait()
            except trio.WouldBlock:
                try:
                    event = await self._recv.receive()
                except trio.EndOfChannel:
                    break
            except trio.EndOfChannel:
                break
            if isinstance(event, Done):
                return event
            if isinstance(event, Failed):
                raise event.error
        raise backend_error(self.request.model, "job ended without a result")  # pragma: no cover

    def timings(self) -> dict[str, float | None]:
        """Engine-side timers in ms (queue wait, inference, total), from the timestamps."""
        end = self.t_done or time.perf_counter()
        inference = (
            self.t_backend_end - self.t_backend_begin
            if self.t_backend_end is not None and self.t_backend_begin is not None
            else None
        )
        total = end - self.t_submitted
        return {
            "engine_queue_wait_ms": _ms(self.t_dispatched - self.t_submitted)
            if self.t_dispatched is not None
            else None,
            "backend_inference_wall_ms": _ms(inference) if inference is not None else None,
            "engine_total_wall_ms": _ms(total),
            "engine_outside_backend_wall_ms": _ms(total - inference)
            if inference is not None
            else None,
        }
