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

from config import Settings
from pool.api import (
    ModelsList,
    OutputText,
    ResponseBody,
    ResponsesRequest,
    build_metrics,
    decode_body,
    to_generation_request,
)
from pool.errors import PoolError, queue_timeout
from pool.jobs import Delta, Done, Failed, Job
from pool.manager import PoolManager

log = logging.getLogger("llm_pool.http")
inference_log = logging.getLogger("llm_pool.inference")

_encoder = msgspec.json.Encoder()
JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"


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


def sse_frame(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _encoder.encode(data) + b"\n\n"


def log_inference(job: Job, *, stream: bool, status: int, metrics: Any = None, error: str | None = None) -> None:
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


def create_app(manager: PoolManager, settings: Settings) -> QuartTrio:
    app = QuartTrio("llm_pool")
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
        return json_response(ModelsList(models=manager.loaded_models()))

    @app.post("/v1/responses")
    async def responses() -> Response:
        t0 = time.perf_counter()
        body: ResponsesRequest = await read_json(ResponsesRequest)
        gen = to_generation_request(manager.settings, body)
        entry = manager.entry(gen.model)
        check = _request_check(manager, entry)
        if check is not None:
            check(gen)
        job = Job(gen)
        manager.submit(job, allow_remote=body.allow_remote)
        try:
            await wait_for_dispatch(job, entry.settings.queue_timeout_s)
            if not body.stream:
                try:
                    done = await job.result()
                except PoolError as e:
                    log_inference(job, stream=False, status=e.status, error=e.code)
                    raise
                metrics = build_metrics(job, _ms_since(t0))
                log_inference(job, stream=False, status=200, metrics=metrics)
                return json_response(
                    ResponseBody(
                        id=job.id,
                        model=gen.model,
                        output=[OutputText(text=done.text)],
                        output_text=done.text,
                        metrics=metrics,
                    )
                )
            if job.t_dispatched is None:  # ended in the queue: a status, not a stream
                await job.result()
        except BaseException:
            job.cancel()
            raise
        return Response(
            _stream_responses(job, t0),
            status=200,
            content_type=SSE,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream_responses(job: Job, t0: float) -> AsyncIterator[bytes]:
        seq = 0

        def frame(event: str, data: dict[str, Any]) -> bytes:
            nonlocal seq
            out = sse_frame(event, {"type": event, "sequence_number": seq, **data})
            seq += 1
            return out

        model = job.request.model
        try:
            yield frame("response.created", {"id": job.id, "model": model, "object": "response"})
            async for event in job.events():
                if isinstance(event, Delta):
                    yield frame("response.output_text.delta", {"id": job.id, "delta": event.text})
                elif isinstance(event, Done):
                    metrics = build_metrics(job, _ms_since(t0))
                    log_inference(job, stream=True, status=200, metrics=metrics)
                    yield frame("response.metrics", {"id": job.id, "metrics": msgspec.to_builtins(metrics)})
                    yield frame("response.completed", {"id": job.id, "output_text": event.text})
                elif isinstance(event, Failed):
                    e = event.error
                    log_inference(job, stream=True, status=e.status, error=e.code)
                    yield frame("error", {"code": e.code, "message": e.message, "param": e.param})
        finally:
            job.cancel()

    from admin.routes import register_admin

    register_admin(app, manager)
    return app


def _request_check(manager: PoolManager, entry: Any) -> Any:
    """Model-specific admission checks that need no runtime (e.g. translategemma codes)."""
    from backends.prompts import check_request

    if manager.backend_of(entry) == "openai_compatible":
        return None
    fmt = entry.settings.prompt_format
    return lambda gen: check_request(fmt, gen)


def _token_from_env(env: str | None) -> str | None:
    if not env:
        return None
    value = os.environ.get(env, "")
    if not value:
        raise RuntimeError(f"environment variable {env} (named by the settings) is empty or unset")
    return value
