"""The one async test double of the backend protocol (:mod:`backends.base`).

:class:`FakeBackend` is an *async* backend (``threaded = False``): ``load``, ``serve`` and
``close`` run in the replica's trio task, so it is safe under trio's autojump ``MockClock`` (no
threads, no sockets, ever).  It generates one of two texts, chosen by the ``text`` knob:

``"chain"`` (the default; the runtime tests)
    the successor chain of the input's last letter (``"x"`` → ``"yzabc…"``, non-letters start at
    ``"a"``), one character per token, exactly ``decoding.max_tokens`` tokens (finish reason
    ``"length"``).  Each token first takes ``token_delay`` seconds, then the stop flag is checked
    (``finish_reason="cancelled"`` with the text so far), then the character is emitted.  See
    :func:`expected_text`.  ``fail_jobs`` (``{input: token_index}``) makes that job raise
    ``RuntimeError("fake failure at token N")`` before emitting token N.

``"echo"`` (the HTTP, OpenAI and operator-surface tests)
    the input itself, one word per chunk (``"a b c"`` → ``"a"``, ``" b"``, ``" c"``), each emitted
    at once and followed by ``token_delay`` seconds, cut at ``decoding.max_tokens`` (``"length"``;
    else ``"stop"``).  Three inputs are directives:

    * ``"wait:<s>"``  one chunk ``"waited"`` after ``s`` seconds (stop flag checked every 10 ms);
    * ``"fail"``       emits ``"partial"``, waits ``token_delay``, raises
      ``RuntimeError("fake backend exploded")``;
    * ``"hold"``       emits ``"held"``, then waits, held by an *event* and never by a timer, until
      the test calls :meth:`FakeBackendFactory.release` (or the stop flag is set: then
      ``"cancelled"``).  ``/metrics`` reads GPUs on a worker thread, during which the autojump
      clock leaps to the next timer: a job held by a sleep could end in the middle of a scrape.

Knobs (``FakeBackendFactory(**defaults)``, ``configure(model, replica, **knobs)``, or
``FakeBackend(ctx, **knobs)``; each is read when it is used, so a test may turn one while the pool
runs): ``text``, ``capability``, ``token_delay``, ``load_delay``, ``load_gate`` (an event each load
waits for), ``fail_load`` (``load`` raises ``RuntimeError(fail_load)``), ``fail_jobs``,
``die_on_input`` (``serve`` dies when it receives a job with that input), ``on_begin`` (called as
``on_begin(backend, job)`` when a job starts), ``handover_gate`` (an event: the backend then
``reports_handover`` like an engine child, and each job calls ``job.hand_over()`` once the gate is
set, before its first token).  :meth:`FakeBackend.kill` makes ``serve`` die now
with ``RuntimeError(message)``; its running jobs are abandoned, as a crashed runtime would.

Cancellation by the pool (trio cancels the replica's task, e.g. an unload past its drain): like
the real async backend (backends/openai_compatible.py), every job it holds, running or still in the
inbox, ends with ``job.fail(job.cancel_error)``, or ``finish_reason="cancelled"`` without one.

What a backend saw: ``received`` (jobs taken from the inbox, in order), ``begun``,
``begin_times``, ``outcomes`` (job id → ``"length"``, ``"stop"``, ``"cancelled"``, ``"failed"``,
``"skipped"`` or ``"abandoned"``), ``tokens_emitted``, ``active`` and ``max_concurrency``,
``over_capability``, ``load_calls``, ``loaded``, ``serving``, ``closed``, ``close_calls``, ``died``.
What every backend of one factory saw, in order: ``backends``, ``contexts``, ``seen`` (requests
begun), ``started`` (their inputs), ``finished`` / ``cancelled`` (inputs whose job finished /
stopped early; ``job_ended`` is set each time, a ``threading.Event`` so a test *thread* can wait),
``loaded`` / ``closed`` (replica names, ``"m#1"``), ``held`` (jobs held right now).
"""

from __future__ import annotations

import re
import string
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

import trio

from llm_pool.backends import BackendContext
from llm_pool.pool.jobs import GenerationRequest, GenerationStats, Job

