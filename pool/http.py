"""The quart-trio app: a thin layer that decodes, calls the pool manager, and encodes.

Routes here own no scheduling logic.  Every failure reaches the client as JSON in both OpenAI's
and llm-pool's shape (see :mod:`pool.errors`); an unexpected exception becomes a logged 500
``internal_error``, which is always a bug.

Cancellation: when a client disconnects, quart-trio cancels the handler; the job is cancelled in a
``finally`` (a queued job never runs, a running one stops at its next token).
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from llm_pool.config import Settings
from llm_pool.pool.api import (
    Metrics,
    ModelCard,
    ModelsList,
    OutputMessage,
    OutputText,
    ResponsesRequest,
    build_metrics,
    decode_body,
    message_id,
    response_body,
    to_generation_request,
)
from llm_pool.pool.errors import PoolError, queue_timeout
from llm_pool.pool.jobs import Delta, Done, GenerationRequest, Job
from llm_pool.pool.manager import PoolManager

log = logging.getLogger("llm_pool.http")
inference_log = logging.getLogger("llm_pool.inference")

_encoder = msgspec.json.Encoder()
JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"
#: How long an answer waits for the rest of a request body that its route did not read (see
#: ``finish_request_body`` in :func:`create_app`); past it the answer closes the connection.
BODY_DRAIN_S = 2.0


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(payload), status=status, content_type=JSON, headers=headers)


def error_response(error: PoolError) -> Response:
    return json_response(error.body(), error.status, error.headers)


def _ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000.0, 3)


async def read_json(kind: type[Any]) -> Any:
    """The request body decoded into ``kind`` (400/413 as :class:`PoolError`)."""
    body = await request.get_data(cache=False)
    assert isinstance(body, bytes)
    return decode_body(body, kind)


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
    (503 ``queue_timeout``).  Returns a job that runs on a replica (or already ended there);
    a job that ended in its queue raises its error here, so a stream never starts for it.

    Cancellation: if the caller is cancelled (client gone) or anything raises, the job is
    cancelled: a queued job never runs, a running one stops at its next token.
    """
    job = Job(gen, request_id=request_id)
    job.stream_deltas = gen.stream
    try:
        entry = manager.entry(gen.model)
        _request_check(manager, entry, decoding_at)(gen)
        manager.submit(job, allow_remote=allow_remote)
    except PoolError as e:  # refused at admission: logged like every other outcome
        log_inference(job, stream=gen.stream, status=e.status, error=e.code)
        raise
    try:
        await wait_for_dispatch(job, entry.settings.queue_timeout_s)
        if job.t_dispatched is None:  # ended in the queue: a status, not a stream
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


