"""Fair dispatch (pool/fairness.py through ModelRuntime) on the async FakeBackend, in virtual
time (autojump clock): weighted slot time, no starvation, priority, key limits, the admin row."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pool_harness import Clients, check_ok
from support.fake_backend import FakeBackend, FakeBackendFactory
from support.runtime import make_job
from trio.testing import wait_all_tasks_blocked

from llm_pool.config import FairnessSettings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Job
from llm_pool.pool.scheduler import ModelRuntime


def keyed(text: str, max_tokens: int, key: str | None, priority: int = 0) -> Job:
    job = make_job("m", text, max_tokens)
    job.request.fairness_key = key
    job.request.priority = priority
    return job


class Fair:
    def __init__(self, runtime: ModelRuntime, factory: FakeBackendFactory, clients: Clients) -> None:
        self.runtime = runtime
        self.factory = factory
        self.clients = clients

    def submit(self, key: str | None, max_tokens: int = 1, *, text: str = "a", priority: int = 0) -> Job:
        job = keyed(text, max_tokens, key, priority)
        self.runtime.submit_nowait(job)
        return self.clients.start(job)


async def ask(fair: Fair, job: Job) -> Any:
    """Admit ``job`` and be its client until it ended; its Outcome."""
    fair.runtime.submit_nowait(job)
    return await fair.clients.request(job)


@asynccontextmanager
async def fair_runtime(
    replicas: int = 1, *, capability: int = 1, max_queue: int = 10_000, **fairness: Any
) -> AsyncIterator[Fair]:
    factory = FakeBackendFactory(token_delay=1.0, capability=capability)
    runtime = ModelRuntime(
        "m",
        make_backend=factory.for_runtime("m"),
        target_inflight=capability,
        max_queue=max_queue,
        fairness=FairnessSettings(**fairness),
    )
    async with trio.open_nursery() as nursery:
        loaded = trio.Event()
        nursery.start_soon(functools.partial(runtime.run, replicas, on_loaded=loaded.set))
        await loaded.wait()
        yield Fair(runtime, factory, Clients(nursery))
        await runtime.stop(drain_timeout=0)


async def closed_loop(fair: Fair, key: str, inflight: int, max_tokens: int, until: float, slot: Counter[str]) -> None:
    """``inflight`` clients of ``key``, each sending its next request when the last ended, until
    virtual time ``until``; ``slot[key]`` sums the slot seconds of their finished requests."""

    async def client() -> None:
        while trio.current_time() < until:
            job = keyed("a", max_tokens, key)
            out = await ask(fair, job)
            if out.done is not None and out.done.stats.finish_reason == "length" and job.slot_start is not None:
                slot[key] += out.ended_at - job.slot_start

    async with trio.open_nursery() as nursery:
        for _ in range(inflight):
            nursery.start_soon(client)


# ------------------------------------------------------------------------------ weighted slot time
async def test_weights_2_to_1_give_slot_time_2_to_1(autojump_clock: Any, watchdog: None) -> None:
    """Key a (weight 2) sends short requests, b (weight 1) long ones, both always backlogged:
    slot *time* splits 2:1 (request counts do not)."""
    async with fair_runtime(2, weights={"a": 2.0, "b": 1.0}) as s:
        slot: Counter[str] = Counter()
        until = trio.current_time() + 3000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(closed_loop, s, "a", 6, 2, until, slot)
            nursery.start_soon(closed_loop, s, "b", 6, 7, until, slot)
        assert slot["a"] / slot["b"] == pytest.approx(2.0, rel=0.05)
        assert slot["a"] + slot["b"] == pytest.approx(2 * 3000, rel=0.01)  # no slot ever idled


async def test_a_heavy_key_cannot_starve_a_light_one(autojump_clock: Any, watchdog: None) -> None:
    """h keeps 32 requests in flight; l sends one at a time and waits at most for the next slot
    to free (no longer than one of h's requests), every time."""
    async with fair_runtime(2) as s:
        until = trio.current_time() + 500
        waits: list[float] = []

        async def light() -> None:
            while trio.current_time() < until:
                job = keyed("a", 1, "l")
                t0 = trio.current_time()
                out = await ask(s, job)
                check_ok(out, 1)
                assert job.slot_start is not None
                waits.append(job.slot_start - t0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(closed_loop, s, "h", 32, 4, until, Counter())
            await trio.sleep(10)  # h's backlog first
            nursery.start_soon(light)
        assert len(waits) > 100
        assert max(waits) <= 4.0


async def test_a_new_key_starts_at_the_current_minimum(autojump_clock: Any, watchdog: None) -> None:
    """b was idle while a used the replica for 100 s: b gets no banked credit, so from its
    arrival the two alternate instead of b taking the next 100 s."""
    async with fair_runtime(1) as s:
        first = [s.submit("a", 10) for _ in range(10)]
        await trio.sleep(95)
        later = [s.submit("a", 10) for _ in range(10)]
        b_jobs = [s.submit("b", 10) for _ in range(10)]
        await s.clients.wait_idle()
        order = sorted(first[-1:] + later + b_jobs, key=lambda j: j.slot_start or 0)
        keys = [j.request.fairness_key for j in order]
        assert keys[0] == "a"  # the one running when b arrived
        assert keys[1:11] == ["b", "a"] * 5
        row = s.runtime.queue.row()
        assert [k["fairness_key"] for k in row["keys"]] == ["b", "a"]
        assert row["keys"][0]["score"] == pytest.approx(row["keys"][1]["score"] - 10, abs=10)


async def test_idle_key_state_expires_after_the_ttl(autojump_clock: Any, watchdog: None) -> None:
    async with fair_runtime(1, idle_state_ttl_s=30.0) as s:
        await ask(s, keyed("a", 5, "x"))
        assert [k["fairness_key"] for k in s.runtime.queue.row()["keys"]] == ["x"]
        await trio.sleep(29)
        assert [k["fairness_key"] for k in s.runtime.queue.row()["keys"]] == ["x"]
        await trio.sleep(1)
        assert s.runtime.queue.row()["keys"] == []


async def test_soft_inflight_cap_yields_to_others_and_is_exceeded_when_nobody_waits(
    autojump_clock: Any, watchdog: None
) -> None:
    async with fair_runtime(1, capability=4, soft_max_inflight_per_key=1) as s:
        alone = [s.submit("a", 10) for _ in range(3)]
        await wait_all_tasks_blocked()
        assert all(j.state == "running" for j in alone)  # nobody else waits: the cap gives way
        more = s.submit("a", 10)  # 4th slot...
        await wait_all_tasks_blocked()
        assert more.state == "running"
        queued_a, queued_b = s.submit("a", 1), s.submit("b", 1)
        await trio.sleep(10.5)  # all four end at t=10: b goes first although a was first
        assert queued_b.slot_start is not None and queued_a.slot_start is not None
        assert queued_b.slot_start <= queued_a.slot_start
        await s.clients.wait_idle()
        s.clients.assert_all_ended_once()


# ------------------------------------------------------------------------------ priority
async def test_priority_orders_before_fairness(autojump_clock: Any, watchdog: None) -> None:
    async with fair_runtime(1, negative_priority_keys=["ops"]) as s:
        busy = s.submit("a", 3)
        await wait_all_tasks_blocked()
        late = s.submit("a", 1, text="x", priority=5)
        normal = s.submit("b", 1, text="y")
        urgent = s.submit("ops", 1, text="z", priority=-1)
        await s.clients.wait_idle()
        assert [j.request.input for j in s.factory.backends[0].begun] == ["a", "z", "y", "x"]
        for job in (busy, late, normal, urgent):
            assert s.clients.outcome(job).error is None


async def test_negative_priority_only_for_listed_keys(autojump_clock: Any, watchdog: None) -> None:
    async with fair_runtime(1, negative_priority_keys=["ops"]) as s:
        with pytest.raises(PoolError) as e:
            s.runtime.submit_nowait(keyed("a", 1, "dev", priority=-3))
        assert (e.value.status, e.value.code, e.value.param) == (403, "priority_not_allowed", "priority")
        assert e.value.message == (
            "priority -3 is below 0, which only the fairness keys in engine.fairness.negative_priority_keys "
            "may ask for ('dev' is not one of them)"
        )
        with pytest.raises(PoolError, match=r"^priority -1 is below 0, which only .* may ask for$"):
            s.runtime.submit_nowait(keyed("a", 1, None, priority=-1))
        check_ok(await ask(s, keyed("a", 1, "ops", priority=-3)), 1)


# ------------------------------------------------------------------------------ limits and the row
async def test_per_key_and_executor_limits_are_429_with_retry_after_and_counted(
    autojump_clock: Any, watchdog: None
) -> None:
    async with fair_runtime(1, max_pending_per_key=2, max_pending_per_executor=3, weights={"a": 3.0}) as s:
        running = s.submit("a", 4)
        queued = [s.submit("a", 1), s.submit("a", 1)]
        with pytest.raises(PoolError) as e:
            s.runtime.submit_nowait(keyed("a", 1, "a"))
        assert (e.value.status, e.value.code, e.value.headers) == (429, "fairness_key_queue_full", {"Retry-After": "1"})
        assert e.value.message == (
            "model 'm': fairness_key 'a' already have 2 request(s) waiting "
            "(engine.fairness.max_pending_per_key=2); retry later"
        )
        queued.append(s.submit(None, 1))
        with pytest.raises(PoolError) as e:
            s.runtime.submit_nowait(keyed("a", 1, "b"))
        assert (e.value.status, e.value.code, e.value.headers) == (429, "executor_queue_full", {"Retry-After": "1"})
        assert e.value.message == "model 'm' is busy: its queue is full (max_pending_per_executor=3); retry later"
        with pytest.raises(PoolError, match=r"^model 'm' is busy: its queue is full"):
            s.runtime.submit_nowait(keyed("a", 1, None))  # 1 waiting < 2, but the executor is full
        row = s.runtime.queue.row()
        assert (row["rejected_per_key_limit"], row["rejected_executor_limit"]) == (1, 2)
        by_key = {k["fairness_key"]: k for k in row["keys"]}
        assert by_key["a"] == {
            "fairness_key": "a", "pending": 2, "active": 1, "weight": 3.0, "score": 0.0,
            "rejected_per_key_limit": 1, "rejected_executor_limit": 0,
        }  # fmt: skip
        assert (by_key["b"]["rejected_executor_limit"], by_key[None]["rejected_executor_limit"]) == (1, 1)
        await trio.sleep(2)
        scores = {k["fairness_key"]: k["score"] for k in s.runtime.queue.row()["keys"]}
        assert scores == {"a": pytest.approx(2 / 3, abs=1e-3), "b": 0.0, None: 0.0}  # 2 s running / 3
        await s.clients.wait_idle()
        for job in [running, *queued]:
            assert s.clients.outcome(job).error is None


# ------------------------------------------------------------------------------ property
STEP = st.tuples(
    st.sampled_from([0.0, 0.0, 0.3, 1.0, 2.5]),  # virtual delay before the step
    st.sampled_from(["a", "b", "c", None]),  # fairness key
    st.integers(-1, 2),  # priority
    st.integers(1, 4),  # max_tokens
    st.booleans(),  # cancel a random earlier job too
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    replicas=st.integers(1, 3),
    capability=st.integers(1, 3),
    cap=st.sampled_from([None, 1, 2]),
    steps=st.lists(STEP, min_size=1, max_size=40),
    pick=st.randoms(use_true_random=False),
)
def test_property_every_job_runs_once_and_no_free_slot_idles(
    replicas: int, capability: int, cap: int | None, steps: list[Any], pick: Any
) -> None:
    trio.run(_property, replicas, capability, cap, steps, pick, clock=trio.testing.MockClock(autojump_threshold=0))


async def _property(replicas: int, capability: int, cap: int | None, steps: list[Any], pick: Any) -> None:
    problems: list[str] = []
    with trio.fail_after(100_000):
        async with fair_runtime(
            replicas, capability=capability, soft_max_inflight_per_key=cap, weights={"a": 2.0},
            negative_priority_keys=["a", "b", "c"],
        ) as s:  # fmt: skip
            runtime = s.runtime

            def check(where: str) -> None:
                free = sum(r.free for r in runtime.replicas)
                if runtime.waiting and free:
                    problems.append(f"{where}: {runtime.waiting} waiting with {free} free slot(s)")

            release, submit = runtime._release, runtime.submit_nowait

            def checked_release(replica: Any, job: Job) -> None:
                release(replica, job)
                check("release")

            def checked_submit(job: Job) -> None:
                submit(job)
                check("submit")

            runtime._release = checked_release  # type: ignore[method-assign]
            runtime.submit_nowait = checked_submit  # type: ignore[method-assign]
            jobs: list[Job] = []
            for delay, key, priority, max_tokens, cancel in steps:
                await trio.sleep(delay)
                if key is None:
                    priority = max(priority, 0)
                jobs.append(s.submit(key, max_tokens, priority=priority))
                if cancel:
                    pick.choice(jobs).cancel()
            await s.clients.wait_idle()
            backends: list[FakeBackend] = s.factory.backends
    assert problems == []
    s.clients.assert_all_ended_once()
    received = Counter(j.id for b in backends for j in b.received)
    begun = Counter(j.id for b in backends for j in b.begun)
    assert max(received.values(), default=0) <= 1 and max(begun.values(), default=0) <= 1
    for job in jobs:
        out = s.clients.outcome(job)
        if out.done is not None and out.done.stats.finish_reason == "length":
            assert begun[job.id] == 1
        else:  # only a job this test cancelled ends otherwise
            assert job.cancel_error is None and job._stop, out
    for backend in backends:
        assert not backend.over_capability
