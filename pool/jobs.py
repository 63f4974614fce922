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
from typing import Any, Literal

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


class ImagePart(msgspec.Struct, kw_only=True):
    """An image a caller put in a message (conversations and content arrays, issue 16).

    ``url`` is a ``data:`` URL whose base64 and media type were checked at the HTTP edge, or an
    ``http(s)://`` URL (sent on only to a model whose ``image_url_fetch`` allows it; llm-pool
    never fetches one itself)."""

    url: str
    detail: Literal["low", "high", "auto"] = "auto"
    #: Where the caller sent it (a JSON path such as ``$.messages[0].content[1]``), for a 400.
    at: str = ""


# structured output and tool calling (issue 16): the shapes a backend needs
class ResponseFormat(msgspec.Struct, kw_only=True, frozen=True):
    """What the answer must be: ``json_object`` (any JSON object) or ``json_schema`` (JSON that
    matches ``schema``; ``name``/``description``/``strict`` are passed on to remote models)."""

    type: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    name: str | None = None
    description: str | None = None
    strict: bool | None = None


class ToolSpec(msgspec.Struct, kw_only=True, frozen=True):
    """A function the model may call (OpenAI's ``tools[].function``)."""

    name: str
    description: str | None = None
    #: The JSON schema of the arguments object (None: any object).
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolCall(msgspec.Struct, kw_only=True):
    """A call the model made (or made earlier, in an assistant turn): ``arguments`` is JSON text."""

    id: str
    name: str
    arguments: str


class Message(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "tool"]
    #: The message's text (a content array's text items joined with newlines).
    content: str
    # conversations and content arrays (issue 16)
    #: The content's items in order (text, images) when it holds an image; None: text only.
    parts: list[str | ImagePart] | None = None
    # tool calling (issue 16): an assistant turn's calls, and a tool turn's answered call
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.parts or () if isinstance(p, ImagePart)]


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
    # conversations, content arrays, thinking (issue 16)
    #: ``default``: the model's configured thinking; ``enabled``/``disabled``: this request's,
    #: where the model's ``capabilities.thinking_modes`` offer it (checked at admission).
    thinking: Literal["default", "enabled", "disabled"] = "default"

    @property
    def images(self) -> list[ImagePart]:
        """Every image of the conversation, in order."""
        return [i for m in self.messages for i in m.images]

    # --- raw completions, embeddings, logprobs (issue 16 §2: /v1/completions, /v1/embeddings)
    #: ``/v1/completions``: the caller's text is the whole prompt, no template around it (one
    #: caller segment: never a control token); ``messages`` is then empty.
    raw_prompt: str | None = None
    #: ``/v1/embeddings``: the texts to embed; the job computes :attr:`Job.embeddings`, no text.
    embed_inputs: list[str] | None = None
    #: Log probabilities wanted per generated token: None none; k ≥ 0 the chosen token's and
    #: the k most likely ones' (:attr:`Delta.logprobs`).
    logprobs: int | None = None

    @property
    def kind(self) -> Literal["chat", "raw", "embed"]:
        """What the job makes: chat (a templated prompt), raw (a text completion) or embeddings."""
        if self.embed_inputs is not None:
            return "embed"
        return "raw" if self.raw_prompt is not None else "chat"
    # structured output and tool calling (issue 16)
    #: The answer's format; None: free text.
    response_format: ResponseFormat | None = None
    #: Functions the model may call (Chat Completions' ``tools``).
    tools: list[ToolSpec] = field(default_factory=list)
    #: ``none`` (no call), ``auto`` (the model decides) or ``required`` (at least one call);
    #: with :attr:`tool_name` a call of that function.
    tool_choice: Literal["none", "auto", "required"] = "auto"
    tool_name: str | None = None
    #: The llama.cpp grammar (GBNF) that output must follow, set at admission for runtimes that
    #: enforce one (:mod:`backends.structured`); None: unconstrained.
    grammar: str | None = None

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
        if self.raw_prompt is not None:
            return self.raw_prompt
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


