"""Tracing and accounting (issue 19 §2): ``X-Request-Id`` (the caller's, sanitised; else the
response's id; else a generated one) in the response header and in every log line of its request;
one access line per HTTP request; every refusal logged once and counted by status and code."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
from ops_kit import MODELS, Samples
from support.fake_backend import FakeBackendFactory
from support.replies import Reply
from support.server import Pool, start_pool
from support.settings import make_settings
from trio.testing import MockClock

from llm_pool.pool.logs import json_handler
from llm_pool.pool.tracing import MAX_ID_CHARS, sanitise

GENERATED = re.compile(r"^req_[0-9a-f]{32}$")
Lines = Callable[..., list[dict]]


async def respond(ops: Pool, text: str, *, headers: dict[str, str] | None = None, model: str = "m", **extra: Any) -> Reply:
    return await ops.post("/v1/responses", {"model": model, "input": text, **extra}, headers=headers)


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    """The JSON lines the server writes (its own handler, request-id filter included):
    ``log_lines()`` all of them, ``log_lines("llm_pool.access")`` one logger's."""
    stream = io.StringIO()
    handler = json_handler(stream)
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)

    def read(logger: str | None = None) -> list[dict]:
        out = [json.loads(line) for line in stream.getvalue().splitlines()]
        return [line for line in out if logger is None or line["logger"] == logger]

    try:
        yield read
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)


# --------------------------------------------------------------------------- request ids
def test_a_caller_id_is_kept_without_unsafe_characters_and_cut_at_its_bound() -> None:
    assert sanitise("abc-123_x.y:z/w+v=u@t") == "abc-123_x.y:z/w+v=u@t"
    assert sanitise('a b"c\\d\r\ne\x00f\u00e9') == "abcdef"
    assert sanitise("x" * 300) == "x" * MAX_ID_CHARS
    assert sanitise(" \t\"\"") is None
    assert sanitise(None) is None


async def test_the_callers_id_is_echoed_and_carried_by_its_lines(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, log_lines: Lines
) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    r = await respond(ops, "a b", headers={"X-Request-Id": "trace-42"})
    assert r.status == 200, r.raw
    assert r.headers["X-Request-Id"] == "trace-42"
    [inference] = log_lines("llm_pool.inference")
    assert (inference["request_id"], inference["response_id"]) == ("trace-42", r.json["id"])
    [access] = log_lines("llm_pool.access")
    assert access["request_id"] == "trace-42"


async def test_an_unsafe_caller_id_is_sanitised_before_it_is_echoed_or_logged(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, log_lines: Lines
) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    r = await respond(ops, "a", headers={"X-Request-Id": 'evil" id' + "x" * 200})
    want = ("evilid" + "x" * 200)[:MAX_ID_CHARS]
    assert r.headers["X-Request-Id"] == want
    assert [line["request_id"] for line in log_lines() if line["logger"] != "llm_pool.manager"] == [want, want]
    blank = await respond(ops, "a", headers={"X-Request-Id": '" "'})  # nothing left: the response id
    assert blank.headers["X-Request-Id"] == blank.json["id"]


