"""ModelRuntime (pool/scheduler.py) on the async FakeBackend, in virtual time (autojump clock)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from pool_harness import Clients, check_ok, runtime_tasks
from support.fake_backend import FakeBackend, FakeBackendFactory
from support.runtime import collect, make_job
from trio.testing import wait_all_tasks_blocked

from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Job, Message
from llm_pool.pool.scheduler import LoadFailed, ModelRuntime
from llm_pool.pool.serving import wait_for_dispatch


class Served:
    def __init__(self, runtime: ModelRuntime, factory: FakeBackendFactory, clients: Clients) -> None:
        self.runtime = runtime
        self.factory = factory
        self.clients = clients

    @property
    def backends(self) -> list[FakeBackend]:
        return self.factory.backends

    def submit(self, text: str = "a", max_tokens: int = 5, *, queue_timeout: float | None = None) -> Job:
        job = make_job("m", text, max_tokens)
        self.runtime.submit_nowait(job)
        return self.clients.start(job, queue_timeout=queue_timeout)

    def outcome(self, job: Job) -> Any:
        return self.clients.outcome(job)


@asynccontextmanager
async def serving(
    replicas: int = 1, *, target_inflight: int = 1, max_queue: int = 128, **knobs: Any
) -> AsyncIterator[Served]:
    """A loaded ModelRuntime "m" of ``replicas`` fake replicas; stopped (drain 0) at exit."""
    knobs.setdefault("token_delay", 1.0)
    factory = FakeBackendFactory(**knobs)
    runtime = ModelRuntime(
        "m", make_backend=factory.for_runtime("m"), target_inflight=target_inflight, max_queue=max_queue
    )
    async with trio.open_nursery() as nursery:
        loaded = trio.Event()
        nursery.start_soon(functools.partial(runtime.run, replicas, on_loaded=loaded.set))
        await loaded.wait()
        yield Served(runtime, factory, Clients(nursery))
        await runtime.stop(drain_timeout=0)


# ---------------------------------------------------------------------------------------- dispatch
async def test_dispatch_least_loaded_replica_ties_round_robin(autojump_clock: Any, watchdog: None) -> None:
    async with serving(3, target_inflight=3, capability=3) as s:
        r1, r2, r3 = s.runtime.replicas
        assert runtime_tasks(s.runtime) == ["m#1", "m#2", "m#3"]
        j1, j2, j3 = (s.submit("a", 100) for _ in range(3))
        await wait_all_tasks_blocked()
        # all idle: ties go round-robin
        assert [j.replica for j in (j1, j2, j3)] == ["m#1", "m#2", "m#3"]
        j2.cancel()  # stops at its next token (t=1), freeing m#2
        await trio.sleep(1.5)
        assert [r.active for r in (r1, r2, r3)] == [1, 0, 1]
        j4 = s.submit("b", 100)  # round-robin would say m#1; m#2 is the least loaded
        await wait_all_tasks_blocked()
        assert j4.replica == "m#2"
        j5, j6 = s.submit("c", 100), s.submit("d", 100)  # ties again: round-robin after m#2
        await wait_all_tasks_blocked()
        assert (j5.replica, j6.replica) == ("m#3", "m#1")
        assert [r.active for r in (r1, r2, r3)] == [2, 1, 2]
        assert [len(b.received) for b in s.backends] == [2, 2, 2]
        for j in (j1, j3, j4, j5, j6):
            j.cancel()
        await trio.sleep(1.5)
        assert s.outcome(j2).done.stats.finish_reason == "cancelled"
        assert s.runtime.running == 0
        s.clients.assert_all_ended_once()


@pytest.mark.parametrize(("target", "capability"), [(3, 2), (1, 4), (2, 2)])
async def test_inflight_never_exceeds_min_of_target_and_capability(
    autojump_clock: Any, watchdog: None, target: int, capability: int
) -> None:
    limit = min(target, capability)
    async with serving(2, target_inflight=target, capability=capability) as s:
        assert [r.capacity for r in s.runtime.replicas] == [limit, limit]
        assert s.runtime.effective_target_inflight == limit
        seen: list[int] = []

        def on_change() -> None:
            seen.extend(r.active for r in s.runtime.replicas)

        for backend in s.backends:
            backend.on_begin = lambda b, j: on_change()
        jobs = [s.submit("abcdefghij"[i % 10], 1 + i % 4) for i in range(16)]
        await s.clients.wait_idle()
        for job in jobs:
            check_ok(s.outcome(job), job.request.decoding.max_tokens)
        assert max(seen) == limit
        for backend in s.backends:
            assert backend.max_concurrency == limit and not backend.over_capability
        s.clients.assert_all_ended_once()


async def test_fifo_per_model(autojump_clock: Any, watchdog: None) -> None:
    async with serving(2, target_inflight=2, capability=2) as s:
        submitted: list[Job] = []

        def check_order(backend: FakeBackend, job: Job) -> None:
            # every job submitted before this one has left the queue already
            earlier = submitted[: submitted.index(job)]
            assert all(j.state != "queued" for j in earlier)

        for backend in s.backends:
            backend.on_begin = check_order
        for i in range(20):
            submitted.append(s.submit("xyz"[i % 3], 1 + (i * 7) % 5))
        await s.clients.wait_idle()
        order = {j.id: i for i, j in enumerate(submitted)}
        for backend in s.backends:
            indexes = [order[j.id] for j in backend.received]
            assert indexes == sorted(indexes)
        dispatched = sorted(submitted, key=lambda j: (j.t_dispatched, order[j.id]))
        assert [order[j.id] for j in dispatched] == list(range(20))
        s.clients.assert_all_ended_once()


async def test_fifo_single_slot_runs_in_submission_order(autojump_clock: Any, watchdog: None) -> None:
    async with serving(1) as s:
        jobs = [s.submit(c, 2) for c in "qwertyuiop"]
        await s.clients.wait_idle()
        assert [j.id for j in s.backends[0].begun] == [j.id for j in jobs]
        t0 = s.backends[0].begin_times[jobs[0].id]
        assert [s.backends[0].begin_times[j.id] - t0 for j in jobs] == pytest.approx([2.0 * i for i in range(10)])


# ---------------------------------------------------------------------------------------- admission
async def test_queue_full_is_429_with_retry_after_counting_waiting_jobs_only(
    autojump_clock: Any, watchdog: None
) -> None:
    async with serving(1, max_queue=2) as s:
        running = s.submit("a", 3)
        await wait_all_tasks_blocked()
        assert (s.runtime.running, s.runtime.waiting) == (1, 0)
        queued = [s.submit("b", 3), s.submit("c", 3)]  # the running job does not count
        assert s.runtime.waiting == 2
        refused = make_job("m", "d", 3)
        with pytest.raises(
            PoolError, match=r"^model 'm' is busy: its queue is full \(max_queue=2\); retry later$"
        ) as e:
            s.runtime.submit_nowait(refused)
        assert (e.value.status, e.value.code, e.value.headers) == (429, "executor_queue_full", {"Retry-After": "1"})
        assert s.runtime.waiting == 2 and not refused.started.is_set()
        await trio.sleep(3.5)  # the first job ended; one queued job started: room for one more
        assert s.runtime.waiting == 1
        late = s.submit("e", 1)
        await s.clients.wait_idle()
        for job in [running, *queued]:
            check_ok(s.outcome(job), 3)
        check_ok(s.outcome(late), 1)
        assert refused not in s.backends[0].received
        s.clients.assert_all_ended_once()


async def test_max_queue_zero_still_admits_while_a_slot_is_free(autojump_clock: Any, watchdog: None) -> None:
    async with serving(1, max_queue=0, target_inflight=2, capability=2) as s:
        first, second = s.submit("a", 2), s.submit("b", 2)  # admitted before any dispatch
        with pytest.raises(
            PoolError, match=r"^model 'm' is busy: its queue is full \(max_queue=0\); retry later$"
        ) as e:
            s.runtime.submit_nowait(make_job("m", "c", 2))
        assert e.value.status == 429 and e.value.headers == {"Retry-After": "1"}
        await wait_all_tasks_blocked()
        assert (s.runtime.running, s.runtime.waiting) == (2, 0)
        with pytest.raises(PoolError) as e:
            s.runtime.submit_nowait(make_job("m", "c", 2))
        assert e.value.code == "executor_queue_full"
        await trio.sleep(2.5)
        check_ok(s.outcome(first), 2)
        check_ok(s.outcome(second), 2)
        third = s.submit("c", 2)
        await trio.sleep(2.5)
        check_ok(s.outcome(third), 2)


async def test_queue_timeout_fails_a_queued_job_that_never_reaches_the_backend(
    autojump_clock: Any, watchdog: None
) -> None:
    async with serving(1) as s:
        busy = s.submit("a", 10)
        await wait_all_tasks_blocked()
        late = make_job("m", "b", 2)
        s.runtime.submit_nowait(late)
        t0 = trio.current_time()
        await wait_for_dispatch(late, 2.0)
        assert trio.current_time() - t0 == pytest.approx(2.0)
        assert late.state == "done" and late.t_dispatched is None and s.runtime.waiting == 0
        with pytest.raises(PoolError, match=r"^request waited more than 2s in model 'm''s queue$") as e:
            await late.result()
        assert (e.value.status, e.value.code) == (503, "queue_timeout")
        await trio.sleep(10)
        check_ok(s.outcome(busy), 10)
        after = s.submit("c", 1)
        await trio.sleep(1.5)
        check_ok(s.outcome(after), 1)
        assert [j.id for j in s.backends[0].received] == [busy.id, after.id]


async def test_wait_for_dispatch_returns_once_dispatched_within_the_timeout(
    autojump_clock: Any, watchdog: None
) -> None:
    async with serving(1) as s:
        s.submit("a", 2)
        job = make_job("m", "b", 2)
        s.runtime.submit_nowait(job)
        t0 = trio.current_time()
        await wait_for_dispatch(job, 5.0)
        assert trio.current_time() - t0 == pytest.approx(2.0) and job.state == "running"
        out = await collect(job)
        check_ok(out, 2)


async def test_a_free_slot_takes_a_job_in_the_same_step(autojump_clock: Any, watchdog: None) -> None:
    """Dispatch is synchronous: a job submitted to a free replica, or queued behind a job that
    ends, is on a replica before any other task runs (no scheduling round in between)."""
    async with serving(1) as s:
        first = make_job("m", "a", 2)
        s.runtime.submit_nowait(first)
        assert first.state == "running" and first.replica == "m#1"
        second = make_job("m", "b", 2)
        s.runtime.submit_nowait(second)
        assert second.state == "queued"
        # on_end callbacks run right after the slot's release, in the same callback
        seen_at_end: list[str] = []
        first.on_end.append(lambda job, error: seen_at_end.append(second.state))
        s.clients.start(first)
        s.clients.start(second)
        await trio.sleep(5)
        assert seen_at_end == ["running"]
        check_ok(s.outcome(first), 2)
        check_ok(s.outcome(second), 2)
        s.clients.assert_all_ended_once()


async def test_cancelled_queued_jobs_are_swept_and_fifo_holds(autojump_clock: Any, watchdog: None) -> None:
    """Cancelling a queued job is O(1) (it is skipped later); the queue never keeps more dead
    jobs than live ones (beyond a small slack), and the live ones still run oldest first."""
    async with serving(1, max_queue=1000) as s:
        busy = s.submit("busy", 3)
        await wait_all_tasks_blocked()
        jobs = [s.submit(f"j{i}", 1) for i in range(600)]
        await wait_all_tasks_blocked()
        keep = jobs[::10]
        for job in jobs:
            if job not in keep:
                job.cancel()
        assert s.runtime.waiting == len(keep)
        assert len(s.runtime.queue.keys[None].queues[0]) <= 2 * len(keep) + 65
        await trio.sleep(200)
        check_ok(s.outcome(busy), 3)
        for job in keep:
            check_ok(s.outcome(job), 1)
        assert sorted(keep, key=lambda j: j.t_dispatched or 0) == keep
        assert s.backends[0].received == [busy, *keep]
        assert s.runtime.waiting == 0 and not s.runtime.queue.keys[None].queues
        s.clients.assert_all_ended_once()


async def test_unread_deltas_are_handed_over_in_one_piece(autojump_clock: Any, watchdog: None) -> None:
    """A job whose deltas nobody reads (a non-streamed answer) gets its first chunk at once (the
    time-to-first-token metric) and the rest in one event at the end; the text is the same."""
    async with serving(1) as s:
        streamed, held = make_job("m", "a", 6), make_job("m", "b", 6)
        held.stream_deltas = False
        events: dict[str, list[Any]] = {}
        for job in (streamed, held):
            s.runtime.submit_nowait(job)
            events[job.request.input] = [e async for e in job.events()]
        assert [e.text for e in events["a"][:-1]] == list("bcdefg")
        assert [e.text for e in events["b"][:-1]] == ["c", "defgh"]
        assert events["a"][-1].text == "bcdefg" and events["b"][-1].text == "cdefgh"
        assert held.t_first_output is not None and held.t_first_output < (held.t_done or 0)


# ---------------------------------------------------------------------------------------- cancel
async def test_cancelling_queued_jobs_keeps_them_from_the_backend(autojump_clock: Any, watchdog: None) -> None:
    async with serving(1) as s:
        busy = s.submit("a", 4)
        await wait_all_tasks_blocked()
        head, tail = s.submit("b", 2), s.submit("c", 2)
        await wait_all_tasks_blocked()
        assert s.runtime.waiting == 2
        head.cancel()
        assert s.runtime.waiting == 1
        tail.cancel()
        assert s.runtime.waiting == 0
        await trio.sleep(4.5)
        check_ok(s.outcome(busy), 4)
        for job in (head, tail):
            assert job.state == "done" and job.t_dispatched is None
            assert s.outcome(job).code == "request_cancelled"
            assert s.outcome(job).error.message == "request to model 'm' was cancelled: cancelled while queued"
        assert s.backends[0].received == [busy]
        nxt = s.submit("d", 1)
        await trio.sleep(1.5)
        check_ok(s.outcome(nxt), 1)
        s.clients.assert_all_ended_once()


async def test_cancelling_a_running_job_stops_it_at_the_next_token_and_frees_the_slot(
    autojump_clock: Any, watchdog: None
) -> None:
    async with serving(1) as s:
        running = s.submit("a", 10)
        queued = s.submit("k", 2)
        t0 = trio.current_time()
        await trio.sleep(3.5)  # three tokens out
        assert s.backends[0].tokens_emitted == 3
        running.cancel()
        await trio.sleep(0.6)  # the next token is at t=4
        out = s.outcome(running)
        assert out.done.stats.finish_reason == "cancelled" and out.text == "bcd"
        assert out.ended_at - t0 == pytest.approx(4.0)
        assert s.backends[0].begin_times[queued.id] == out.ended_at  # slot released at once
        assert s.runtime.replicas[0].active == 1
        await trio.sleep(2)
        check_ok(s.outcome(queued), 2)
        s.clients.assert_all_ended_once()


# ---------------------------------------------------------------------------------------- failures
async def test_backend_raising_mid_job_is_502_and_the_replica_keeps_serving(
    autojump_clock: Any, watchdog: None
) -> None:
    async with serving(1, fail_jobs={"boom": 2}) as s:
        bad = s.submit("boom", 5)
        good = s.submit("a", 3)
        await trio.sleep(10)
        out = s.outcome(bad)
        assert out.deltas == ["n", "o"]
        assert (out.error.status, out.error.code) == (502, "backend_error")
        assert out.error.message == "model 'm' failed: RuntimeError: fake failure at token 2"
        check_ok(s.outcome(good), 3)
        assert s.runtime.replicas[0].state == "serving"
        s.clients.assert_all_ended_once()


async def test_serve_dying_fails_its_jobs_502_and_the_model_serves_on(autojump_clock: Any, watchdog: None) -> None:
    async with serving(2) as s:
        b1, b2 = s.backends
        r1, r2 = s.runtime.replicas
        on1, on2 = s.submit("a", 5), s.submit("b", 5)
        queued = s.submit("c", 2)
        await trio.sleep(2.5)
        b1.kill("boom")
        await wait_all_tasks_blocked()
        out = s.outcome(on1)
        assert out.deltas == ["b", "c"]
        assert (out.error.status, out.error.code) == (502, "backend_error")
        assert out.error.message == "model 'm' failed: runtime died: RuntimeError: boom"
        assert r1.state == "dead" and r1.error == "runtime died: RuntimeError: boom"
        assert b1.closed and r1.active == 0
        assert s.runtime.admitting and s.runtime.alive
        await trio.sleep(10)
        check_ok(s.outcome(on2), 5)
        check_ok(s.outcome(queued), 2)
        assert queued.replica == "m#2"
        after = s.submit("d", 1)
        await trio.sleep(1.5)
        check_ok(s.outcome(after), 1)
        assert runtime_tasks(s.runtime) == ["m#2"]
        s.clients.assert_all_ended_once()


async def test_serve_dying_on_a_job_input(autojump_clock: Any, watchdog: None) -> None:
    async with serving(2, die_on_input="poison") as s:
        bad = s.submit("poison", 3)
        await wait_all_tasks_blocked()
        assert s.outcome(bad).error.message == (
            "model 'm' failed: runtime died: RuntimeError: fake runtime died on input 'poison'"
        )
        good = s.submit("a", 2)
        await trio.sleep(3)
        check_ok(s.outcome(good), 2)
        assert good.replica == "m#2"


async def test_all_replicas_dead_ends_the_model_and_fails_every_queued_job(autojump_clock: Any, watchdog: None) -> None:
    async with trio.open_nursery() as outer:
        factory = FakeBackendFactory(token_delay=1.0)
        runtime = ModelRuntime("m", make_backend=factory.for_runtime("m"), target_inflight=1, max_queue=10)
        loaded = trio.Event()
        outer.start_soon(functools.partial(runtime.run, 2, on_loaded=loaded.set))
        await loaded.wait()
        clients = Clients(outer)
        jobs = []
        for text in "abcde":
            job = make_job("m", text, 5)
            runtime.submit_nowait(job)
            jobs.append(clients.start(job))
        await trio.sleep(1.5)
        factory.backends[0].kill("boom1")
        await trio.sleep(1)
        factory.backends[1].kill("boom2")
        await runtime.finished.wait()
        await wait_all_tasks_blocked()
        assert runtime.last_error == "runtime died: RuntimeError: boom2"
        assert not runtime.admitting and not runtime.alive
        first, second, *queued = jobs  # first on m#1, second on m#2, the rest queued
        assert clients.outcome(first).error.message == "model 'm' failed: runtime died: RuntimeError: boom1"
        assert clients.outcome(second).error.message == "model 'm' failed: runtime died: RuntimeError: boom2"
        for job in queued:
            assert job.t_dispatched is None
            assert (clients.outcome(job).error.status, clients.outcome(job).error.code) == (502, "backend_error")
            assert clients.outcome(job).error.message == (
                "model 'm' failed: no replica left: runtime died: RuntimeError: boom2"
            )
        with pytest.raises(PoolError, match=r"^model 'm' is unloading$"):
            runtime.submit_nowait(make_job("m", "z", 1))
        assert all(b.closed for b in factory.backends)
        clients.assert_all_ended_once()


# ---------------------------------------------------------------------------------------- load
async def test_load_is_all_or_nothing(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(load_delay=1.0)
    factory.configure("m", 2, fail_load="weights missing", load_delay=0.5)
    runtime = ModelRuntime("m", make_backend=factory.for_runtime("m"), target_inflight=1, max_queue=1)
    loaded = []
    t0 = trio.current_time()
    with pytest.raises(LoadFailed, match=r"^weights missing$"):
        await runtime.run(3, on_loaded=lambda: loaded.append(True))
    assert loaded == [] and runtime.finished.is_set()
    b1, b2, b3 = factory.backends
    assert (b1.loaded, b1.closed, b3.loaded, b3.closed) == (True, True, True, True)
    assert not b2.loaded and not b2.closed
    assert runtime.replicas == []
    assert trio.current_time() - t0 == pytest.approx(1.0)


# ---------------------------------------------------------------------------- prompt-cache affinity
def _keyed(s: Served, key: str | None, text: str = "a", system: str | None = None) -> Job:
    job = make_job("m", text, 100)
    job.request.prompt_cache_key = key
    if system is not None:
        job.request.messages.insert(0, Message(role="system", content=system))
    s.runtime.submit_nowait(job)
    return s.clients.start(job)


async def test_a_prompt_cache_key_returns_to_its_replica_while_it_has_room(autojump_clock: Any, watchdog: None) -> None:
    async with serving(2, target_inflight=3, capability=3) as s:
        first = _keyed(s, "team-a")
        await wait_all_tasks_blocked()
        home = first.replica
        # its replica runs one more job than the other (AFFINITY_SLACK): the key still wins
        second = _keyed(s, "team-a")
        await wait_all_tasks_blocked()
        assert second.replica == home
        # now two more: least-loaded wins over the key's replica
        third = _keyed(s, "team-a")
        await wait_all_tasks_blocked()
        assert third.replica != home
        # and the key follows the replica that served it last
        fourth = _keyed(s, "team-a")
        await wait_all_tasks_blocked()
        assert fourth.replica == third.replica
        # another key is placed least-loaded, as a request without affinity
        other = _keyed(s, "team-b")
        await wait_all_tasks_blocked()
        assert other.replica == home
        for job in (first, second, third, fourth, other):
            job.cancel()


async def test_without_a_key_the_longest_shared_prompt_prefix_picks_the_replica(
    autojump_clock: Any, watchdog: None
) -> None:
    async with serving(2, target_inflight=2, capability=2) as s:
        system_a, system_b = "A" * 200, "B" * 200
        a1 = _keyed(s, None, "x", system_a)
        b1 = _keyed(s, None, "x", system_b)
        await wait_all_tasks_blocked()
        assert a1.replica != b1.replica
        # both replicas run one job; each new prompt joins the replica that saw its system prompt
        b2 = _keyed(s, None, "y", system_b)
        a2 = _keyed(s, None, "y", system_a)
        await wait_all_tasks_blocked()
        assert (a2.replica, b2.replica) == (a1.replica, b1.replica)
        for job in (a1, b1, a2, b2):
            job.cancel()


async def test_the_key_map_is_bounded_least_recently_used_first(
    autojump_clock: Any, watchdog: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llm_pool.pool import scheduler

    monkeypatch.setattr(scheduler, "AFFINITY_KEYS", 2)
    async with serving(2, target_inflight=4, capability=4) as s:
        jobs = [_keyed(s, key) for key in ("k1", "k2", "k1", "k3")]
        await wait_all_tasks_blocked()
        assert list(s.runtime._affinity) == ["k1", "k3"]  # k2 was the least recently used
        for job in jobs:
            job.cancel()
    assert scheduler.shared_prefix("abcdef", "abcxyz") == 3
    assert scheduler.shared_prefix("abc", "abc") == 3
    assert scheduler.shared_prefix("", "abc") == 0
