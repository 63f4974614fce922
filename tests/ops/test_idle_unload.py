"""Idle unload (``idle_unload_after_s``), on the autojump clock with the async fake backend.

The timer starts when the model is loaded and again when its last queued or running request
ends; work, a resize or another unload stops it; an admin-loaded model follows the same rule.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import pytest
import trio
import trio.testing
from support.fake_backend import FakeBackendFactory
from support.settings import make_settings
from trio.testing import MockClock

from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Decoding, GenerationRequest, Job, Message
from llm_pool.pool.manager import PoolManager


class Timeline:
    """Every state change of the manager's models, with its virtual time."""

    def __init__(self, manager: PoolManager) -> None:
        self.changes: list[tuple[float, str, str]] = []
        manager.state_hooks.append(lambda entry, before, after: self.changes.append((trio.current_time(), entry.name, after)))

    def at(self, state: str, model: str = "m") -> list[float]:
        return [t for t, name, s in self.changes if name == model and s == state]


async def start(nursery: trio.Nursery, models: dict[str, dict[str, Any]], factory: FakeBackendFactory | None = None) -> tuple[PoolManager, Timeline]:
    manager = PoolManager(make_settings(models), backend_factory=factory or FakeBackendFactory())
    timeline = Timeline(manager)
    await nursery.start(functools.partial(manager.run, autoload=True))
    for entry in manager.entries.values():
        if entry.state == "loading":
            await entry.load_done.wait()
    return manager, timeline


async def wait_state(manager: PoolManager, state: str, model: str = "m") -> float:
    """Wait until ``model`` reaches ``state``; the virtual time it did."""
    entry = manager.entries[model]
    while entry.state != state:
        await entry.activity.wait()
    return trio.current_time()


def idle_tasks(manager: PoolManager) -> list[str]:
    assert manager._nursery is not None
    return sorted(t.name for t in manager._nursery.child_tasks if t.name.startswith("idle unload"))


async def generate(manager: PoolManager, text: str, max_tokens: int) -> float:
    """Submit a request like the HTTP route does and wait for its result; when it ended."""
    job = Job(GenerationRequest(model="m", messages=[Message(role="user", content=text)], decoding=Decoding(max_tokens=max_tokens)))
    manager.submit(job, allow_remote=False)
    await job.result()
    return trio.current_time()


async def test_unloads_after_idle_unload_after_s_without_work(
    autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_pool.manager")
    manager, timeline = await start(nursery, {"m": {"idle_unload_after_s": 10}})
    [loaded_at] = timeline.at("loaded")
    assert idle_tasks(manager) == ["idle unload m"]
    unloaded_at = await wait_state(manager, "unloaded")
    assert timeline.at("unloading") == [loaded_at + 10]
    assert unloaded_at == loaded_at + 10
    [record] = [r for r in caplog.records if r.getMessage() == "idle unload"]
    assert record.fields == {"action": "idle_unload", "model": "m", "idle_unload_after_s": 10.0}  # type: ignore[attr-defined]
    await trio.testing.wait_all_tasks_blocked()
    assert idle_tasks(manager) == []
    with pytest.raises(PoolError) as info:
        manager.submit(Job(GenerationRequest(model="m", messages=[Message(role="user", content="x")])), allow_remote=False)
    assert info.value.code == "model_not_loaded"


async def test_running_and_queued_work_holds_the_timer(
    autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery
) -> None:
    factory = FakeBackendFactory(token_delay=1.0)  # one replica, one job at a time
    manager, timeline = await start(nursery, {"m": {"idle_unload_after_s": 10}}, factory)
    [t0] = timeline.at("loaded")
    await trio.sleep_until(t0 + 5)
    ends: list[float] = []

    async def client(text: str, max_tokens: int) -> None:
        ends.append(await generate(manager, text, max_tokens))

    nursery.start_soon(client, "long", 25)  # runs t0+5 .. t0+30: longer than the idle time
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(client, "queued", 8)  # waits in the queue, then runs t0+30 .. t0+38
    await trio.sleep_until(t0 + 20)
    assert manager.entries["m"].state == "loaded"
    unloaded_at = await wait_state(manager, "unloaded")
    assert ends == [t0 + 30, t0 + 38]
    assert timeline.at("unloading") == [t0 + 48]  # 10 s after the last request ended
    assert unloaded_at == t0 + 48


async def test_each_request_restarts_the_timer(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery) -> None:
    factory = FakeBackendFactory(token_delay=0.5)
    manager, timeline = await start(nursery, {"m": {"idle_unload_after_s": 10}}, factory)
    [t0] = timeline.at("loaded")
    last_end = t0
    for _ in range(4):  # a short request every 9 s keeps it loaded for good
        await trio.sleep_until(last_end + 9)
        last_end = await generate(manager, "x", max_tokens=2)
        assert manager.entries["m"].state == "loaded"
    assert await wait_state(manager, "unloaded") == last_end + 10


async def test_an_admin_loaded_model_unloads_too(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery) -> None:
    manager, timeline = await start(nursery, {"m": {"idle_unload_after_s": 10, "enabled": False, "replica_max": 2}})
    assert manager.entries["m"].state == "unloaded"
    assert idle_tasks(manager) == []
    await trio.sleep(100)
    await manager.load("m", replicas=2)
    [loaded_at] = timeline.at("loaded")
    assert await wait_state(manager, "unloaded") == loaded_at + 10
    # and again on the next load (a fresh timer for a fresh load)
    await trio.sleep(50)
    await manager.load("m")
    assert await wait_state(manager, "unloaded") == timeline.at("loaded")[-1] + 10


async def test_a_resize_holds_the_timer(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery) -> None:
    factory = FakeBackendFactory()
    factory.configure("m", 2, load_delay=30.0)  # the new replica takes 30 s to load
    manager, timeline = await start(nursery, {"m": {"idle_unload_after_s": 10, "replica_max": 2}}, factory)
    [t0] = timeline.at("loaded")
    await trio.sleep_until(t0 + 5)
    await manager.resize("m", 2)
    assert trio.current_time() == t0 + 35
    assert manager.entries["m"].state == "loaded"
    assert await wait_state(manager, "unloaded") == t0 + 45


async def test_the_timer_ends_with_an_admin_unload(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery) -> None:
    manager, timeline = await start(nursery, {"m": {"idle_unload_after_s": 10}})
    [t0] = timeline.at("loaded")
    await trio.sleep_until(t0 + 3)
    await manager.unload("m")
    await trio.testing.wait_all_tasks_blocked()
    assert idle_tasks(manager) == []
    await trio.sleep(100)
    assert timeline.at("unloading") == [t0 + 3]  # only the admin's


async def test_disabled_when_unset(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery) -> None:
    manager, timeline = await start(nursery, {"m": {}, "n": {"idle_unload_after_s": 60}})
    assert idle_tasks(manager) == ["idle unload n"]
    await trio.sleep(10_000)
    assert manager.entries["m"].state == "loaded"
    assert manager.entries["n"].state == "unloaded"
    assert timeline.at("unloading", "m") == []


async def test_shutdown_with_an_idle_timer_running(autojump_clock: MockClock, watchdog: None, nursery: trio.Nursery) -> None:
    manager, _ = await start(nursery, {"m": {"idle_unload_after_s": 10}})
    await trio.sleep(2)
    await manager.shutdown(drain_s=5)
    assert manager.entries["m"].state == "unloaded"
