"""Load on demand and the pool's loaded-model budget (pool/manager.py), on the async
FakeBackend in virtual time (autojump clock)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from pool_harness import Clients, check_ok, record_states, submit
from support.fake_backend import FakeBackendFactory
from support.runtime import make_job, running_manager
from support.settings import make_settings

from llm_pool.pool.errors import PoolError

M = {"model_path": "fake-model.gguf", "load_on_demand": True}


async def test_requests_for_an_unloaded_model_wait_for_one_load(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0, load_delay=5.0)
    settings = make_settings({"m": {**M, "enabled": False, "target_inflight": 1}})
    async with running_manager(settings, factory) as (manager, nursery):
        states = record_states(manager)
        clients = Clients(nursery)
        t0 = trio.current_time()
        jobs = [submit(manager, clients, "m", c, 2) for c in "abc"]
        assert manager.entry("m").state == "loading"
        await clients.wait_idle()
        for job in jobs:
            check_ok(clients.outcome(job), 2)
        assert [clients.outcome(j).ended_at - t0 for j in jobs] == [7.0, 9.0, 11.0]  # load, then FIFO
        assert len(factory.of("m")) == 1  # one load for the three requests
        assert states == [("m", "unloaded", "loading"), ("m", "loading", "loaded")]
        clients.assert_all_ended_once()


async def test_a_failed_load_on_demand_fails_its_waiting_requests(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0, load_delay=1.0, fail_load="weights missing")
    async with running_manager(make_settings({"m": {**M, "enabled": False}}), factory) as (manager, nursery):
        clients = Clients(nursery)
        jobs = [submit(manager, clients, "m", c, 2) for c in "ab"]
        await clients.wait_idle()
        for job in jobs:
            e = clients.outcome(job).error
            assert (e.status, e.code, e.message) == (502, "backend_error", "model 'm' failed: load on demand failed: weights missing")
        assert manager.entry("m").state == "failed"
        factory.configure("m", fail_load=None)
        again = submit(manager, clients, "m", "c", 1)  # a failed model loads again on demand
        await clients.wait_idle()
        check_ok(clients.outcome(again), 1)


async def test_queue_timeout_applies_while_the_model_loads(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0, load_delay=10.0)
    async with running_manager(make_settings({"m": {**M, "enabled": False}}), factory) as (manager, nursery):
        clients = Clients(nursery)
        late = submit(manager, clients, "m", "a", 1, queue_timeout=3.0)
        patient = submit(manager, clients, "m", "b", 1)
        await clients.wait_idle()
        assert clients.outcome(late).error.message == "request waited more than 3s in model 'm''s queue"
        check_ok(clients.outcome(patient), 1)
        assert manager.entry("m").on_demand == []


async def test_max_loaded_models_evicts_the_least_recently_used_idle_model(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings({"a": M, "b": M, "c": {**M, "enabled": False}}, {"engine": {"max_loaded_models": 2}})
    async with running_manager(settings, factory, autoload=True) as (manager, nursery):
        for name in "ab":
            await manager.entry(name).load_done.wait()
        clients = Clients(nursery)
        check_ok(await clients.request(_admitted(manager, "b", "x")), 1)
        await trio.sleep(1)  # a was used least recently
        job = submit(manager, clients, "c", "y", 1)
        await clients.wait_idle()
        check_ok(clients.outcome(job), 1)
        assert [manager.entry(n).state for n in "abc"] == ["unloaded", "loaded", "loaded"]


async def test_no_idle_model_to_evict_is_503_with_retry_after(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings({"a": M, "c": {**M, "enabled": False}}, {"engine": {"max_loaded_models": 1}})
    async with running_manager(settings, factory, autoload=True) as (manager, nursery):
        await manager.entry("a").load_done.wait()
        clients = Clients(nursery)
        busy = submit(manager, clients, "a", "x", 5)
        with pytest.raises(PoolError) as e:
            manager.submit(make_job("c", "y"), allow_remote=False)
        assert (e.value.status, e.value.code, e.value.headers) == (503, "pool_capacity_exhausted", {"Retry-After": "5"})
        assert e.value.message == (
            "model 'c' cannot be loaded now: engine.max_loaded_models=1 models are loaded and none of them is idle; "
            "retry later"
        )
        assert manager.entry("c").state == "unloaded"
        await clients.wait_idle()
        check_ok(clients.outcome(busy), 5)


async def test_memory_budget_uses_the_estimates(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings(
        {"a": M, "b": M, "c": {**M, "enabled": False}}, {"engine": {"max_loaded_memory_mib": 1000}}
    )
    async with running_manager(settings, factory, autoload=True) as (manager, nursery):
        for name in "ab":
            await manager.entry(name).load_done.wait()
        for name, mib in (("a", 300.0), ("b", 300.0), ("c", 600.0)):
            manager.entry(name).observed_vram_mib = mib
            manager.entry(name).last_used = {"a": 2.0, "b": 1.0, "c": 0.0}[name]
        assert [e.name for e in manager.evictions_for(manager.entry("c"))] == ["b"]  # 300 + 600 fits
        manager.entry("c").observed_vram_mib = 900.0
        assert [e.name for e in manager.evictions_for(manager.entry("c"))] == ["b", "a"]
        manager.entry("c").observed_vram_mib = 1200.0
        with pytest.raises(PoolError, match=r"^model 'c' cannot be loaded now: about 1200 MiB would be loaded, over "
                           r"engine.max_loaded_memory_mib=1000 and none of them is idle; retry later$"):
            manager.evictions_for(manager.entry("c"))


async def test_groups_keep_only_models_sharing_a_group(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings(
        {"a": M, "c": M, "b": {**M, "enabled": False}}, {"engine": {"groups": {"chat": ["a", "b"]}}}
    )
    async with running_manager(settings, factory, autoload=True) as (manager, nursery):
        for name in "ac":
            await manager.entry(name).load_done.wait()
        clients = Clients(nursery)
        job = submit(manager, clients, "b", "y", 1)
        await clients.wait_idle()
        check_ok(clients.outcome(job), 1)
        assert [manager.entry(n).state for n in "abc"] == ["loaded", "loaded", "unloaded"]


async def test_idle_countdown_is_visible(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings({"m": {**M, "enabled": False, "idle_unload_after_s": 30.0}})
    async with running_manager(settings, factory) as (manager, nursery):
        clients = Clients(nursery)
        check_ok(await clients.request(_admitted(manager, "m", "a")), 1)
        entry = manager.entry("m")
        await trio.sleep(10)
        assert entry.idle_deadline is not None and entry.idle_deadline - trio.current_time() == pytest.approx(20.0)
        await trio.sleep(21)
        assert (entry.state, entry.idle_deadline) == ("unloaded", None)
        again = submit(manager, clients, "m", "b", 1)  # keep-alive: the next request loads it again
        await clients.wait_idle()
        check_ok(clients.outcome(again), 1)


async def test_an_admin_load_keeps_the_budget_too(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings(
        {"a": M, "b": M, "c": {**M, "enabled": False}, "d": {**M, "enabled": False}}, {"engine": {"max_loaded_models": 2}}
    )
    async with running_manager(settings, factory, autoload=True) as (manager, nursery):
        for name in "ab":
            await manager.entry(name).load_done.wait()
        clients = Clients(nursery)
        check_ok(await clients.request(_admitted(manager, "b", "x")), 1)
        await trio.sleep(1)  # a was used least recently
        await manager.load("c")
        assert [manager.entry(n).state for n in "abc"] == ["unloaded", "loaded", "loaded"]
        busy = [submit(manager, clients, n, "y", 5) for n in "bc"]
        with pytest.raises(PoolError) as e:
            await manager.load("d")  # b and c both have work: nothing to evict
        assert (e.value.status, e.value.code) == (503, "pool_capacity_exhausted")
        assert e.value.message == (
            "model 'd' cannot be loaded now: engine.max_loaded_models=2 models are loaded and none of them is idle; "
            "retry later"
        )
        assert (manager.entry("d").state, manager.entry("d").wanted) == ("unloaded", False)
        await clients.wait_idle()
        for job in busy:
            check_ok(clients.outcome(job), 5)


async def test_a_model_that_gets_a_request_before_its_eviction_is_not_evicted(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings({"a": M, "b": M, "c": {**M, "enabled": False}}, {"engine": {"max_loaded_models": 2}})
    async with running_manager(settings, factory, autoload=True) as (manager, nursery):
        for name in "ab":
            await manager.entry(name).load_done.wait()
        clients = Clients(nursery)
        check_ok(await clients.request(_admitted(manager, "b", "x")), 1)
        await trio.sleep(1)  # a is the least recently used: the victim when c's load begins...
        cold = submit(manager, clients, "c", "y", 1)
        late = submit(manager, clients, "a", "z", 3)  # ...but a request reaches a before the unload runs
        await clients.wait_idle()
        check_ok(clients.outcome(late), 3)
        check_ok(clients.outcome(cold), 1)
        assert [manager.entry(n).state for n in "abc"] == ["loaded", "unloaded", "loaded"]


async def test_a_load_refused_after_it_began_answers_its_waiters_503(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings({"a": M, "c": {**M, "enabled": False}}, {"engine": {"max_loaded_models": 1}})
    async with running_manager(settings, factory, autoload=True) as (manager, nursery):
        await manager.entry("a").load_done.wait()
        clients = Clients(nursery)
        cold = submit(manager, clients, "c", "y", 1)  # a is idle now: c's load begins...
        late = submit(manager, clients, "a", "z", 3)  # ...and a gets work before it could be evicted
        await clients.wait_idle()
        check_ok(clients.outcome(late), 3)
        e = clients.outcome(cold).error
        assert (e.status, e.code) == (503, "pool_capacity_exhausted")
        assert [manager.entry(n).state for n in "ac"] == ["loaded", "unloaded"]
        again = submit(manager, clients, "c", "w", 1)  # a is idle again: now c loads
        await clients.wait_idle()
        check_ok(clients.outcome(again), 1)


def _admitted(manager: Any, model: str, text: str) -> Any:
    job = make_job(model, text, 1)
    manager.submit(job, allow_remote=False)
    return job
