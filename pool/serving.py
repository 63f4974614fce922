"""The serving layer: one request's path from admission to its job's end, without HTTP.

Every inference route (``/v1/responses``, ``/v1/chat/completions``) starts a job with
:func:`run_job` (the model's admission checks, its queue, ``queue_timeout_s``), takes the result
with :func:`job_result` or drains the job's events into frames (:func:`sse_frame`), and ends with
one inference log line (:func:`log_inference`) whatever happened, including a client that left
(:func:`abandon`, status 499).  Nothing here imports quart or reads a request: the web layer
(:mod:`llm_pool.pool.http`, :mod:`llm_pool.pool.openai_compat`) decodes and encodes around it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import msgspec
import trio

from llm_pool.backends import kind_of
from llm_pool.backends.capabilities import check_capabilities
from llm_pool.backends.decoding import check_decoding, check_seed
from llm_pool.backends.prompts import check_request
from llm_pool.backends.structured import admit as admit_structured
from llm_pool.pool.api import Metrics, build_metrics
from llm_pool.pool.errors import (
    PoolError,
    embeddings_unsupported,
    generation_unsupported,
    invalid_request,
    queue_timeout,
)
from llm_pool.pool.jobs import Delta, Done, GenerationRequest, Job
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.tracing import adopt, mark_outcome_logged

inference_log = logging.getLogger("llm_pool.inference")
_encoder = msgspec.json.Encoder()


def _ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


async def wait_for_dispatch(job: Job, timeout_s: float | None) -> None:
    """Wait until ``job`` leaves its queue (dispatched, or ended there); after ``timeout_s``
    cancel it with 503 ``queue_timeout``."""
    with trio.move_on_after(math.inf if timeout_s is None else timeout_s):
        await job.started.wait()
    if job.state == "queued":
        assert timeout_s is not None
        job.cancel(queue_timeout(job.request.model, timeout_s))


async def run_job(
    manager: PoolManager,
    gen: GenerationRequest,
    *,
    allow_remote: bool,
    request_id: str | None = None,
    decoding_at: str = "$.decoding",
) -> Job:
    """Admit ``gen`` and wait until it leaves its model's queue; every inference route starts here.

    Runs the model's admission checks (a decoding value its runtime refuses is a 400 whose
    ``param`` is under ``decoding_at``, where the route's body keeps those fields), submits the job (404 unknown model, 403 without
    ``allow_remote`` for a remote model, 409/429 from admission; each refusal writes its inference
    log line) and waits at most the model's ``queue_timeout_s``
    (503 ``queue_timeout``).  Returns a job that runs on a replica (or already ended there),
    once its runtime has its request (:attr:`Job.handed_over`: an engine child's request goes
    out before the handler spends ≈1 ms of the event loop on its response head); a job that
    ended in its queue, or before its backend handed it over (an engine backend refused its
    prompt, or its engine is gone), raises its error here, so a stream never starts for it.

    Cancellation: if the caller is cancelled (client gone) or anything raises, the job is
    cancelled: a queued job never runs, a running one stops at its next token.
    """
    job = Job(gen, request_id=request_id)
    job.trace_id = adopt(job.id)  # the caller's X-Request-Id, else this response's id
    job.stream_deltas = gen.stream
    try:
        entry = manager.entry(gen.model)
        request_check(manager, entry, decoding_at)(gen)
        manager.submit(job, allow_remote=allow_remote)
    except PoolError as e:  # refused at admission: logged like every other outcome
        log_inference(job, stream=gen.stream, status=e.status, error=e.code)
        raise
    try:
        await wait_for_dispatch(job, entry.settings.queue_timeout_s)
        if not job.handed_over.is_set():  # (waiting on a set event is one more scheduling round)
            await job.handed_over.wait()
        if job.t_dispatched is None or job.ended_before_handover:  # a status, not a stream
            await job.result()
    except PoolError as e:
        log_inference(job, stream=gen.stream, status=e.status, error=e.code)
        job.cancel()
        raise
    except BaseException:
        abandon(job, stream=gen.stream)
        raise
    return job


async def job_result(job: Job, t0: float) -> tuple[Done, Metrics]:
    """Wait for a non-streamed job's whole result; log it; return it with its metrics
    (``t0``: when the handler started).  Raises the job's :class:`PoolError`.

    Cancellation: cancels the job."""
    try:
        done = await job.result()
    except PoolError as e:
        log_inference(job, stream=False, status=e.status, error=e.code)
        job.cancel()
        raise
    except BaseException:
        abandon(job, stream=False, t0=t0)
        raise
    return done, finished_metrics(job, t0, stream=False)


#: The status an inference log line gives a request whose client went away before its answer
#: ended (nginx's "client closed request"; no client ever receives it).
CLIENT_CLOSED = 499


def abandon(job: Job, *, stream: bool, t0: float | None = None) -> None:
    """The handler of ``job`` ends without having delivered the job's end (its client went away,
    or a bug): cancel the job, and once it has ended (a running job stops at its next token) write
    its inference line, status 499 ``client_closed_request``, with the metrics of what it did.
    Does nothing more for a job whose line was written (``t0``: when the handler started)."""
    job.cancel()
    if job.reported:
        return
    start = job.t_submitted if t0 is None else t0

    def report(job: Job, error: PoolError | None = None) -> None:
        if not job.reported:
            metrics = build_metrics(job, _ms_since(start))
            log_inference(job, stream=stream, status=CLIENT_CLOSED, metrics=metrics, error="client_closed_request")

    if job.state == "done":
        report(job)
    else:
        job.on_end.append(report)


def finished_metrics(job: Job, t0: float, *, stream: bool) -> Metrics:
    """A finished job's metrics (``pool_total_wall_ms`` measured from ``t0``), logged as its
    inference line."""
    metrics = build_metrics(job, _ms_since(t0))
    log_inference(job, stream=stream, status=200, metrics=metrics)
    return metrics


def unix_time_of(t: float) -> int:
    """The Unix time (seconds) of ``time.perf_counter()`` timestamp ``t``."""
    return int(time.time() - (time.perf_counter() - t))


class StreamFrames(Protocol):
    """What one SSE route writes for a job; :func:`stream_job` drives it."""

    def opening(self) -> bytes:
        """The frames before any output (the stream's head)."""
        ...

    def delta(self, event: Delta) -> bytes: ...

    def done(self, event: Done, metrics: Metrics) -> bytes:
        """The frames of a finished job (its metrics are logged by then)."""
        ...

    def failed(self, error: PoolError) -> bytes:
        """The frame of a job that failed after the stream began (its log line is written)."""
        ...

    def closing(self) -> bytes:
        """What follows the last event, whatever it was (``data: [DONE]`` for OpenAI chat)."""
        ...


async def stream_job(
    job: Job, t0: float, frames: StreamFrames, *, head: bool = True, tail: bool = True
) -> AsyncIterator[bytes]:
    """The one stream skeleton of every SSE route: ``frames``' head, then the job's events as
    they come, one write per burst (events already queued go out together); a finished job's
    metrics and a failure are logged here, once.  ``t0``: when the handler started.  ``head`` /
    ``tail`` false leave out the opening / closing frames (:func:`stream_jobs`).

    Cancellation: the job is abandoned in ``finally`` (client gone → it stops at its next token
    and gets its 499 line)."""
    try:
        if head:
            yield frames.opening()
        while batch := await job.next_events():
            out = []
            for event in batch:
                if isinstance(event, Delta):
                    out.append(frames.delta(event))
                elif isinstance(event, Done):
                    out.append(frames.done(event, finished_metrics(job, t0, stream=True)))
                else:
                    e = event.error
                    log_inference(job, stream=True, status=e.status, error=e.code)
                    out.append(frames.failed(e))
            yield b"".join(out)
        if tail:
            yield frames.closing()
    finally:
        abandon(job, stream=True, t0=t0)


# --- n choices (issue 16 §2): one job per choice ---------------------------------------------
async def run_jobs(
    manager: PoolManager, gens: list[GenerationRequest], *, allow_remote: bool, request_ids: list[str], decoding_at: str
) -> list[Job]:
    """:func:`run_job` for each of ``gens`` (the choices of one request; each its own job through
    the queue, fairness and replica slots), in order: the call returns once every job left its
    queue.  A refusal of any cancels the ones already admitted and raises it.

    Cancellation: every job already admitted is cancelled."""
    jobs: list[Job] = []
    try:
        for gen, rid in zip(gens, request_ids, strict=True):
            jobs.append(await run_job(manager, gen, allow_remote=allow_remote, request_id=rid, decoding_at=decoding_at))
    except BaseException:
        for job in jobs:
            abandon(job, stream=gens[0].stream)
        raise
    return jobs


async def stream_jobs(jobs: list[Job], t0: float, frames: list[StreamFrames]) -> AsyncIterator[bytes]:
    """Several jobs' streams as one (the choices of one request): the first's opening, each job's
    events in turn (the others run meanwhile; their events wait in their channels), the last's
    closing.  A failed job ends the stream after its error frame (the rest are cancelled).

    Cancellation: every job is abandoned in ``finally``."""
    try:
        last = len(jobs) - 1
        for i, (job, f) in enumerate(zip(jobs, frames, strict=True)):
            async for chunk in stream_job(job, t0, f, head=i == 0, tail=False):
                yield chunk
            if job.stats is None:  # it failed: its error frame is out
                break
        yield frames[last].closing()
    finally:
        for job in jobs:
            abandon(job, stream=True, t0=t0)


def sse_frame(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


def log_inference(job: Job, *, stream: bool, status: int, metrics: Any = None, error: str | None = None) -> None:
    job.reported = True
    mark_outcome_logged()
    inference_log.info(
        "inference",
        extra={
            "fields": {
                "request_id": job.trace_id,
                "response_id": job.id,
                "model": job.request.model,
                "replica": job.replica,
                "stream": stream,
                "status": status,
                "finish_reason": job.stats.finish_reason if job.stats else None,
                "error": error,
                "metrics": msgspec.to_builtins(metrics) if metrics is not None else None,
            }
        },
    )


def request_check(manager: PoolManager, entry: Any, decoding_at: str) -> Callable[[GenerationRequest], None]:
    """Model-specific admission checks that need no runtime: the decoding values the model's
    runtime accepts (its kind's ``decoding_rules``), and, where the pool renders the prompt, the
    prompt format's needs (e.g. translategemma codes)."""
    model = entry.settings
    kind = kind_of(model)

    def check(gen: GenerationRequest) -> None:
        check_decoding(kind.name, kind.decoding_rules, gen.model, gen.decoding, at=decoding_at)
        check_seed(kind.name, kind.seeded_sampling, gen.model, gen.decoding, at=decoding_at)
        # issue 16 §2: embeddings models serve embeddings only; logprobs where the runtime has them
        embedding_model = bool(getattr(model, "embeddings", False))
        if gen.kind == "embed" and not embedding_model:
            raise embeddings_unsupported(gen.model)
        if gen.kind != "embed" and embedding_model:
            raise generation_unsupported(gen.model)
        if gen.logprobs is not None and not kind.token_logprobs(model):
            raise invalid_request(
                f"model {gen.model!r} ({kind.name}) does not return log probabilities; leave logprobs out",
                param="$.logprobs",
                model=gen.model,
            )
        if not kind.remote:
            check_request(model.prompt_format, gen)
        check_capabilities(model, gen)  # images, thinking, turns (issue 16)
        admit_structured(kind, gen)  # structured output and tool calling (issue 16)

    return check
