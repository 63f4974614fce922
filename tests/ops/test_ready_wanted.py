"""``/health/ready`` counts the models meant to be serving now (issue 13 §6).

An enabled model is wanted from the start; an admin load wants a model, an admin unload or the
idle timer stops wanting it.  A model nobody wants loaded is no readiness failure (its own
``/health/ready/{model}`` still says it is not loaded); a wanted one that failed still is.
"""

from __future__ import annotations

import trio
from support.fake_backend import FakeBackendFactory
from support.server import start_pool
from trio.testing import MockClock

#: An admin load body that skips the GPU memory check (a worker thread: no autojump with it).
FORCE = {"force": True}


def not_ready(body: dict) -> list[tuple[str, str]]:
    return [(m["model"], m["state"]) for m in body["not_ready"]]


async def test_an_idle_unloaded_model_leaves_the_pool_ready(
    autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control, models={"a": {}, "idle": {"idle_unload_after_s": 10}})
    assert (await ops.get("/health/ready")).status == 200
    entry = ops.manager.entries["idle"]
    while entry.state != "unloaded":
        await entry.activity.wait()
    reply = await ops.get("/health/ready")
    assert (reply.status, reply.json) == (200, {"status": "ready", "shutting_down": False, "not_ready": []})
    one = await ops.get("/health/ready/idle")
    assert one.status == 503
    assert one.json == {
        "model": "idle", "ready": False, "state": "unloaded", "enabled": True, "wanted": False, "last_error": None,
    }


async def test_admin_unload_and_load_decide_what_is_wanted(
    autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control, models={"a": {}, "spare": {"enabled": False}})
    assert (await ops.get("/health/ready")).status == 200
    assert (await ops.post("/v1/admin/models/a/unload")).status == 200
    assert (await ops.get("/health/ready")).status == 200  # nobody wants "a" loaded now
    assert (await ops.get("/health/ready/a")).status == 503

    control.configure("spare", fail_load="no weights")
    assert (await ops.post("/v1/admin/models/spare/load", FORCE)).status == 500
    reply = await ops.get("/health/ready")  # an admin wanted "spare": its failure counts
    assert reply.status == 503 and not_ready(reply.json) == [("spare", "failed")]
    assert reply.json["not_ready"][0]["wanted"] is True

    control.configure("spare", fail_load=None)
    assert (await ops.post("/v1/admin/models/spare/load", FORCE)).status == 200
    assert (await ops.get("/health/ready")).status == 200
    assert (await ops.post("/v1/admin/models/a/load", FORCE)).status == 200
    assert (await ops.get("/health/ready")).status == 200
