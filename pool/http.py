"""The quart-trio app: a thin layer that decodes, calls the pool manager, and encodes.

This module holds the app, its auth and error handlers, and the ``/v1/responses`` route; it
registers the other route modules (:mod:`llm_pool.admin.routes`, :mod:`llm_pool.pool.openai_compat`,
:mod:`llm_pool.pool.ops`, :mod:`llm_pool.pool.openapi`), which import only the layers below
(:mod:`llm_pool.pool.serving`, :mod:`llm_pool.pool.web_io`), never this module.
Routes here own no scheduling logic.  Every failure reaches the client as JSON in both OpenAI's
and llm-pool's shape (see :mod:`pool.errors`); an unexpected exception becomes a logged 500
``internal_error``, which is always a bug.

Every request carries an id (``X-Request-Id``, see :mod:`pool.tracing`): :func:`trace_requests`
opens it around the whole app, echoes it in the response header and writes the access line.
Every refusal (an error answer with a 4xx status) is counted in ``/metrics`` by status and code
and logged once: by its inference line when admission refused it, else by one ``request
refused`` line here.

Cancellation: when a client disconnects, quart-trio cancels the handler; the job is cancelled in a
``finally`` (a queued job never runs, a running one stops at its next token).
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from llm_pool.admin.routes import register_admin
from llm_pool.backends.capabilities import capabilities
from llm_pool.config import Settings
from llm_pool.pool.api import (
    FAIRNESS_KEY_HEADER,
    Metrics,
    ModelCard,
    ModelsList,
    OutputMessage,
    OutputText,
    ResponsesRequest,
    message_id,
    response_body,
    to_generation_request,
)
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Delta, Done, Job
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.observability import PoolMetrics
from llm_pool.pool.openai_compat import register_openai
from llm_pool.pool.openapi import register_openapi
from llm_pool.pool.ops import register_ops
from llm_pool.pool.serving import (
    CLIENT_CLOSED,
    job_result,
    run_job,
    sse_frame,
    stream_job,
    unix_time_of,
)
from llm_pool.pool.tracing import current_id, outcome_logged, request_trace, sanitise
from llm_pool.pool.web_io import error_response, json_response, read_json, sse_response, wants_openai_items

log = logging.getLogger("llm_pool.http")
access_log = logging.getLogger("llm_pool.access")

#: How long an answer waits for the rest of a request body that its route did not read (see
#: ``finish_request_body`` in :func:`create_app`); past it the answer closes the connection.
BODY_DRAIN_S = 2.0


def create_app(manager: PoolManager, settings: Settings) -> QuartTrio:
    app = QuartTrio("llm_pool", static_folder=None)  # no /static route serving the working directory
    app.config["MAX_CONTENT_LENGTH"] = settings.service.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # long SSE streams must not be cut at 60 s
    app.config["BODY_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    app.extensions["llm_pool_manager"] = manager
    app.extensions["llm_pool_settings"] = settings

    _install_guards(app, settings)
    _register_inference(app, manager)
    register_admin(app, manager)
    register_openai(app, manager)
    register_ops(app, manager)
    register_openapi(app)
    app.asgi_app = trace_requests(app.asgi_app, access=settings.service.access_log)  # type: ignore[method-assign]
    return app



def _install_guards(app: QuartTrio, settings: Settings) -> None:
    """Every request's guards: bearer tokens (``/v1/admin`` and ``/v1``), the rest of an unread
    body, and errors as JSON (a 4xx one counted and logged as a refusal; anything unexpected a
    logged 500 ``internal_error``, which is always a bug)."""
    api_token = _token_from_env(settings.service.api_token_env)
    admin_token = _token_from_env(settings.service.admin_token_env)

    def refuse(error: PoolError) -> Response:
        """The answer for ``error``; a 4xx one is a refusal: counted by status and code, and
        logged unless the request's inference line already reports it."""
        if 400 <= error.status < 500:
            metrics: PoolMetrics = app.extensions["llm_pool_metrics"]  # register_ops' (below)
            metrics.refused(error.status, error.code)
            if not outcome_logged():
                log.info(
                    "request refused",
                    extra={
                        "fields": {
                            "method": request.method,
                            "path": request.path,
                            "status": error.status,
                            "code": error.code,
                            "message": error.message,
                        }
                    },
                )
        return error_response(error)

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
            return refuse(
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
        return refuse(error)

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
        return refuse(PoolError(status, codes.get(status, "invalid_request"), message, headers=headers))

    @app.errorhandler(Exception)
    async def on_bug(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path, exc_info=error)
        return error_response(PoolError(500, "internal_error", "internal error (a bug; see the server log)"))


def _register_inference(app: QuartTrio, manager: PoolManager) -> None:
    """``GET /v1/models``, ``GET /v1/models/{id}`` and ``POST /v1/responses``."""
    def card(name: str) -> ModelCard:
        entry = manager.entries[name]
        return ModelCard(id=name, created=int(entry.loaded_at or 0), capabilities=capabilities(entry.settings))

    @app.get("/v1/models")
    async def list_models() -> Response:
        names = manager.loaded_models()
        return json_response(ModelsList(models=names, data=[card(n) for n in names]))

    @app.get("/v1/models/<path:model_id>")
    async def retrieve_model(model_id: str) -> Response:
        """OpenAI's ``models.retrieve``: the card of a model ``/v1/models`` lists, else 404
        (a configured model that is not loaded is not listed either: both answers agree)."""
        entry = manager.entry(model_id)  # 404 unknown_model
        if entry.state != "loaded":
            raise PoolError(
                404,
                "not_found",
                f"model {model_id!r} is {entry.state}, not loaded (GET /v1/models lists the loaded models)",
                model=model_id,
            )
        return json_response(card(model_id))

    @app.post("/v1/responses")
    async def responses() -> Response:
        t0 = time.perf_counter()
        body: ResponsesRequest = await read_json(ResponsesRequest)
        gen = to_generation_request(manager.settings, body, request.headers.get(FAIRNESS_KEY_HEADER))
        job = await run_job(manager, gen, allow_remote=body.allow_remote)
        created_at = unix_time_of(job.t_submitted)
        if not body.stream:
            done, metrics = await job_result(job, t0)
            body_out = response_body(
                job, created_at=created_at, text=done.text, metrics=metrics, openai_items=wants_openai_items()
            )
            return json_response(body_out)
        return sse_response(stream_job(job, t0, ResponsesFrames(job, created_at)))


class ResponsesFrames:
    """``/v1/responses``' stream: llm-pool's events (``response.created``,
    ``response.output_text.delta``, ``response.metrics`` right before the last event, which
    carries ``output_text``; ``error`` on a failure) interleaved with the rest of OpenAI's
    Responses stream, so the openai SDK reads it as typed events.  Every frame but ``error``
    carries llm-pool's ``id``; every frame a ``sequence_number`` from 0.

    The last event is ``response.completed``, or, as OpenAI's own stream does,
    ``response.incomplete`` when ``max_tokens`` cut the answer (``status: incomplete``)."""

    def __init__(self, job: Job, created_at: int) -> None:
        self.job, self.created_at, self.seq = job, created_at, 0
        self.id = job.id
        self.at = {"id": self.id, "item_id": message_id(self.id), "output_index": 0, "content_index": 0}

    def _frame(self, event: str, data: dict[str, Any]) -> bytes:
        out = sse_frame(event, {"type": event, "sequence_number": self.seq, **data})
        self.seq += 1
        return out

    def opening(self) -> bytes:
        rid, snapshot = self.id, response_body(self.job, created_at=self.created_at)
        item = OutputMessage(id=message_id(rid), status="in_progress", content=[])
        return b"".join((
            self._frame("response.created", {"id": rid, "model": self.job.request.model, "object": "response", "response": snapshot}),
            self._frame("response.in_progress", {"id": rid, "response": snapshot}),
            self._frame("response.output_item.added", {"id": rid, "output_index": 0, "item": item}),
            self._frame("response.content_part.added", {**self.at, "part": OutputText(text="")}),
        ))  # fmt: skip

    def delta(self, event: Delta) -> bytes:
        return self._frame("response.output_text.delta", {**self.at, "delta": event.text, "logprobs": []})

    def done(self, event: Done, metrics: Metrics) -> bytes:
        rid = self.id
        final = response_body(self.job, created_at=self.created_at, text=event.text, metrics=metrics)
        item = final.output[0]
        assert isinstance(item, OutputMessage)
        return b"".join((
            self._frame("response.output_text.done", {**self.at, "text": event.text, "logprobs": []}),
            self._frame("response.content_part.done", {**self.at, "part": item.content[0]}),
            self._frame("response.output_item.done", {"id": rid, "output_index": 0, "item": item}),
            self._frame("response.metrics", {"id": rid, "metrics": metrics}),
            self._frame(f"response.{final.status}", {"id": rid, "output_text": event.text, "response": final}),
        ))  # fmt: skip

    def failed(self, error: PoolError) -> bytes:
        return self._frame("error", {"code": error.code, "message": error.message, "param": error.param})

    def closing(self) -> bytes:
        return b""


def trace_requests(asgi: Any, *, access: bool) -> Any:
    """``asgi`` with each HTTP request traced: its ``X-Request-Id`` (the caller's, sanitised; else
    the response's id, or a generated one; see :mod:`pool.tracing`) is current while it is served
    and echoed in the response header, and with ``access`` one ``access`` line is written per
    request: method, path, status (499 when no answer began: the client left first), body bytes,
    duration from arrival to the last body chunk handed to the server, client address.

    The line is written as the last chunk is handed over (so it exists by the time the client
    has the whole answer), or, for a request cut short, in a ``finally`` with what was sent.
    Wraps ``app.asgi_app``, so the test client sees it as hypercorn does."""

    async def traced(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await asgi(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"x-request-id"), None)
        t0 = time.perf_counter()
        status: int | None = None
        sent = 0
        logged = False

        def log_access() -> None:
            nonlocal logged
            logged = True
            client = scope.get("client")
            access_log.info(
                "access",
                extra={
                    "fields": {
                        "request_id": current_id(),
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status if status is not None else CLIENT_CLOSED,
                        "bytes": sent,
                        "duration_ms": round((time.perf_counter() - t0) * 1000.0, 3),
                        "client": client[0] if client else None,
                    }
                },
            )

        async def send_traced(message: Any) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                rid = (current_id() or "").encode()
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", rid)]}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if access and not message.get("more_body", False) and not logged:
                    log_access()
            await send(message)

        with request_trace(sanitise(given)):
            try:
                await asgi(scope, receive, send_traced)
            finally:
                if access and not logged:
                    log_access()

    return traced


def _token_from_env(env: str | None) -> str | None:
    if not env:
        return None
    value = os.environ.get(env, "")
    if not value:
        raise RuntimeError(f"environment variable {env} (named by the settings) is empty or unset")
    return value
