"""``X-Request-Id`` crosses to the upstream (issue 19 §2): the caller's id, or the response id,
is sent with the upstream call, so the pool's lines and the upstream's can be joined; over a real
socket the access line names the client's address."""

from __future__ import annotations

import logging

import pytest
import trio
from remote_kit import BOUND, MODEL, StartPool
from support.upstream import FakeUpstream


async def test_the_callers_request_id_is_forwarded_upstream(
    start: StartPool, up: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.client.post(
            "/v1/responses",
            json={"model": MODEL, "input": "hi", "allow_remote": True},
            headers={"X-Request-Id": "caller-7"},
        )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "caller-7"
    assert up.last_request["headers"]["x-request-id"] == "caller-7"
    [access] = [f for rec in caplog.records if rec.name == "llm_pool.access" and (f := rec.fields)["method"] == "POST"]  # type: ignore[attr-defined]
    assert (access["request_id"], access["path"], access["status"], access["client"]) == (
        "caller-7", "/v1/responses", 200, "127.0.0.1"
    )


async def test_without_one_the_response_id_is_forwarded(start: StartPool, up: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.respond(stream=True)
    assert r.status_code == 200, r.text
    rid = r.headers["x-request-id"]
    assert rid.startswith("resp_") and rid in r.text  # the stream's events carry the response id
    assert up.last_request["headers"]["x-request-id"] == rid