class TopLogprob(msgspec.Struct, kw_only=True):
    """One candidate token and its log probability (natural log); ``bytes``: its UTF-8 bytes
    (a byte-level token may hold part of a character)."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob, kw_only=True):
    """One generated token (its text, log probability and bytes) and the ``k`` most likely
    candidates at its position, most likely first."""

    top: list[TopLogprob]


class Delta(msgspec.Struct):
    text: str
    #: One entry per generated token in ``text`` when the request asked for logprobs.
    logprobs: list[TokenLogprob] | None = None


class Done(msgspec.Struct):
    text: str
    stats: GenerationStats
    #: Every generated token's log probabilities, when the request asked for them.
    logprobs: list[TokenLogprob] | None = None


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
        #: Set once the job's runtime has its request: at dispatch for in-process backends, once
        #: the request was sent for an engine child (a backend with ``reports_handover``; see
        #: :meth:`hand_over`), and when the job ends.  A handler waits for it before it starts
        #: its response, so that work does not delay the request on its way to the engine.
        self.handed_over = trio.Event()
        #: True when the job ended before its backend handed it over (a prompt its engine
        #: backend refused, an engine gone): its handler answers with the error's status.
        self.ended_before_handover = False
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
        self._held_logprobs: list[TokenLogprob] = []
        self._pending_logprobs: list[TokenLogprob] = []
        #: Every token's log probabilities so far (trio side), when the request asked for them.
        self.output_logprobs: list[TokenLogprob] = []
        #: An embeddings job's vectors, one per input in order; set by the backend before it
        #: finishes the job (:attr:`GenerationRequest.embed_inputs`).
        self.embeddings: list[list[float]] | None = None
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
        #: Tool calls a backend returned structured (a remote model), set before it finishes the
        #: job; None: the answer's text is all there is (issue 16).
        self.tool_calls: list[ToolCall] | None = None

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

    def emit(self, text: str, logprobs: list[TokenLogprob] | None = None) -> None:
        """Hand one chunk of generated text to the client, now (see :attr:`stream_deltas`: the
        first chunk always goes at once, for the time-to-first-token metric).  ``logprobs``: its
        tokens' log probabilities (tokens whose text is still held back, e.g. by a stop matcher,
        travel with the next chunk)."""
        if logprobs:
            self._pending_logprobs.extend(logprobs)
        if not text:
            return
        lp, self._pending_logprobs = self._pending_logprobs or None, []
        if self.stream_deltas or self._held is None:
            if not self.stream_deltas:
                self._held = []
            self._post(self._deliver, Delta(text, lp))
        else:
            self._held.append(text)
            self._held_logprobs.extend(lp or ())

    def _flush_held(self) -> None:
        lp = self._held_logprobs + self._pending_logprobs
        self._held_logprobs, self._pending_logprobs = [], []
        if self._held or lp:
            self._post(self._deliver, Delta("".join(self._held or ()), lp or None))
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
            if event.text:
                if not self.output:
                    self.t_first_output = time.perf_counter()
                self.output.append(event.text)
            if event.logprobs:
                self.output_logprobs.extend(event.logprobs)
        try:
            self._send.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; the stop flag is already set

    def _complete(self, error: PoolError | None) -> None:
        error = error or self.cancel_error
        try:
            self.t_done = time.perf_counter()
            self.started.set()  # wakes anyone waiting for the job to leave the queue
            if not self.handed_over.is_set():
                self.ended_before_handover = self.t_dispatched is not None
                self.handed_over.set()
            if error is not None:
                self._deliver(Failed(error))
            else:
                assert self.stats is not None
                lp = self.output_logprobs if self.request.logprobs is not None else None
                self._deliver(Done("".join(self.output), self.stats, lp))
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

    def mark_dispatched(self, replica: str, on_release: Callable[[Job], None], *, handover_later: bool = False) -> None:
        """The job goes to ``replica``; ``handover_later``: its backend calls :meth:`hand_over`."""
        self.state = "running"
        self.replica = replica
        self.t_dispatched = time.perf_counter()
        self._on_release = on_release
        self.started.set()
        if not handover_later:
            self.handed_over.set()

    def hand_over(self) -> None:
        """An engine backend sent this job's request to its engine (trio side): its handler may
        start the response now, while the engine works (:attr:`handed_over`)."""
        self.handed_over.set()

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

    # ---------------------------------------------------------------- another replica (issue 18)
    #: Set by the scheduler at the job's first dispatch: ``retry(job, error)`` takes the job back
    #: from its replica to run it once more on another one; True when it did.
    retry: Callable[[Job, PoolError], bool] | None = None

    def retry_elsewhere(self, error: PoolError) -> bool:
        """The backend's attempt failed before any output reached the client: hand the job back
        to its scheduler for one more attempt on another replica (a remote model's other
        endpoint).  True: taken back, and the backend must not end it; False (already retried,
        output already sent, cancelled, no other replica): end it as usual.  Trio thread only."""
        retry, self.retry = self.retry, None
        if retry is None or self.output or self._held or self._ended or self._stop:
            return False
        return retry(self, error)

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