async def test_without_a_caller_id_the_response_id_is_the_request_id(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, log_lines: Lines
) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    r = await respond(ops, "a b")
    assert r.headers["X-Request-Id"] == r.json["id"]
    chat = await ops.post("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status == 200, chat.raw
    assert chat.headers["X-Request-Id"] == chat.json["id"]
    assert chat.json["id"].startswith("chatcmpl-")
    first, second = log_lines("llm_pool.inference")
    assert (first["request_id"], second["request_id"]) == (r.json["id"], chat.json["id"])


async def test_a_request_without_a_response_gets_a_generated_id_on_all_its_lines(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, log_lines: Lines
) -> None:
    """An admin call: its header, its admin line and its access line share one ``req_`` id."""
    ops = await start_pool(nursery, control, models=MODELS)
    r = await ops.post("/v1/admin/models/m/unload")
    assert r.status == 200, r.raw
    rid = r.headers["X-Request-Id"]
    assert GENERATED.match(rid), rid
    [admin] = log_lines("llm_pool.admin")
    [access] = log_lines("llm_pool.access")
    assert (admin["action"], admin["request_id"], access["request_id"]) == ("unload", rid, rid)
    other = await ops.get("/health/live")
    assert GENERATED.match(other.headers["X-Request-Id"]) and other.headers["X-Request-Id"] != rid


async def test_a_streamed_answer_carries_the_id_in_its_header(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, log_lines: Lines
) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    r = await respond(ops, "a b c", stream=True, headers={"X-Request-Id": "s-1"})
    assert r.status == 200 and r.headers["X-Request-Id"] == "s-1"
    [inference] = log_lines("llm_pool.inference")
    assert (inference["request_id"], inference["stream"]) == ("s-1", True)


# --------------------------------------------------------------------------- access log
async def test_one_access_line_per_request_with_its_facts(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, log_lines: Lines
) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    ok = await respond(ops, "a b c")
    streamed = await respond(ops, "a b c", stream=True)
    missing = await ops.get("/nope")
    lines = log_lines("llm_pool.access")
    assert [(x["method"], x["path"], x["status"], x["bytes"]) for x in lines] == [
        ("POST", "/v1/responses", 200, len(ok.raw)),
        ("POST", "/v1/responses", 200, len(streamed.raw)),
        ("GET", "/nope", 404, len(missing.raw)),
    ]
    for line in lines:
        assert line["event"] == "access" and line["level"] == "info"
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert "client" in line  # the test client has no address (None); hypercorn gives one
    assert [x["request_id"] for x in lines] == [ok.json["id"], streamed.headers["X-Request-Id"], missing.headers["X-Request-Id"]]


async def test_the_access_log_can_be_turned_off(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, log_lines: Lines
) -> None:
    ops = await start_pool(nursery, control, settings=make_settings({"m": {}}, {"service": {"access_log": False}}))
    r = await respond(ops, "a")
    assert r.status == 200 and r.headers["X-Request-Id"] == r.json["id"]
    assert log_lines("llm_pool.access") == []
    assert len(log_lines("llm_pool.inference")) == 1


# --------------------------------------------------------------------------- refusals
async def test_every_refusal_is_logged_once_and_counted_by_status_and_code(
    autojump_clock: MockClock,
    nursery: trio.Nursery,
    control: FakeBackendFactory,
    log_lines: Lines,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMPOOL_TRACE_TOKEN", "s3cret")
    settings = make_settings(
        {"m": {"max_queue": 0}}, {"service": {"api_token_env": "LLMPOOL_TRACE_TOKEN", "max_body_bytes": 300}}
    )
    ops = await start_pool(nursery, control, settings=settings)
    auth = {"Authorization": "Bearer s3cret"}
    before = await Samples.scrape(ops)
    for status, code in ((400, "invalid_request"), (401, "unauthorized"), (404, "not_found"),
                         (404, "unknown_model"), (413, "payload_too_large"), (429, "executor_queue_full")):
        assert before("llm_pool:http_refusals_total", status=str(status), code=code) == 0

    held: list[int] = []

    async def hold() -> None:
        held.append((await respond(ops, "hold", headers=auth)).status)

    nursery.start_soon(hold)
    await ops.wait_until(lambda: control.held == 1)
    replies = {
        "invalid": await ops.post("/v1/responses", {"model": "m"}, headers=auth),
        "unauthorized": await respond(ops, "x"),
        "no_route": await ops.get("/v1/nope", headers=auth),
        "unknown_model": await respond(ops, "x", model="nope", headers=auth),
        "too_large": await respond(ops, "x" * 400, headers=auth),
        "queue_full": await respond(ops, "x", headers=auth),
    }
    control.release()
    await ops.wait_until(lambda: held == [200])
    assert {k: r.status for k, r in replies.items()} == {
        "invalid": 400, "unauthorized": 401, "no_route": 404, "unknown_model": 404, "too_large": 413, "queue_full": 429,
    }
    after = await Samples.scrape(ops)
    for status, code in ((400, "invalid_request"), (401, "unauthorized"), (404, "not_found"),
                         (404, "unknown_model"), (413, "payload_too_large"), (429, "executor_queue_full")):
        assert after("llm_pool:http_refusals_total", status=str(status), code=code) == 1, (status, code)

    # logged once: by a "request refused" line, or by the inference line when admission refused it
    refused = log_lines("llm_pool.http")
    assert [(x["event"], x["method"], x["path"], x["status"], x["code"]) for x in refused] == [
        ("request refused", "POST", "/v1/responses", 400, "invalid_request"),
        ("request refused", "POST", "/v1/responses", 401, "unauthorized"),
        ("request refused", "GET", "/v1/nope", 404, "not_found"),
        ("request refused", "POST", "/v1/responses", 413, "payload_too_large"),
    ]
    assert refused[0]["message"] == "the request needs input (or messages)"
    assert [x["request_id"] for x in refused] == [replies[k].headers["X-Request-Id"] for k in ("invalid", "unauthorized", "no_route", "too_large")]
    inference = [(x["status"], x["error"]) for x in log_lines("llm_pool.inference")]
    assert inference == [(404, "unknown_model"), (429, "executor_queue_full"), (200, None)]
