"""Structured JSON logs: one line per inference (request id, model) and per admin action; the
level comes from ``service.log_level``."""

from __future__ import annotations

import json
import logging

import pytest
import trio
from ops_kit import MODELS
from support.fake_backend import FakeBackendFactory
from support.server import start_pool
from trio.testing import MockClock

from llm_pool.pool.logs import JsonFormatter, configure_logging


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[dict]:
    """The records of ``logger`` as the JSON lines the server writes."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == logger]


async def test_one_json_line_per_inference_with_request_id_and_model(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ops = await start_pool(nursery, control, models=MODELS)
    ok = await ops.ask("a b c")
    failed = await ops.ask("fail")
    assert (ok.status, failed.status) == (200, 502)
    first, second = lines(caplog, "llm_pool.inference")
    assert first["event"] == "inference" and first["level"] == "info"
    assert first["request_id"] == ok.json["id"]
    assert (first["model"], first["status"], first["stream"], first["error"]) == ("m", 200, False, None)
    assert first["replica"] == "m#1"
    assert first["metrics"]["engine_output_tokens"] == 3
    assert second["request_id"].startswith("resp_") and second["request_id"] != first["request_id"]
    assert (second["model"], second["status"], second["error"]) == ("m", 502, "backend_error")


async def test_refusals_at_admission_are_logged_too(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A request refused before it reached a queue (404, 429...) still gets its inference line."""
    caplog.set_level(logging.INFO)
    ops = await start_pool(nursery, control, models={"m": {"max_queue": 0}})
    replies = []

    async def hold() -> None:
        replies.append(await ops.ask("hold"))

    nursery.start_soon(hold)
    await ops.wait_until(lambda: control.held == 1)
    full = await ops.ask("x")
    unknown = await ops.ask("x", model="nope")
    assert (full.status, unknown.status) == (429, 404)
    control.release()
    await ops.wait_until(lambda: len(replies) == 1)
    refused, missing, held = lines(caplog, "llm_pool.inference")
    assert (refused["model"], refused["status"], refused["error"], refused["replica"]) == ("m", 429, "executor_queue_full", None)
    assert (missing["model"], missing["status"], missing["error"]) == ("nope", 404, "unknown_model")
    assert refused["request_id"].startswith("resp_") and refused["metrics"] is None
    assert (held["status"], held["error"]) == (200, None)


async def test_a_request_whose_client_left_gets_a_499_line(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Client gone while its request waited in the queue: one line, status 499, never ran."""
    caplog.set_level(logging.INFO)
    ops = await start_pool(nursery, control, models=MODELS)
    replies = []

    async def hold() -> None:
        replies.append(await ops.ask("hold"))

    nursery.start_soon(hold)
    await ops.wait_until(lambda: control.held == 1)
    with trio.move_on_after(1):  # the client gives up while its request is queued
        await ops.ask("queued")
    control.release()
    await ops.wait_until(lambda: len(replies) == 1)
    gone, held = lines(caplog, "llm_pool.inference")
    assert (gone["status"], gone["error"], gone["replica"], gone["stream"]) == (499, "client_closed_request", None, False)
    assert gone["metrics"]["engine_queue_wait_ms"] is None and gone["metrics"]["engine_output_tokens"] is None
    assert gone["metrics"]["pool_total_wall_ms"] >= gone["metrics"]["engine_total_wall_ms"] >= 0
    assert (held["status"], held["request_id"]) == (200, replies[0].json["id"])


async def test_one_json_line_per_admin_action(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    ops = await start_pool(nursery, control, models={"m": {"replica_max": 2}})
    assert (await ops.post("/v1/admin/models/m/replicas", {"replicas": 2})).status == 200
    assert (await ops.post("/v1/admin/models/m/unload")).status == 200
    assert (await ops.post("/v1/admin/models/m/load", {"force": True})).status == 200
    actions = [(line["action"], line["model"]) for line in lines(caplog, "llm_pool.admin")]
    assert actions == [("resize", "m"), ("unload", "m"), ("load", "m")]


def test_the_level_comes_from_the_settings() -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        configure_logging("warning")
        assert root.level == logging.WARNING
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        configure_logging("debug")
        assert root.level == logging.DEBUG
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
