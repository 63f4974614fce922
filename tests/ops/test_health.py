"""Health probes, the status page route, and which operator routes need no token."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio
from ops_kit import MODELS
from support.fake_backend import FakeBackendFactory
from support.server import start_pool
from support.settings import make_settings
from trio.testing import MockClock

from llm_pool.pool.ops import Readiness

ROOT = Path(__file__).resolve().parents[2]


def not_ready(body: dict) -> list[tuple[str, str]]:
    return [(m["model"], m["state"]) for m in body["not_ready"]]


async def test_live_is_always_200(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    control.configure("m", load_gate=trio.Event())  # never set: m stays loading
    ops = await start_pool(nursery, control, models=MODELS, wait=False)
    reply = await ops.get("/health/live")
    assert (reply.status, reply.json) == (200, {"status": "live"})
    assert reply.headers["Cache-Control"] == "no-store"


async def test_readiness_flips_as_models_load(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    control.configure("a", load_delay=5.0).configure("b", load_delay=10.0)
    models = {"a": {}, "b": {}, "spare": {"enabled": False}}
    ops = await start_pool(nursery, control, models=models, wait=False)
    t0 = trio.current_time()

    reply = await ops.get("/health/ready")
    assert reply.status == 503
    assert reply.json["status"] == "not_ready" and reply.json["shutting_down"] is False
    assert not_ready(reply.json) == [("a", "loading"), ("b", "loading")]  # never "spare": not enabled
    assert (await ops.get("/health/ready/a")).status == 503

    await trio.sleep_until(t0 + 6)
    assert ops.manager.entries["a"].state == "loaded"
    reply = await ops.get("/health/ready")
    assert reply.status == 503 and not_ready(reply.json) == [("b", "loading")]
    a = await ops.get("/health/ready/a")
    assert a.status == 200
    assert a.json == {
        "model": "a", "ready": True, "state": "loaded", "enabled": True, "wanted": True, "last_error": None,
    }
    assert (await ops.get("/health/ready/b")).status == 503

    await trio.sleep_until(t0 + 11)
    reply = await ops.get("/health/ready")
    assert (reply.status, reply.json) == (200, {"status": "ready", "shutting_down": False, "not_ready": []})
    msgspec.convert(reply.json, Readiness)

    spare = await ops.get("/health/ready/spare")  # not loaded: not ready, but /health/ready ignores it
    assert spare.status == 503
    assert spare.json == {
        "model": "spare", "ready": False, "state": "unloaded", "enabled": False, "wanted": False, "last_error": None,
    }

    # an admin unload of an enabled model: nobody wants it loaded now, the pool stays ready
    assert (await ops.post("/v1/admin/models/a/unload")).status == 200
    reply = await ops.get("/health/ready")
    assert reply.status == 200 and not_ready(reply.json) == []
    assert (await ops.get("/health/ready/a")).status == 503


async def test_a_failed_model_keeps_the_pool_not_ready(
    autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    control.configure("bad", fail_load="no such file: bad.gguf")
    ops = await start_pool(nursery, control, models={"good": {}, "bad": {}})
    reply = await ops.get("/health/ready")
    assert reply.status == 503
    [row] = reply.json["not_ready"]
    assert (row["model"], row["state"], row["ready"]) == ("bad", "failed", False)
    assert "no such file: bad.gguf" in row["last_error"]
    assert (await ops.get("/health/ready/good")).status == 200


async def test_unknown_model_is_404(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    reply = await ops.get("/health/ready/nope")
    assert reply.status == 404
    assert reply.json["error"]["code"] == "unknown_model" and reply.json["detail"]["model"] == "nope"


async def test_model_names_with_slashes(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    ops = await start_pool(nursery, control, models={"org/model-1": {}})
    reply = await ops.get("/health/ready/org/model-1")
    assert reply.status == 200 and reply.json["model"] == "org/model-1"


async def test_not_ready_while_draining_for_shutdown(
    autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    assert (await ops.get("/health/ready")).status == 200
    replies = []

    async def send() -> None:
        replies.append(await ops.ask("hold"))

    nursery.start_soon(send)
    await ops.wait_until(lambda: control.held == 1)
    async with trio.open_nursery() as stopping:
        stopping.start_soon(ops.manager.shutdown, 30.0)
        await ops.wait_until(lambda: ops.manager.shutting_down)
        reply = await ops.get("/health/ready")
        assert reply.status == 503
        assert reply.json["status"] == "not_ready" and reply.json["shutting_down"] is True
        model = await ops.get("/health/ready/m")
        assert model.status == 503 and model.json["ready"] is False
        assert (await ops.get("/health/live")).status == 200  # still serving the draining request
        assert (await ops.ask("new work")).status == 503
        control.release()  # the running request finishes within the drain
    await ops.wait_until(lambda: bool(replies))
    assert replies[0].status == 200


async def test_status_page_at_root_and_admin(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    page = (ROOT / "admin" / "static" / "index.html").read_bytes()
    for path in ("/", "/admin"):
        reply = await ops.get(path)
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
        assert reply.raw == page


async def test_operator_routes_need_no_token_but_the_apis_do(
    autojump_clock: MockClock, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_POOL_TEST_API_TOKEN", "api-secret")
    monkeypatch.setenv("LLM_POOL_TEST_ADMIN_TOKEN", "admin-secret")
    settings = make_settings(
        {"m": {}}, {"service": {"api_token_env": "LLM_POOL_TEST_API_TOKEN", "admin_token_env": "LLM_POOL_TEST_ADMIN_TOKEN"}}
    )
    ops = await start_pool(nursery, settings=settings)
    # no watchdog: /metrics reads GPUs on a thread, and autojump would leap to its deadline
    for path in ("/metrics", "/health/live", "/health/ready", "/health/ready/m", "/openapi.json", "/", "/admin"):
        assert (await ops.get(path)).status == 200, path
    assert (await ops.get("/v1/models")).status == 401
    assert (await ops.get("/v1/admin/models")).status == 401
    assert (await ops.get("/v1/admin/models", headers={"Authorization": "Bearer admin-secret"})).status == 200
