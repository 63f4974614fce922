"""Retries (only connect errors, 429 and 5xx; only before output; backoff honouring Retry-After;
bounded by remote_timeout_s) and load-time checks (key, health check modes), from outside."""

from __future__ import annotations

import time

import pytest
import trio
from remote_kit import BOUND, KEY_ENV, StartPool
from support.sse import parse_responses_sse
from support.upstream import FakeUpstream


async def test_server_errors_are_retried_then_succeed(start: StartPool, up: FakeUpstream) -> None:
    up.fault, up.fail_times = "500", 2
    with trio.fail_after(BOUND):
        pool = await start(remote_max_retries=2)
        r = await pool.respond()
    assert r.status_code == 200, r.text
    assert r.json()["output_text"] == "Hello from upstream."
    assert len(up.chat_requests) == 3


async def test_retries_are_bounded_by_remote_max_retries(start: StartPool, up: FakeUpstream) -> None:
    up.fault, up.fail_times = "503", 2
    with trio.fail_after(BOUND):
        pool = await start(remote_max_retries=1)
        r = await pool.respond()
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_server_error", r.text
    assert len(up.chat_requests) == 2


async def test_rate_limit_retry_waits_for_retry_after(start: StartPool, up: FakeUpstream) -> None:
    up.fault, up.fail_times, up.retry_after = "429", 1, 0.6
    with trio.fail_after(BOUND):
        pool = await start(remote_max_retries=1)
        t0 = time.monotonic()
        r = await pool.respond()
        elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert len(up.chat_requests) == 2
    assert elapsed >= 0.6


async def test_no_retry_when_retry_after_passes_the_deadline(start: StartPool, up: FakeUpstream) -> None:
    up.fault, up.retry_after = "429", 30
    with trio.fail_after(BOUND * 2):
        pool = await start(remote_max_retries=3, remote_timeout_s=8.0)
        t0 = time.monotonic()
        r = await pool.respond()
    assert time.monotonic() - t0 < 4  # answered at once, not after waiting out the 8 s deadline
    assert r.status_code == 429 and r.json()["error"]["code"] == "upstream_rate_limit", r.text
    assert r.headers["retry-after"] == "30"
    assert len(up.chat_requests) == 1


@pytest.mark.parametrize("fault", ["400", "401", "garbage", "disconnect"])
async def test_no_retry_for_other_failures(start: StartPool, up: FakeUpstream, fault: str) -> None:
    """A refused request (4xx) or one the upstream may have worked on (answer unreadable, or the
    connection lost after sending) is never sent twice."""
    up.fault = fault
    with trio.fail_after(BOUND):
        pool = await start(remote_max_retries=3)
        r = await pool.respond()
    assert r.status_code == 502, r.text
    assert len(up.chat_requests) == 1


async def test_no_retry_once_output_began(start: StartPool, up: FakeUpstream) -> None:
    up.fault = "disconnect"  # streams the first piece, then drops the connection
    with trio.fail_after(BOUND):
        pool = await start(remote_max_retries=3)
        async with pool.client.stream(
            "POST", "/v1/responses", json={"model": "r", "input": "hi", "allow_remote": True, "stream": True}
        ) as s:
            events = parse_responses_sse(await s.aread())
    assert [k for k, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "error",
    ]
    assert events[-2][1]["delta"] == "Hello"
    assert events[-1][1]["code"] == "upstream_connection_error"
    assert len(up.chat_requests) == 1


# ------------------------------------------------------------------ load: key and health checks
async def test_config_only_health_check_makes_no_call(start: StartPool, up: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        pool = await start(remote_health_check="config_only")
        row = await pool.row()
    assert row["runtime_state"] == "loaded"
    assert up.requests == []


async def test_models_endpoint_health_check(start: StartPool, up: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        pool = await start(remote_health_check="models_endpoint")
        row = await pool.row()
    assert row["runtime_state"] == "loaded", row
    [call] = up.requests
    assert (call["method"], call["path"]) == ("GET", "/v1/models")
    assert call["headers"]["authorization"].startswith("Bearer sk-test-")


async def failed_load(start: StartPool, **over: object) -> str:
    with trio.fail_after(BOUND):
        pool = await start(**over)
        row = await pool.row()
    assert row["runtime_state"] == "failed", row
    r = await pool.respond()
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_failed", r.text
    assert isinstance(row["last_error"], str)
    return row["last_error"]


async def test_health_check_failures_fail_the_model_with_the_reason(start: StartPool, up: FakeUpstream) -> None:
    up.fault, up.fault_models = "500", True
    error = await failed_load(start, remote_health_check="models_endpoint")
    assert error == (
        f"health check GET {up.base_url}/models failed: upstream server error (HTTP 500): "
        "The server had an error while processing your request. Sorry about that!"
    )


async def test_health_check_with_a_rejected_key(start: StartPool, up: FakeUpstream) -> None:
    up.api_key = "the-right-key"
    error = await failed_load(start, remote_health_check="models_endpoint")
    assert error == (
        f"health check GET {up.base_url}/models failed: the upstream rejected the API key from "
        f"environment variable {KEY_ENV} (HTTP 401)"
    )


async def test_health_check_timeout(start: StartPool, up: FakeUpstream) -> None:
    up.fault, up.fault_models, up.slow_s = "slow", True, 5.0
    error = await failed_load(start, remote_health_check="models_endpoint", remote_timeout_s=0.3)
    assert error == f"health check GET {up.base_url}/models failed: no answer within 0.3s"


async def test_health_check_unreachable(start: StartPool, up: FakeUpstream) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    error = await failed_load(
        start, remote_health_check="models_endpoint", remote_base_url=f"http://127.0.0.1:{port}/v1"
    )
    assert error.startswith(f"health check GET http://127.0.0.1:{port}/v1/models failed: ConnectError: "), error


@pytest.mark.parametrize("value", [None, "", "   "])
async def test_missing_api_key_fails_the_model(
    start: StartPool, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(KEY_ENV)
    else:
        monkeypatch.setenv(KEY_ENV, value)
    assert await failed_load(start) == f"missing API key environment variable: {KEY_ENV}"


async def test_admin_load_reports_the_missing_key(start: StartPool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with trio.fail_after(BOUND):
        pool = await start(enabled=False)
        r = await pool.client.post("/v1/admin/models/r/load", json={})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "model_load_failed"
    assert r.json()["error"]["message"] == f"model 'r' failed to load: missing API key environment variable: {KEY_ENV}"
