"""Unit tests of the remote backend's mapping, one job at a time against ``httpx.MockTransport``
(no sockets): error statuses and bodies, transport errors, odd streams, Retry-After."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
from remote_kit import KEY, KEY_ENV

from llm_pool.backends import BackendContext
from llm_pool.backends.openai_compatible import RemoteBackend, retry_after_s, upstream_message
from llm_pool.config import RemoteModel, Settings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Done, GenerationRequest, Job, Message

Handler = Callable[[httpx.Request], httpx.Response]


async def run_job(handler: Handler, *, stream: bool = False, **model: Any) -> Done:
    settings = RemoteModel(
        remote_base_url="http://upstream.test/v1",
        remote_api_key_env=KEY_ENV,
        remote_model="m",
        **model,
    )
    ctx = BackendContext(
        name="r", replica_index=1, replicas=1, model=settings, settings=Settings(), kind="openai_compatible"
    )
    backend = RemoteBackend(ctx)
    await backend.load()
    await backend.close()
    backend._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    try:
        job = Job(GenerationRequest(model="r", messages=[Message(role="user", content="hi")], stream=stream))
        with trio.fail_after(5):
            await backend._run_job(job)
            return await job.result()
    finally:
        await backend.close()


async def error_of(handler: Handler, **kw: Any) -> PoolError:
    with pytest.raises(PoolError) as info:
        await run_job(handler, **kw)
    return info.value


def reply(status: int, body: Any = None, *, text: str | None = None, headers: dict[str, str] | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        if text is not None:
            return httpx.Response(status, text=text, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


@pytest.mark.parametrize(
    ("handler", "status", "code", "message"),
    [
        (
            reply(404, {"error": {"message": "The model `m` does not exist"}}),
            502,
            "upstream_invalid_request",
            "the upstream rejected the request (HTTP 404): The model `m` does not exist",
        ),
        (
            reply(422, {"error": "messages: field required"}),
            502,
            "upstream_invalid_request",
            "the upstream rejected the request (HTTP 422): messages: field required",
        ),
        (
            reply(409, {"message": "conflict"}),
            502,
            "upstream_invalid_request",
            "the upstream rejected the request (HTTP 409): conflict",
        ),
        (
            reply(413, text="Request\n  Entity Too Large"),
            502,
            "upstream_invalid_request",
            "the upstream rejected the request (HTTP 413): Request Entity Too Large",
        ),
        (
            reply(400, text=""),
            502,
            "upstream_invalid_request",
            "the upstream rejected the request (HTTP 400): (no message)",
        ),
        (
            reply(400, {"error": {"message": f"bad key {KEY}"}}),
            502,
            "upstream_invalid_request",
            "the upstream rejected the request (HTTP 400): bad key [redacted]",
        ),
        (
            reply(502, text="<html>Bad Gateway</html>"),
            502,
            "upstream_server_error",
            "upstream server error (HTTP 502): <html>Bad Gateway</html>",
        ),
        (
            reply(504, {"error": {"message": "gateway timeout"}}),
            502,
            "upstream_server_error",
            "upstream server error (HTTP 504): gateway timeout",
        ),
        (
            reply(301, text="", headers={"location": "http://elsewhere/"}),
            502,
            "upstream_response_parse_failure",
            "unexpected HTTP status 301 from the upstream",
        ),
        (reply(200, [1, 2]), 502, "upstream_response_parse_failure", "the upstream's answer is not a JSON object"),
        (
            reply(200, {"choices": [{"message": {"content": 42}}]}),
            502,
            "upstream_response_parse_failure",
            "the upstream returned non-text content (a JSON int, not a string)",
        ),
        (
            reply(200, {"choices": [{"message": {"content": None, "refusal": "no"}}]}),
            502,
            "upstream_response_parse_failure",
            "the upstream returned no text content (refusal)",
        ),
    ],
)
async def test_status_and_body_mapping(handler: Handler, status: int, code: str, message: str) -> None:
    error = await error_of(handler)
    assert (error.status, error.code, error.message, error.model) == (status, code, message, "r")


def raising(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


async def test_transport_errors() -> None:
    error = await error_of(raising(httpx.ReadTimeout("timed out")), remote_timeout_s=2.5)
    assert (error.status, error.code, error.message) == (
        504,
        "upstream_timeout",
        "the upstream did not answer within 2.5s (remote_timeout_s)",
    )
    error = await error_of(raising(httpx.ConnectTimeout("timed out")))
    assert (error.status, error.code) == (504, "upstream_timeout")
    error = await error_of(raising(httpx.ConnectError("[Errno 111] Connection refused")))
    assert (error.status, error.code, error.message) == (
        502,
        "upstream_connection_error",
        "cannot connect to the upstream at http://upstream.test/v1: ConnectError: [Errno 111] Connection refused",
    )


async def test_connect_errors_are_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused")
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]})

    done = await run_job(handler, remote_max_retries=1)
    assert done.text == "ok" and len(calls) == 2
    assert done.stats.prompt_tokens is None  # no usage given


def sse_body(*events: Any, done: bool = True) -> str:
    frames = [f"data: {json.dumps(e)}\n\n" for e in events]
    return "".join(frames) + ("data: [DONE]\n\n" if done else "")


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def streaming(body: str) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        sent = json.loads(request.content)
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    return handler


async def test_stream_variants() -> None:
    # usage on the last content chunk, ": keep-alive" comments and "event:" lines ignored
    body = ": keep-alive\n\nevent: message\n" + sse_body(
        chunk("Hi"), chunk(" there", "length", usage={"prompt_tokens": 5, "completion_tokens": 2})
    )
    done = await run_job(streaming(body), stream=True)
    assert done.text == "Hi there"
    assert (done.stats.finish_reason, done.stats.prompt_tokens, done.stats.output_tokens) == ("length", 5, 2)
    # no [DONE] but a finish reason: complete
    done = await run_job(streaming(sse_body(chunk("ok"), chunk(None, "stop"), done=False)), stream=True)
    assert done.text == "ok"
    # neither: cut short
    error = await error_of(streaming(sse_body(chunk("par"), done=False)), stream=True)
    assert (error.code, error.message) == (
        "upstream_connection_error",
        "the upstream at http://upstream.test/v1 ended the stream before it finished",
    )
    # an error event in the middle of the stream
    error = await error_of(streaming(sse_body(chunk("a"), {"error": {"message": "overloaded"}})), stream=True)
    assert (error.code, error.message) == ("upstream_server_error", "the upstream failed mid-stream: overloaded")
    # a chunk that is JSON but not an object
    error = await error_of(streaming(sse_body([1])), stream=True)
    assert (error.code, error.message) == (
        "upstream_response_parse_failure",
        "the upstream sent a stream event that is not a JSON object",
    )


def test_retry_after_forms() -> None:
    assert retry_after_s("3") == 3.0
    assert retry_after_s("0.25") == 0.25
    assert retry_after_s("-4") == 0.0
    assert retry_after_s(None) is None
    assert retry_after_s("soon") is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (retry_after_s(date) or 0) <= 30


def test_upstream_message_is_quoted_short_and_redacted() -> None:
    long = "x" * 1000
    assert len(upstream_message(long.encode(), KEY)) == 300
    assert upstream_message(json.dumps({"error": {"message": f"key {KEY} bad"}}).encode(), KEY) == "key [redacted] bad"
    assert upstream_message(b"", KEY) == "(no message)"