def sse_response(frames: AsyncIterator[bytes]) -> Response:
    return Response(
        frames,
        status=200,
        content_type=SSE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def unix_time_of(t: float) -> int:
    """The Unix time (seconds) of ``time.perf_counter()`` timestamp ``t``."""
    return int(time.time() - (time.perf_counter() - t))


def sse_frame(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


def log_inference(job: Job, *, stream: bool, status: int, metrics: Any = None, error: str | None = None) -> None:
    job.reported = True
    inference_log.info(
        "inference",
        extra={
            "fields": {
                "request_id": job.id,
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


def wants_openai_items() -> bool:
    """Whether a non-streamed ``/v1/responses`` body carries OpenAI's message items in ``output``.

    llm-pool's contract is ``"output": [{"type": "output_text", "text": ...}]``; the openai SDKs
    read text only from ``{"type": "message", "content": [...]}`` items.  Both cannot live in one
    item, so the OpenAI shape goes to OpenAI's SDKs (they all send ``X-Stainless-Lang``) and to
    any client sending ``X-LLM-Pool-Output: openai``; ``X-LLM-Pool-Output: llm-pool`` forces the
    llm-pool shape.  Every other key is the same in both.
    """
    choice = request.headers.get("X-LLM-Pool-Output", "").lower()
    if choice in ("openai", "llm-pool"):
        return choice == "openai"
    return "X-Stainless-Lang" in request.headers


def create_app(manager: PoolManager, settings: Settings) -> QuartTrio:
    app = QuartTrio("llm_pool", static_folder=None)  # no /static route serving the working directory
    app.config["MAX_CONTENT_LENGTH"] = settings.service.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # long SSE streams must not be cut at 60 s
    app.config["BODY_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.extensions["llm_pool_manager"] = manager
    app.extensions["llm_pool_settings"] = settings

    api_token = _token_from_env(settings.service.api_token_env)
    admin_token = _token_from_env(settings.service.admin_token_env)

    @app.before_request
    async def authenticate() -> Response | None:
        path = request.path
        if path.startswith("/v1/admin"):
            expected = admin_token
        elif path.startswith("/v1/"):
            expected = api_token
        else:
            return None
        if expected is None:
            return None
        scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
        # the auth scheme is case-insensitive (RFC 9110 §11.1); the token is compared in constant time
        valid = hmac.compare_digest(given.strip().encode(), expected.encode())
        if scheme.lower() != "bearer" or not valid:
            return error_response(
                PoolError(
                    401,
                    "unauthorized",
                    "missing or wrong bearer token (Authorization: Bearer <token>)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            )
        return None

    @app.after_request
    async def finish_request_body(response: Response) -> Response:
        """Receive the rest of the request body before answering, or say ``Connection: close``.

        Some answers never read the body: a 401, a 404 (no route, unknown model), a 405, a GET
        sent a body.  If the body has not fully arrived when such an answer ends, hypercorn
        closes the connection (its HTTP/1.1 cycle cannot restart) after an answer that did not
        say so: a keep-alive client's next request on it fails (``RemoteDisconnected``) without
        knowing whether it was received (found by R4's schemathesis run).  So the rest of the
        body (at most ``max_body_bytes``) is read and dropped here, and the connection stays
        usable; a body over the limit, or not received within ``BODY_DRAIN_S``, is not waited
        for: the answer says ``Connection: close``, as the connection will be closed."""
        drained = False
        with trio.move_on_after(BODY_DRAIN_S):
            try:
                await request.get_data(cache=False)  # returns at once when a route read it all
                drained = True
            except HTTPException:  # 413 (over max_body_bytes) or the body timed out
                pass
        if not drained:
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(PoolError)
    async def on_pool_error(error: PoolError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_error(error: HTTPException) -> Response:
        status = error.code or 400
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        message = {
            404: f"no route for {request.method} {request.path}",
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"request body larger than {settings.service.max_body_bytes} bytes",
        }.get(status, error.description or error.name)
        valid = getattr(error, "valid_methods", None)  # 405 must say what is allowed (RFC 9110)
        headers = {"Allow": ", ".join(sorted(valid))} if status == 405 and valid else None
        return error_response(PoolError(status, codes.get(status, "invalid_request"), message, headers=headers))

    @app.errorhandler(Exception)
    async def on_bug(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path, exc_info=error)
        return error_response(PoolError(500, "internal_error", "internal error (a bug; see the server log)"))

    @app.get("/v1/models")
    async def list_models() -> Response:
        names = manager.loaded_models()
        cards = [ModelCard(id=n, created=int(manager.entries[n].loaded_at or 0)) for n in names]
        return json_response(ModelsList(models=names, data=cards))

    @app.post("/v1/responses")
    async def responses() -> Response:
        t0 = time.perf_counter()
        body: ResponsesRequest = await read_json(ResponsesRequest)
        gen = to_generation_request(manager.settings, body)
        job = await run_job(manager, gen, allow_remote=body.allow_remote)
        created_at = unix_time_of(job.t_submitted)
        if not body.stream:
            done, metrics = await job_result(job, t0)
            body_out = response_body(
                job, created_at=created_at, text=done.text, metrics=metrics, openai_items=wants_openai_items()
            )
            return json_response(body_out)
        return sse_response(_stream_responses(job, t0, created_at))

    async def _stream_responses(job: Job, t0: float, created_at: int) -> AsyncIterator[bytes]:
        """llm-pool's events (``response.created``, ``response.output_text.delta``,
        ``response.metrics`` right before ``response.completed``, which carries ``output_text``;
        ``error`` on a failure) interleaved with the rest of OpenAI's Responses stream, so the
        openai SDK reads it as typed events.  Every frame but ``error`` carries llm-pool's ``id``."""
        seq = 0

        def frame(event: str, data: dict[str, Any]) -> bytes:
            nonlocal seq
            out = sse_frame(event, {"type": event, "sequence_number": seq, **data})
            seq += 1
            return out

        rid = job.id
        at = {"id": rid, "item_id": message_id(rid), "output_index": 0, "content_index": 0}
        try:
            snapshot = response_body(job, created_at=created_at)
            yield frame("response.created", {"id": rid, "model": job.request.model, "object": "response", "response": snapshot})
            yield frame("response.in_progress", {"id": rid, "response": snapshot})
            item = OutputMessage(id=message_id(rid), status="in_progress", content=[])
            yield frame("response.output_item.added", {"id": rid, "output_index": 0, "item": item})
            yield frame("response.content_part.added", {**at, "part": OutputText(text="")})

            def frames(event: Any) -> list[bytes]:
                if isinstance(event, Delta):
                    return [frame("response.output_text.delta", {**at, "delta": event.text, "logprobs": []})]
                if isinstance(event, Done):
                    metrics = finished_metrics(job, t0, stream=True)
                    final = response_body(job, created_at=created_at, text=event.text, metrics=metrics)
                    item = final.output[0]
                    assert isinstance(item, OutputMessage)
                    return [
                        frame("response.output_text.done", {**at, "text": event.text, "logprobs": []}),
                        frame("response.content_part.done", {**at, "part": item.content[0]}),
                        frame("response.output_item.done", {"id": rid, "output_index": 0, "item": item}),
                        frame("response.metrics", {"id": rid, "metrics": metrics}),
                        frame("response.completed", {"id": rid, "output_text": event.text, "response": final}),
                    ]
                e = event.error
                log_inference(job, stream=True, status=e.status, error=e.code)
                return [frame("error", {"code": e.code, "message": e.message, "param": e.param})]

            # one write per burst: events already queued go out together, one frame per event
            while batch := await job.next_events():
                yield b"".join(f for event in batch for f in frames(event))
        finally:
            abandon(job, stream=True, t0=t0)

    from llm_pool.admin.routes import register_admin
    from llm_pool.pool.openai_compat import register_openai
    from llm_pool.pool.ops import register_ops

    register_admin(app, manager)
    register_openai(app, manager)
    register_ops(app, manager)
    return app


def _request_check(manager: PoolManager, entry: Any, decoding_at: str) -> Any:
    """Model-specific admission checks that need no runtime: the decoding values the model's
    runtime accepts (:mod:`backends.decoding`), and the prompt format's needs (e.g.
    translategemma codes)."""
    from llm_pool.backends.decoding import check_decoding
    from llm_pool.backends.prompts import check_request

    backend = manager.backend_of(entry)
    fmt = entry.settings.prompt_format

    def check(gen: GenerationRequest) -> None:
        check_decoding(backend, gen.model, gen.decoding, at=decoding_at)
        if backend != "openai_compatible":
            check_request(fmt, gen)

    return check


def _token_from_env(env: str | None) -> str | None:
    if not env:
        return None
    value = os.environ.get(env, "")
    if not value:
        raise RuntimeError(f"environment variable {env} (named by the settings) is empty or unset")
    return value