LETTERS = string.ascii_lowercase
Text = Literal["chain", "echo"]
#: Every knob and its value when neither the backend, its replica, its model nor the factory set it.
KNOBS: dict[str, Any] = {
    "text": "chain",
    "capability": 1,
    "token_delay": 0.1,
    "load_delay": 0.0,
    "load_gate": None,
    "fail_load": None,
    "fail_jobs": {},
    "die_on_input": None,
    "on_begin": None,
    "handover_gate": None,
}
#: How often a ``wait:<s>`` job looks at its stop flag (seconds).
WAIT_POLL_S = 0.01
#: How often a held job looks at its stop flag (a ``threading.Event``: nothing to wait on).
HOLD_POLL_S = 1.0


def expected_text(input_text: str, max_tokens: int) -> str:
    """The ``"chain"`` text the fake generates for ``input_text`` with ``max_tokens`` tokens."""
    last = input_text[-1:].lower()
    start = LETTERS.index(last) + 1 if last and last in LETTERS else 0
    return "".join(LETTERS[(start + i) % 26] for i in range(max_tokens))


def echo_words(input_text: str) -> list[str]:
    """The ``"echo"`` chunks of ``input_text``: its words, each with the blanks before it."""
    return re.findall(r"\s*\S+", input_text) or [input_text]


