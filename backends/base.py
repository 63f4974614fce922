"""The backend protocol: what a runtime adapter gives the pool, and the loops most adapters share.

A backend instance belongs to exactly one replica.  Two kinds exist:

* **threaded** (GGUF, CT2, ExLlamaV3): ``load()``, ``serve(inbox)`` and ``close()`` all run on the
  replica's one long-lived worker thread, in that order.  ``serve`` takes jobs from ``inbox``
  (blocking ``get`` when idle, ``get_nowait`` between steps when batching) and returns when it
  receives ``None``.  llama.cpp keeps per-thread OpenMP teams, so one thread for the replica's
  whole life is what keeps it fast.
* **async** (remote APIs): ``async load()``, ``async serve(inbox)``, ``async close()`` run in
  the replica's trio task; ``inbox`` is then a trio receive channel.

``capability`` is how many jobs one replica can honestly run at once; the pool uses
``min(target_inflight, capability)``.

An async backend whose engine can die on its own (a supervised child process) raises
:class:`EngineCrashed` from ``serve`` after ending the jobs it ran; the scheduler then closes it
and calls ``load`` again, with backoff, up to ``restart_max_attempts`` times in a row (backend
attributes; a backend without them is never restarted).

Every job taken from the inbox must end with ``job.finish`` or ``job.fail`` (``run_job`` does
that for one-at-a-time backends).  Backend libraries are imported lazily inside the adapter's
``load``, so a machine without them still serves the other models.
"""

from __future__ import annotations

import queue
import time
from typing import TYPE_CHECKING, Protocol

from llm_pool.pool.jobs import GenerationStats, Job

if TYPE_CHECKING:
    from collections.abc import Callable

#: The thread-side inbox of a threaded backend; ``None`` asks ``serve`` to return.
Inbox = queue.SimpleQueue["Job | None"]


class EngineCrashed(Exception):
    """``serve`` ended because the engine died; the message says how (and its last words).

    ``uptime_s`` is how long the engine had served: a long-lived engine starts a new count of
    restart attempts."""

    def __init__(self, message: str, *, uptime_s: float) -> None:
        super().__init__(message)
        self.uptime_s = uptime_s


class Backend(Protocol):
    threaded: bool
    capability: int

    def describe(self) -> dict[str, object]:
        """Facts worth showing an admin (threads, context size, device...)."""
        ...


def run_job(generate: Callable[[Job], GenerationStats], job: Job) -> None:
    """Run one job start to end: skip it if already cancelled, time it, always end it."""
    if job.should_stop():
        job.finish(GenerationStats(finish_reason="cancelled", output_tokens=0))
        return
    job.begin()
    try:
        stats = generate(job)
    except BaseException as e:  # the replica keeps serving; the client gets a 502
        job.fail(e)
        if not isinstance(e, Exception):
            raise
    else:
        job.finish(stats)


class SequentialBackend:
    """Base for threaded backends that run one job at a time: subclasses write ``generate``."""

    threaded = True
    capability = 1

    def serve(self, inbox: Inbox) -> None:
        while (job := inbox.get()) is not None:
            run_job(self.generate, job)

    def generate(self, job: Job) -> GenerationStats:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        return {}


class StreamTimer:
    """Per-job generation timers, as backends report them (milliseconds)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.t_prompt_ready: float | None = None
        self.t_first: float | None = None
        self.tokens = 0

    def prompt_ready(self) -> None:
        self.t_prompt_ready = time.perf_counter()

    def token(self) -> None:
        self.tokens += 1
        if self.t_first is None:
            self.t_first = time.perf_counter()

    def stats(self, *, finish_reason: str, prompt_tokens: int | None) -> GenerationStats:
        end = time.perf_counter()
        start = self.t_prompt_ready or self.t0
        ms = lambda s: round(s * 1000.0, 3)  # noqa: E731
        return GenerationStats(
            finish_reason=finish_reason,  # type: ignore[arg-type]
            prompt_tokens=prompt_tokens,
            output_tokens=self.tokens,
            tokenize_ms=ms(start - self.t0),
            time_to_first_token_ms=ms(self.t_first - start) if self.t_first else None,
            generate_total_ms=ms(end - start),
            decode_after_first_token_ms=ms(end - self.t_first) if self.t_first else None,
        )
