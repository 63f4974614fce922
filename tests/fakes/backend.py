"""An async test double of the backend protocol (:mod:`backends.base`), for pool runtime tests.

``FakeBackend`` is an *async* backend (``threaded = False``): ``load``, ``serve`` and ``close`` run in
the replica's trio task, so everything runs under trio's autojump ``MockClock`` (no threads, ever).

Each job "generates" a deterministic text: the successor chain of the last character of its input
(``"x"`` → ``"yzabc…"``, non-letters start at ``"a"``), one character per token,
``decoding.max_tokens`` tokens, ``token_delay`` virtual seconds per token.  Per token the fake
sleeps, checks ``job.should_stop()`` (then finishes with ``finish_reason="cancelled"`` and the text
so far), and emits the character.  See :func:`expected_text`.

Knobs: ``capability``, ``token_delay``, ``load_delay``, ``fail_load`` (``load`` raises
``RuntimeError(fail_load)``), ``fail_jobs`` (``{input: token_index}``: that job raises
``RuntimeError("fake failure at token N")`` before emitting token N), ``die_on_input`` (``serve``
dies when it receives a job with that input), :meth:`FakeBackend.kill` (``serve`` dies now, with
``RuntimeError(message)``; its running jobs are abandoned, as a crashed runtime would), and
``on_begin`` (called as ``on_begin(backend, job)`` when a job starts, for invariant checks).

Cancellation by the pool (trio cancels the replica's task, e.g. an unload past its drain): like
the real async backend (backends/openai_compatible.py), every job it holds, running or still in the
inbox, ends with ``job.fail(job.cancel_error)``, or ``finish_reason="cancelled"`` without one.

What the fake saw is recorded for assertions: ``received`` (jobs taken from the inbox, in order),
``begun`` (jobs it started generating), ``outcomes`` (job id → ``"length"``, ``"cancelled"``,
``"failed"``, ``"skipped"`` or ``"abandoned"``), ``tokens_emitted``, ``active`` and
``max_concurrency`` (jobs generating at once), ``over_capability`` (True if it ever ran more jobs
than ``capability``), ``load_calls``, ``loaded``, ``serving``, ``closed``, ``close_calls``.

:class:`FakeBackendFactory` plugs into ``PoolManager(settings, backend_factory=...)``;
:func:`make_settings` builds :class:`config.Settings` from a dict.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping
from typing import Any

import trio

from llm_pool.backends import BackendContext
from llm_pool.config import Settings, decode_settings
from llm_pool.pool.jobs import GenerationStats, Job

LETTERS = string.ascii_lowercase


def expected_text(input_text: str, max_tokens: int) -> str:
    """The text the fake generates for ``input_text`` with ``max_tokens`` tokens."""
    last = input_text[-1:].lower()
    start = LETTERS.index(last) + 1 if last and last in LETTERS else 0
    return "".join(LETTERS[(start + i) % 26] for i in range(max_tokens))


class FakeBackend:
    """See the module docstring."""

    threaded = False

    def __init__(
        self,
        ctx_or_params: BackendContext | Mapping[str, Any] | str | None = None,
        *,
        capability: int = 1,
        token_delay: float = 0.1,
        load_delay: float = 0.0,
        fail_load: str | None = None,
        fail_jobs: Mapping[str, int] | None = None,
        die_on_input: str | None = None,
        on_begin: Callable[[FakeBackend, Job], None] | None = None,
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
        self.ctx = ctx_or_params if isinstance(ctx_or_params, BackendContext) else None
        self.capability = capability
        self.token_delay = token_delay
        self.load_delay = load_delay
        self.fail_load = fail_load
        self.fail_jobs = dict(fail_jobs or {})
        self.die_on_input = die_on_input
        self.on_begin = on_begin
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

    @property
    def name(self) -> str:
        return f"{self.model_name}#{self.replica_index}"

    def __repr__(self) -> str:
        return f"<FakeBackend {self.name} active={self.active}>"

    def describe(self) -> dict[str, object]:
        return {"fake": True, "capability": self.capability}

    # ------------------------------------------------------------------ protocol
    async def load(self) -> None:
        self.load_calls += 1
        if self.load_delay > 0:
            await trio.sleep(self.load_delay)
        else:
            await trio.lowlevel.checkpoint()
        if self.fail_load is not None:
            raise RuntimeError(self.fail_load)
        self.loaded = True

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
                            if self.die_on_input is not None and job.request.input == self.die_on_input:
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
        self.active += 1
        self.max_concurrency = max(self.max_concurrency, self.active)
        if self.active > self.capability:
            self.over_capability = True
        if self.on_begin is not None:
            self.on_begin(self, job)
        outcome = "abandoned"
        emitted = 0
        try:
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
                job.emit(char)
                emitted += 1
                self.tokens_emitted += 1
            outcome = reason
            job.finish(
                GenerationStats(
                    finish_reason=reason,  # type: ignore[arg-type]
                    prompt_tokens=len(job.request.input),
                    output_tokens=emitted,
                )
            )
        except Exception as e:
            outcome = "failed"
            job.fail(e)
        finally:
            if not job.ended and self._death_message is None:
                # cancelled by the pool (the replica's scope), like a real async backend: end it
                # with the pool's cancel error, else as stopped
                outcome = "cancelled"
                self._end_cancelled(job, emitted)
            self.outcomes[job.id] = outcome
            self.active -= 1

    def _end_cancelled(self, job: Job, emitted: int) -> None:
        if job.cancel_error is not None:
            job.fail(job.cancel_error)
        else:
            job.finish(GenerationStats(finish_reason="cancelled", output_tokens=emitted))


class FakeBackendFactory:
    """``backend_factory`` for :class:`pool.manager.PoolManager`: makes a :class:`FakeBackend` per
    replica with ``defaults``, overridden per model (``configure("m", ...)``) and per replica
    (``configure("m", 2, ...)``).  Every backend it made is in ``backends`` (in creation order)."""

    def __init__(self, **defaults: Any) -> None:
        self.defaults = defaults
        self.model_knobs: dict[str, dict[str, Any]] = {}
        self.replica_knobs: dict[tuple[str, int], dict[str, Any]] = {}
        self.backends: list[FakeBackend] = []
        self.contexts: list[BackendContext] = []

    def configure(self, model: str, replica: int | None = None, **knobs: Any) -> FakeBackendFactory:
        if replica is None:
            self.model_knobs.setdefault(model, {}).update(knobs)
        else:
            self.replica_knobs.setdefault((model, replica), {}).update(knobs)
        return self

    def __call__(self, ctx: BackendContext) -> FakeBackend:
        self.contexts.append(ctx)
        return self._make(ctx, ctx.name, ctx.replica_index)

    def for_runtime(self, model: str) -> Callable[[int], FakeBackend]:
        """A ``make_backend`` for :class:`pool.scheduler.ModelRuntime` (no BackendContext)."""
        return lambda index: self._make({"name": model, "replica_index": index}, model, index)

    def _make(self, params: BackendContext | Mapping[str, Any], model: str, index: int) -> FakeBackend:
        knobs = {
            **self.defaults,
            **self.model_knobs.get(model, {}),
            **self.replica_knobs.get((model, index), {}),
        }
        backend = FakeBackend(params, **knobs)
        self.backends.append(backend)
        return backend

    def of(self, model: str) -> list[FakeBackend]:
        """The backends made for ``model``, in creation order (all loads, all resizes)."""
        return [b for b in self.backends if b.model_name == model]

    def live(self, model: str) -> list[FakeBackend]:
        """The backends of ``model`` that loaded and are not closed yet."""
        return [b for b in self.of(model) if b.loaded and not b.closed]


def make_settings(
    models: Mapping[str, Mapping[str, Any]] | None = None,
    raw: Mapping[str, Any] | None = None,
) -> Settings:
    """:class:`config.Settings` from a dict, through the real decoder (validation included).

    ``models`` maps model names to their keys; ``model_path`` defaults to a dummy (the fake never
    reads it) and ``backend`` to gguf.  ``raw`` is a whole settings mapping merged underneath.
    """
    data: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (raw or {}).items()}
    engine = data.setdefault("engine", {})
    engine.setdefault("backend", "gguf")
    all_models = dict(engine.get("models", {}))
    for name, keys in (models or {}).items():
        all_models[name] = {"model_path": "fake-model.gguf", **keys}
    engine["models"] = all_models
    return decode_settings(data, source="test settings")