class FakeBackend:
    """See the module docstring."""

    threaded = False
    crashed = False

    def __init__(
        self,
        ctx_or_params: BackendContext | Mapping[str, Any] | str | None = None,
        factory: FakeBackendFactory | None = None,
        **knobs: Any,
    ) -> None:
        if isinstance(ctx_or_params, BackendContext):
            self.model_name = ctx_or_params.name
            self.replica_index = ctx_or_params.replica_index
        elif isinstance(ctx_or_params, Mapping):
            self.model_name = str(ctx_or_params.get("name", "fake"))
            self.replica_index = int(ctx_or_params.get("replica_index", 1))
        else:
            self.model_name = ctx_or_params or "fake"
            self.replica_index = 1
        unknown = set(knobs) - set(KNOBS)
        assert not unknown, f"unknown fake backend knobs: {sorted(unknown)}"
        self.knobs = knobs  # before any other attribute: see __setattr__
        self.ctx = ctx_or_params if isinstance(ctx_or_params, BackendContext) else None
        self.factory = factory if factory is not None else FakeBackendFactory()
        # what the fake saw
        self.received: list[Job] = []
        self.begun: list[Job] = []
        self.begin_times: dict[str, float] = {}
        self.outcomes: dict[str, str] = {}
        self.tokens_emitted = 0
        self.active = 0
        self.max_concurrency = 0
        self.over_capability = False
        self.load_calls = 0
        self.loaded = False
        self.serving = False
        self.closed = False
        self.close_calls = 0
        self.died: str | None = None
        self._death = trio.Event()
        self._death_message: str | None = None

    def knob(self, name: str) -> Any:
        """The knob's value now: this backend's own, else its replica's, model's, factory's.
        A knob reads and writes as an attribute too (``backend.on_begin = check``)."""
        if name in self.knobs:
            return self.knobs[name]
        return self.factory.knob(self.model_name, self.replica_index, name)

    def __getattr__(self, name: str) -> Any:
        if name in KNOBS:
            return self.knob(name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in KNOBS:
            self.knobs[name] = value
        else:
            object.__setattr__(self, name, value)

    @property
    def name(self) -> str:
        return f"{self.model_name}#{self.replica_index}"

    @property
    def reports_handover(self) -> bool:
        """As an engine backend's: jobs are handed over by the backend (``handover_gate``)."""
        return self.handover_gate is not None

    def __repr__(self) -> str:
        return f"<FakeBackend {self.name} active={self.active}>"

    def describe(self) -> dict[str, object]:
        return {"fake": True, "capability": self.capability}

    # ------------------------------------------------------------------ protocol
    async def load(self) -> None:
        self.load_calls += 1
        delay = self.load_delay
        if delay > 0:
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()
        gate = self.load_gate
        if gate is not None:
            await gate.wait()
        fail_load = self.fail_load
        if fail_load is not None:
            raise RuntimeError(fail_load)
        self.loaded = True
        self.factory.loaded.append(self.name)

    async def serve(self, inbox: trio.MemoryReceiveChannel[Job | None]) -> None:
        """Run jobs from ``inbox`` concurrently; return once it is closed (or sends None) and
        every job ended; raise ``RuntimeError`` when killed."""
        assert self.loaded and not self.closed, "serve() before load() or after close()"
        self.serving = True
        try:
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    async with trio.open_nursery() as jobs:
                        async for job in inbox:
                            if job is None:
                                break
                            self.received.append(job)
                            die_on = self.die_on_input
                            if die_on is not None and job.request.input == die_on:
                                self.kill(f"fake runtime died on input {job.request.input!r}")
                                break
                            jobs.start_soon(self._run_job, job, name=f"{self.name} {job.id}")
                    nursery.cancel_scope.cancel()  # every job ended: serve returns

                nursery.start_soon(reader)
                await self._death.wait()
                nursery.cancel_scope.cancel()  # abandon the running jobs, like a crashed runtime
        finally:
            self.serving = False
            if self._death_message is None:  # cancelled: end what was dispatched but never started
                while True:
                    try:
                        job = inbox.receive_nowait()
                    except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                        break
                    if job is not None:
                        self.received.append(job)
                        self.outcomes[job.id] = "cancelled"
                        self._end_cancelled(job, 0)
        if self._death_message is not None:
            self.died = self._death_message
            raise RuntimeError(self._death_message)

    async def close(self) -> None:
        self.close_calls += 1
        self.closed = True
        self.factory.closed.append(self.name)
        await trio.lowlevel.checkpoint()

    # ------------------------------------------------------------------ knobs
    def kill(self, message: str = "fake runtime died") -> None:
        """Make ``serve`` die now (its running jobs are abandoned, never ended by the fake)."""
        if self._death_message is None:
            self._death_message = message
        self._death.set()

    # ------------------------------------------------------------------ one job
    async def _run_job(self, job: Job) -> None:
        if job.should_stop():  # cancelled between dispatch and start
            self.outcomes[job.id] = "skipped"
            job.finish(GenerationStats(finish_reason="cancelled", output_tokens=0))
            return
        job.begin()
        self.begun.append(job)
        self.begin_times[job.id] = trio.current_time()
        self.factory.seen.append(job.request)
        self.factory.started.append(job.request.input)
        self.active += 1
        self.max_concurrency = max(self.max_concurrency, self.active)
        if self.active > self.capability:
            self.over_capability = True
        on_begin = self.on_begin
        if on_begin is not None:
            on_begin(self, job)
        outcome = "abandoned"
        self._emitted = 0
        try:
            gate = self.handover_gate
            if gate is not None:
                await gate.wait()
                job.hand_over()
            generate = self._chain if self.text == "chain" else self._echo
            stats = await generate(job)
            outcome = stats.finish_reason
            job.finish(stats)
            (self.factory.cancelled if outcome == "cancelled" else self.factory.finished).append(job.request.input)
            self.factory.job_ended.set()
        except Exception as e:
            outcome = "failed"
            job.fail(e)
        finally:
            if not job.ended and self._death_message is None:
                # cancelled by the pool (the replica's scope), like a real async backend: end it
                # with the pool's cancel error, else as stopped
                outcome = "cancelled"
                self._end_cancelled(job, self._emitted)
            self.outcomes[job.id] = outcome
            self.active -= 1

    def _emit(self, job: Job, piece: str) -> None:
        job.emit(piece)
        self._emitted += 1
        self.tokens_emitted += 1

    async def _chain(self, job: Job) -> GenerationStats:
        text = expected_text(job.request.input, job.request.decoding.max_tokens)
        fail_at = self.fail_jobs.get(job.request.input)
        reason = "length"
        for i, char in enumerate(text):
            await trio.sleep(self.token_delay)
            if job.should_stop():
                reason = "cancelled"
                break
            if fail_at == i:
                raise RuntimeError(f"fake failure at token {i}")
            self._emit(job, char)
        return GenerationStats(
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=len(job.request.input),
            output_tokens=self._emitted,
        )

    async def _echo(self, job: Job) -> GenerationStats:
        text = job.request.input
        if text.startswith("wait:"):
            deadline = trio.current_time() + float(text[5:])
            while trio.current_time() < deadline:
                if job.should_stop():
                    return GenerationStats(finish_reason="cancelled", output_tokens=0)
                await trio.sleep(min(WAIT_POLL_S, deadline - trio.current_time()))
            self._emit(job, "waited")
            return GenerationStats(finish_reason="stop", prompt_tokens=1, output_tokens=1)
        if text == "fail":
            self._emit(job, "partial")
            await trio.sleep(self.token_delay)
            raise RuntimeError("fake backend exploded")
        if text == "hold":
            self._emit(job, "held")
            self.factory.held += 1
            try:
                while not self.factory.gate.is_set():
                    if job.should_stop():
                        return GenerationStats(finish_reason="cancelled", prompt_tokens=1, output_tokens=1)
                    with trio.move_on_after(HOLD_POLL_S):  # the stop flag is a threading.Event
                        await self.factory.gate.wait()
            finally:
                self.factory.held -= 1
            return GenerationStats(finish_reason="stop", prompt_tokens=1, output_tokens=1)
        words = echo_words(text)
        limit = job.request.decoding.max_tokens
        reason = "stop"
        for word in words:
            if job.should_stop():
                reason = "cancelled"
                break
            if self._emitted >= limit:
                reason = "length"
                break
            self._emit(job, word)
            await trio.sleep(self.token_delay)
        return GenerationStats(
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=len(words),
            output_tokens=self._emitted,
            tokenize_ms=0.0,
            time_to_first_token_ms=0.0,
            generate_total_ms=1.0,
            decode_after_first_token_ms=1.0,
        )

    def _end_cancelled(self, job: Job, emitted: int) -> None:
        if job.cancel_error is not None:
            job.fail(job.cancel_error)
        else:
            job.finish(GenerationStats(finish_reason="cancelled", output_tokens=emitted))


class FakeBackendFactory:
    """``backend_factory`` for :class:`pool.manager.PoolManager`, and the test's control over
    every fake it makes: knobs as ``defaults``, overridden per model (``configure("m", ...)``) and
    per replica (``configure("m", 2, ...)``), read when used; and what the fakes did (see the
    module docstring).  :meth:`echo` makes the factory of the HTTP tests."""

    def __init__(self, **defaults: Any) -> None:
        unknown = set(defaults) - set(KNOBS)
        assert not unknown, f"unknown fake backend knobs: {sorted(unknown)}"
        self.defaults = defaults
        self.model_knobs: dict[str, dict[str, Any]] = {}
        self.replica_knobs: dict[tuple[str, int], dict[str, Any]] = {}
        self.backends: list[FakeBackend] = []
        self.contexts: list[BackendContext] = []
        #: released by :meth:`release`: ends every ``"hold"`` job (echo text), now and later
        self.gate = trio.Event()
        self.held = 0
        self.seen: list[GenerationRequest] = []
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.job_ended = threading.Event()
        self.loaded: list[str] = []
        self.closed: list[str] = []

    @classmethod
    def echo(cls, **defaults: Any) -> FakeBackendFactory:
        """The echo text, 10 ms after each chunk unless ``defaults`` say otherwise."""
        return cls(**{"text": "echo", "token_delay": 0.01, **defaults})

    def configure(self, model: str | None = None, replica: int | None = None, **knobs: Any) -> FakeBackendFactory:
        """Set knobs for every replica of ``model`` (or one ``replica``), or for all (no model)."""
        unknown = set(knobs) - set(KNOBS)
        assert not unknown, f"unknown fake backend knobs: {sorted(unknown)}"
        if model is None:
            assert replica is None
            self.defaults.update(knobs)
        elif replica is None:
            self.model_knobs.setdefault(model, {}).update(knobs)
        else:
            self.replica_knobs.setdefault((model, replica), {}).update(knobs)
        return self

    def knob(self, model: str, replica: int, name: str) -> Any:
        for layer in (self.replica_knobs.get((model, replica), {}), self.model_knobs.get(model, {}), self.defaults):
            if name in layer:
                return layer[name]
        return KNOBS[name]

    def release(self) -> None:
        """Let every held job (now and later) finish."""
        self.gate.set()

    def __call__(self, ctx: BackendContext) -> FakeBackend:
        self.contexts.append(ctx)
        return self._make(ctx)

    def for_runtime(self, model: str) -> Callable[[int], FakeBackend]:
        """A ``make_backend`` for :class:`pool.scheduler.ModelRuntime` (no BackendContext)."""
        return lambda index: self._make({"name": model, "replica_index": index})

    def _make(self, params: BackendContext | Mapping[str, Any]) -> FakeBackend:
        backend = FakeBackend(params, self)
        self.backends.append(backend)
        return backend

    def of(self, model: str) -> list[FakeBackend]:
        """The backends made for ``model``, in creation order (all loads, all resizes)."""
        return [b for b in self.backends if b.model_name == model]

    def live(self, model: str) -> list[FakeBackend]:
        """The backends of ``model`` that loaded and are not closed yet."""
        return [b for b in self.of(model) if b.loaded and not b.closed]
