"""PoolManager (pool/manager.py) with the async FakeBackend, in virtual time (autojump clock)."""

from __future__ import annotations

import functools
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from pool_harness import Clients, check_ok, manager_tasks, record_states, runtime_tasks, submit
from support.fake_backend import FakeBackend, FakeBackendFactory, expected_text
from support.runtime import make_job, running_manager, task_tree
from support.settings import make_settings
from trio.testing import wait_all_tasks_blocked

from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Job
from llm_pool.pool.manager import PoolManager

M = {"replica_max": 3, "max_queue": 16}


def admin_error(status: int, code: str, message: str) -> Any:
    """``pytest.raises`` for a PoolError with this exact status, code and message."""

    class Checker:
        def __enter__(self) -> None:
            self.cm = pytest.raises(PoolError)
            self.info = self.cm.__enter__()

        def __exit__(self, *exc: Any) -> bool:
            handled = self.cm.__exit__(*exc)
            e = self.info.value
            assert (e.status, e.code, e.message) == (status, code, message)
            return bool(handled)

    return Checker()


# ---------------------------------------------------------------------------------------- unload
async def test_unload_under_load_fails_the_queued_and_drains_the_running(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    async with running_manager(make_settings({"m": M}), factory) as (manager, nursery):
        states = record_states(manager)
        await manager.load("m")
        clients = Clients(nursery)
        running = submit(manager, clients, "m", "a", 5)
        queued = [submit(manager, clients, "m", c, 5) for c in "bcd"]
        await wait_all_tasks_blocked()
        t0 = trio.current_time()
        unloaded = trio.Event()

        async def unload() -> None:
            await manager.unload("m")
            unloaded.set()

        nursery.start_soon(unload)
        await wait_all_tasks_blocked()
        assert manager.entry("m").state == "unloading"
        for job in queued:  # at once, before the running job ends
            out = clients.outcome(job)
            assert out.ended_at == t0 and job.t_dispatched is None
            assert (out.error.status, out.error.code, out.error.message) == (
                409,
                "model_unloading",
                "model 'm' is unloading",
            )
        with admin_error(409, "model_unloading", "model 'm' is unloading"):
            manager.submit(make_job("m", "z"), allow_remote=False)
        with admin_error(409, "model_unloading", "model 'm' is unloading"):
            await manager.load("m")
        await unloaded.wait()
        assert trio.current_time() - t0 == pytest.approx(5.0)
        check_ok(clients.outcome(running), 5)
        entry = manager.entry("m")
        assert (entry.state, entry.runtime, entry.last_error) == ("unloaded", None, None)
        assert factory.backends[0].closed
        assert manager_tasks(manager) == []
        # and it loads and serves again
        await manager.load("m")
        again = submit(manager, clients, "m", "e", 3)
        await trio.sleep(3.5)
        check_ok(clients.outcome(again), 3)
        assert again.replica == "m#1" and factory.backends[1].received == [again]
        assert states == [
            ("m", "unloaded", "loading"),
            ("m", "loading", "loaded"),
            ("m", "loaded", "unloading"),
            ("m", "unloading", "unloaded"),
            ("m", "unloaded", "loading"),
            ("m", "loading", "loaded"),
        ]
        clients.assert_all_ended_once()


async def test_unload_drain_deadline_then_force(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    async with running_manager(make_settings({"m": {**M, "drain_timeout_s": 2.5}}), factory) as (manager, nursery):
        clients = Clients(nursery)
        await manager.load("m")
        slow = submit(manager, clients, "m", "a", 10)
        await wait_all_tasks_blocked()
        t0 = trio.current_time()
        await manager.unload("m")
        assert trio.current_time() - t0 == pytest.approx(2.5)
        out = clients.outcome(slow)
        assert out.deltas == ["b", "c"] and out.ended_at == trio.current_time()
        assert (out.error.status, out.error.code, out.error.message) == (
            503,
            "request_cancelled",
            "request to model 'm' was cancelled: model unloaded; the request did not finish within the 2.5s drain",
        )
        assert manager.entry("m").state == "unloaded" and factory.backends[0].closed

        await manager.load("m")
        slow = submit(manager, clients, "m", "a", 10)
        await trio.sleep(1.5)
        t0 = trio.current_time()
        await manager.unload("m", force=True)
        assert trio.current_time() == t0
        out = clients.outcome(slow)
        assert out.deltas == ["b"] and out.error.message == (
            "request to model 'm' was cancelled: model unloaded with force"
        )
        assert manager.entry("m").state == "unloaded" and factory.backends[1].closed
        clients.assert_all_ended_once()


async def test_unload_of_a_loading_model_is_409(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(load_delay=5.0)
    async with running_manager(make_settings({"m": M}), factory) as (manager, nursery):
        nursery.start_soon(manager.load, "m")
        await wait_all_tasks_blocked()
        assert manager.entry("m").state == "loading"
        with admin_error(409, "model_loading", "model 'm' is loading; unload it once loaded"):
            await manager.unload("m")
        with admin_error(409, "model_loading", "model 'm' is loading"):
            manager.submit(make_job("m", "a"), allow_remote=False)
        entry = await manager.load("m")  # a second load waits for the first
        assert entry.state == "loaded" and len(factory.backends) == 1
        await manager.unload("m")
        assert entry.state == "unloaded"


async def test_unload_of_an_unloaded_or_failed_model_is_a_no_op(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory()
    factory.configure("bad", fail_load="no weights")
    async with running_manager(make_settings({"m": M, "bad": M}), factory) as (manager, _):
        states = record_states(manager)
        entry = await manager.unload("m")
        assert entry.state == "unloaded"
        with admin_error(500, "model_load_failed", "model 'bad' failed to load: no weights"):
            await manager.load("bad")
        bad = await manager.unload("bad")
        assert (bad.state, bad.last_error) == ("failed", "no weights")
        assert states == [("bad", "unloaded", "loading"), ("bad", "loading", "failed")]
        assert manager_tasks(manager) == []


# ---------------------------------------------------------------------------------------- load
@pytest.mark.parametrize("replicas", [1, 3])
async def test_load_is_all_or_nothing(autojump_clock: Any, watchdog: None, replicas: int) -> None:
    factory = FakeBackendFactory(load_delay=1.0)
    failing = min(2, replicas)
    factory.configure("m", failing, fail_load="weights missing", load_delay=0.5)
    async with running_manager(make_settings({"m": {**M, "replicas": replicas}}), factory) as (manager, _):
        states = record_states(manager)
        with admin_error(500, "model_load_failed", "model 'm' failed to load: weights missing"):
            await manager.load("m")
        entry = manager.entry("m")
        assert (entry.state, entry.last_error, entry.runtime) == ("failed", "weights missing", None)
        assert states == [("m", "unloaded", "loading"), ("m", "loading", "failed")]
        for backend in factory.backends:
            assert backend.closed == backend.loaded and backend.loaded == (backend.replica_index != failing)
        assert manager_tasks(manager) == []
        with admin_error(409, "model_failed", "model 'm' failed to load: weights missing"):
            manager.submit(make_job("m", "a"), allow_remote=False)
        factory.configure("m", failing, fail_load=None)
        await manager.load("m")
        assert entry.state == "loaded" and entry.last_error is None
        assert len(factory.live("m")) == replicas


async def test_load_of_a_loaded_model_is_idempotent(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(load_delay=1.0)
    async with running_manager(make_settings({"m": {**M, "replicas": 2}}), factory) as (manager, _):
        states = record_states(manager)
        first = await manager.load("m")
        runtime = first.runtime
        second = await manager.load("m")
        assert second is first and first.runtime is runtime
        assert len(factory.backends) == 2 and all(b.load_calls == 1 for b in factory.backends)
        assert states == [("m", "unloaded", "loading"), ("m", "loading", "loaded")]


async def test_overrides_or_replicas_on_a_loaded_model_are_400(autojump_clock: Any, watchdog: None) -> None:
    async with running_manager(make_settings({"m": M}), FakeBackendFactory()) as (manager, _):
        await manager.load("m")
        message = "model 'm' is loaded; overrides and replicas need the model unloaded first"
        with admin_error(400, "invalid_load_request", message):
            await manager.load("m", override={"target_inflight": 2})
        with admin_error(400, "invalid_load_request", message):
            await manager.load("m", replicas=2)
        await manager.unload("m")
        entry = await manager.load("m", override={"target_inflight": 2}, replicas=2)
        assert entry.runtime is not None and entry.runtime.target_inflight == 2 and len(entry.runtime.replicas) == 2


# ---------------------------------------------------------------------------------------- resize
async def test_resize_1_3_1_under_steady_traffic_drops_nothing(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=0.5, load_delay=1.0)
    async with running_manager(make_settings({"m": M}), factory) as (manager, nursery):
        await manager.load("m")
        entry = manager.entry("m")
        clients = Clients(nursery)
        sizes = []

        async def client(k: int) -> None:
            for i in range(12):
                job = make_job("m", "abcdefgh"[(k + i) % 8], 1 + (k * i) % 4)
                manager.submit(job, allow_remote=False)
                await clients.request(job)
                sizes.append(len(entry.runtime.serving_replicas))

        async with trio.open_nursery() as traffic:
            for k in range(6):
                traffic.start_soon(client, k)
            await trio.sleep(3)
            await manager.resize("m", 3)
            assert [r.state for r in entry.runtime.replicas] == ["serving"] * 3
            await trio.sleep(6)
            await manager.resize("m", 1)
            assert [r.name for r in entry.runtime.replicas] == ["m#1"]
        assert set(sizes) == {1, 3}
        assert len(clients.jobs) == 72
        for job in clients.jobs:
            check_ok(clients.outcome(job), job.request.decoding.max_tokens)
        b1, b2, b3 = factory.backends
        assert b2.received and b3.received and b2.closed and b3.closed and not b1.closed
        assert all(b.max_concurrency == 1 for b in factory.backends)
        assert runtime_tasks(entry.runtime) == ["m#1"]
        clients.assert_all_ended_once()


async def test_resize_whose_new_replica_fails_keeps_serving_and_drops_nothing(
    autojump_clock: Any, watchdog: None
) -> None:
    factory = FakeBackendFactory(token_delay=0.5)
    factory.configure("m", 3, fail_load="out of memory", load_delay=3.0)
    async with running_manager(make_settings({"m": M}), factory) as (manager, nursery):
        await manager.load("m")
        clients = Clients(nursery)
        jobs = [submit(manager, clients, "m", c, 3) for c in "abcdef"]
        with admin_error(500, "model_load_failed", "model 'm': new replica failed to load: out of memory"):
            await manager.resize("m", 3)
        await trio.sleep(10)
        for job in jobs:
            check_ok(clients.outcome(job), 3)
        b1, b2, b3 = factory.backends
        assert b2.received == [] and b2.closed and not b3.loaded
        entry = manager.entry("m")
        assert entry.state == "loaded" and [r.name for r in entry.runtime.replicas] == ["m#1"]


async def test_resize_refusals(autojump_clock: Any, watchdog: None) -> None:
    async with running_manager(make_settings({"m": M}), FakeBackendFactory()) as (manager, _):
        with admin_error(409, "model_not_loaded", "model 'm' is unloaded; only a loaded model can be resized"):
            await manager.resize("m", 2)
        await manager.load("m")
        with admin_error(400, "invalid_request", "replica count 4 exceeds replica_max 3 for model 'm'"):
            await manager.resize("m", 4)
        with admin_error(400, "invalid_request", "replicas must be at least 1"):
            await manager.resize("m", 0)


# ---------------------------------------------------------------------------------------- failures
async def test_a_dead_replica_leaves_the_model_serving(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings({"m": {**M, "replicas": 2, "restart_max_attempts": 0}})
    async with running_manager(settings, factory) as (manager, nursery):
        await manager.load("m")
        clients = Clients(nursery)
        doomed, fine = submit(manager, clients, "m", "a", 4), submit(manager, clients, "m", "b", 4)
        await trio.sleep(1.5)
        factory.backends[0].kill("segfault")
        more = [submit(manager, clients, "m", c, 2) for c in "cde"]
        await trio.sleep(20)
        out = clients.outcome(doomed)
        assert (out.error.status, out.error.code, out.error.message) == (
            502,
            "backend_error",
            "model 'm' failed: runtime died: RuntimeError: segfault",
        )
        check_ok(clients.outcome(fine), 4)
        for job in more:
            check_ok(clients.outcome(job), 2)
            assert job.replica == "m#2"
        assert manager.entry("m").state == "loaded"
        clients.assert_all_ended_once()


async def test_all_replicas_dead_fails_the_model_and_its_queue(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings({"m": {**M, "replicas": 2, "restart_max_attempts": 0}})
    async with running_manager(settings, factory) as (manager, nursery):
        states = record_states(manager)
        await manager.load("m")
        clients = Clients(nursery)
        jobs = [submit(manager, clients, "m", c, 4) for c in "abcd"]
        await trio.sleep(1.5)
        factory.backends[0].kill("boom")
        factory.backends[1].kill("boom")
        await wait_all_tasks_blocked()
        entry = manager.entry("m")
        assert (entry.state, entry.last_error) == ("failed", "runtime died: RuntimeError: boom")
        for job in jobs[:2]:
            assert clients.outcome(job).error.message == "model 'm' failed: runtime died: RuntimeError: boom"
        for job in jobs[2:]:
            assert clients.outcome(job).error.message == (
                "model 'm' failed: no replica left: runtime died: RuntimeError: boom"
            )
        with admin_error(409, "model_failed", "model 'm' failed while serving: runtime died: RuntimeError: boom"):
            manager.submit(make_job("m", "z"), allow_remote=False)
        assert manager_tasks(manager) == []
        assert states[-1] == ("m", "loaded", "failed")
        await manager.load("m")
        again = submit(manager, clients, "m", "x", 2)
        await trio.sleep(3)
        check_ok(clients.outcome(again), 2)
        clients.assert_all_ended_once()


# ---------------------------------------------------------------------------------------- shutdown
async def test_shutdown_drains_every_model(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings({"a": M, "b": M, "off": {**M, "enabled": False}})
    manager = PoolManager(settings, backend_factory=factory)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(manager.run, autoload=True))
        await manager.load("a")
        await manager.load("b")
        assert manager.entry("off").state == "unloaded"
        clients = Clients(nursery)
        running = [submit(manager, clients, "a", "a", 3), submit(manager, clients, "b", "b", 20)]
        queued = [submit(manager, clients, "a", "c", 3), submit(manager, clients, "b", "d", 3)]
        await wait_all_tasks_blocked()
        t0 = trio.current_time()
        await manager.shutdown(drain_s=10)
        assert trio.current_time() - t0 == pytest.approx(10)
        with admin_error(503, "shutting_down", "the server is shutting down"):
            manager.submit(make_job("a", "z"), allow_remote=False)
        with admin_error(503, "shutting_down", "the server is shutting down"):
            await manager.load("off")
    # the manager's run() returned: its nursery is gone
    check_ok(clients.outcome(running[0]), 3)
    assert clients.outcome(running[1]).error.code == "request_cancelled"
    for job in queued:  # queued requests learn why: the server is going away, retry elsewhere
        assert clients.outcome(job).error.code == "shutting_down"
    assert clients.outcome(running[1]).error.message == (
        "request to model 'b' was cancelled: the server shut down before the request finished"
    )
    assert {n: e.state for n, e in manager.entries.items()} == {"a": "unloaded", "b": "unloaded", "off": "unloaded"}
    assert all(b.closed for b in factory.backends)
    clients.assert_all_ended_once()


async def test_no_leaked_tasks(autojump_clock: Any, watchdog: None) -> None:
    before = sorted(task_tree())
    factory = FakeBackendFactory(token_delay=0.5)
    clients_jobs: list[Job] = []
    async with running_manager(make_settings({"m": M, "n": M}), factory) as (manager, nursery):
        clients = Clients(nursery)
        await manager.load("m", replicas=2)
        await manager.load("n")
        assert manager_tasks(manager) == ["model m", "model n"]
        assert runtime_tasks(manager.entry("m").runtime) == ["m#1", "m#2"]
        for i in range(10):
            submit(manager, clients, "m" if i % 2 else "n", "abc"[i % 3], 3)
        cancelled = submit(manager, clients, "m", "q", 3)
        cancelled.cancel()
        await manager.resize("n", 2)
        await trio.sleep(20)
        await manager.resize("n", 1)
        await manager.unload("m")
        await manager.unload("n")
        assert manager_tasks(manager) == []
        clients.assert_all_ended_once()
        clients_jobs = clients.jobs
        for backend in factory.backends:
            assert backend.closed and backend.active == 0
            assert set(backend.outcomes) == {j.id for j in backend.received}
    assert sorted(task_tree()) == before
    assert len(clients_jobs) == 11 and all(j.ended for j in clients_jobs)


# ---------------------------------------------------------------------------------------- property
SUBMIT = st.tuples(
    st.just("submit"),
    st.sampled_from("ab"),
    st.sampled_from("abcxyz"),
    st.integers(1, 4),
    st.sampled_from([None, None, 1.0, 3.0]),
)
OPS = st.one_of(
    SUBMIT,
    SUBMIT,
    SUBMIT,
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("unload"), st.sampled_from("ab"), st.booleans()),
    st.tuples(st.just("load"), st.sampled_from("ab")),
    st.tuples(st.just("resize"), st.sampled_from("ab"), st.integers(1, 3)),
)
MODEL = st.fixed_dictionaries(
    {
        "replicas": st.integers(1, 3),
        "target_inflight": st.integers(1, 3),
        "max_queue": st.integers(0, 6),
        "drain_timeout_s": st.sampled_from([0.0, 1.0, 30.0]),
        "capability": st.integers(1, 3),
    }
)


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    models=st.fixed_dictionaries({"a": MODEL, "b": MODEL}),
    steps=st.lists(st.tuples(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.5]), OPS), min_size=4, max_size=30),
)
def test_property_every_request_ends_once_fifo_and_bounded(models: dict[str, Any], steps: list[Any]) -> None:
    trio.run(_property_run, models, steps, clock=trio.testing.MockClock(autojump_threshold=0))


async def _property_run(models: dict[str, Any], steps: list[Any]) -> None:
    factory = FakeBackendFactory(token_delay=0.5)
    config = {}
    for name, m in models.items():
        factory.configure(name, capability=m["capability"])
        config[name] = {k: v for k, v in m.items() if k != "capability"} | {"replica_max": 3}
    submitted: dict[str, list[Job]] = {"a": [], "b": []}
    cancelled: set[str] = set()
    timeouts: dict[str, float] = {}
    limits = {n: min(m["target_inflight"], m["capability"]) for n, m in models.items()}
    problems: list[str] = []

    def on_begin(backend: FakeBackend, job: Job) -> None:
        jobs = submitted[job.request.model]
        if any(j.state == "queued" for j in jobs[: jobs.index(job)]):
            problems.append(f"FIFO broken at {job.id}")
        entry = manager.entry(job.request.model)
        if entry.runtime is not None and any(r.active > r.capacity for r in entry.runtime.replicas):
            problems.append("replica over capacity")

    factory.defaults["on_begin"] = on_begin
    manager = PoolManager(make_settings(config), backend_factory=factory)
    refused: list[str] = []
    with trio.fail_after(10_000):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(manager.run, autoload=True))
            await manager.load("a")
            await manager.load("b")
            clients = Clients(nursery)

            async def admin(op: str, name: str, *args: Any) -> None:
                try:
                    if op == "unload":
                        await manager.unload(name, force=args[0])
                    elif op == "load":
                        await manager.load(name)
                    else:
                        await manager.resize(name, args[0])
                except PoolError as e:
                    assert e.code in ("model_loading", "model_unloading", "model_not_loaded"), e

            for delay, op in steps:
                await trio.sleep(delay)
                if op[0] == "submit":
                    _, name, char, max_tokens, timeout = op
                    job = make_job(name, char, max_tokens)
                    try:
                        manager.submit(job, allow_remote=False)
                    except PoolError as e:
                        assert e.code in (
                            "model_not_loaded",
                            "model_loading",
                            "model_unloading",
                            "executor_queue_full",
                        ), e
                        refused.append(e.code)
                        continue
                    submitted[name].append(job)
                    if timeout is not None:
                        timeouts[job.id] = timeout
                    clients.start(job, queue_timeout=timeout)
                elif op[0] == "cancel":
                    every = submitted["a"] + submitted["b"]
                    if every:
                        job = every[op[1] % len(every)]
                        cancelled.add(job.id)
                        job.cancel()
                else:
                    nursery.start_soon(admin, *op)
            # let everything settle, then unload everything: nothing may be left behind
            await trio.sleep(200)
            for name in ("a", "b"):
                await manager.unload(name)
            assert manager_tasks(manager) == []
            nursery.cancel_scope.cancel()

    assert problems == []
    clients.assert_all_ended_once()
    for name, jobs in submitted.items():
        for backend in factory.of(name):
            assert not backend.over_capability and backend.max_concurrency <= limits[name]
            assert backend.closed or not backend.loaded
        for job in jobs:
            out = clients.outcome(job)
            expected = expected_text(job.request.input, job.request.decoding.max_tokens)
            if out.done is not None:
                if out.done.stats.finish_reason == "length":
                    assert out.done.text == expected
                else:  # stopped early only because this test cancelled it
                    assert job.id in cancelled and expected.startswith(out.done.text)
                continue
            e = out.error
            assert e is not None
            if e.code == "queue_timeout":
                assert job.id in timeouts and job.t_dispatched is None
            elif e.code == "model_unloading":  # failed in the queue by an unload
                assert job.t_dispatched is None
            elif e.code == "request_cancelled":  # cancelled here, or cut by an unload / resize drain
                assert job.id in cancelled or job.t_dispatched is not None
            else:
                raise AssertionError(f"unexpected error for {job.id}: {e!r}")
