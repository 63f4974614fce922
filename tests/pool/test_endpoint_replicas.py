"""Replicas that are remote endpoints (issue 18), at the scheduler: one retry elsewhere for a job
that failed before any output, ejected replicas passed over (and panic mode), and reinstatement
placing queued work at once.

The backend here is a minimal async double of what :mod:`backends.openai_compatible` does with
the scheduler (``ejected``, ``weight``, ``rotation_changed``, ``Job.retry_elsewhere``), so these
run on trio's autojump clock; the real backend against real servers is tests/remote.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from support.runtime import collect, make_job

from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import GenerationStats, Job
from llm_pool.pool.scheduler import ModelRuntime

DOWN = PoolError(502, "upstream_connection_error", "cannot connect to the upstream", model="m")


class Endpoint:
    """An async backend whose jobs take ``delay`` seconds, or fail at once while ``down``."""

    threaded = False
    crashed = False

    def __init__(self, index: int) -> None:
        self.index = index
        self.capability = 1
        self.down = False
        self.ejected = False
        self.weight = 1.0
        self.delay = 1.0
        self.ran: list[str] = []
        self._rotation = trio.Event()

    def describe(self) -> dict[str, object]:
        return {}

    async def load(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def rotation_changed(self) -> None:
        await self._rotation.wait()

    def set_ejected(self, value: bool) -> None:
        self.ejected = value
        self._rotation.set()
        self._rotation = trio.Event()

    async def serve(self, inbox: Any) -> None:
        async with trio.open_nursery() as nursery:
            async for job in inbox:
                nursery.start_soon(self._run, job)

    async def _run(self, job: Job) -> None:
        job.begin()
        self.ran.append(job.request.input)
        if self.down:
            if not job.retry_elsewhere(DOWN):
                job.fail(DOWN)
            return
        await trio.sleep(self.delay)
        job.emit(f"{job.request.input}@{self.index}")
        job.finish(GenerationStats(output_tokens=1))


@asynccontextmanager
async def endpoints(n: int) -> AsyncIterator[tuple[ModelRuntime, list[Endpoint]]]:
    made: list[Endpoint] = []

    def make(index: int) -> Endpoint:
        made.append(Endpoint(index))
        return made[-1]

    runtime = ModelRuntime("m", make_backend=make, target_inflight=1, max_queue=16)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        loaded = trio.Event()
        nursery.start_soon(functools.partial(runtime.run, n, on_loaded=loaded.set))
        await loaded.wait()
        yield runtime, made
        await runtime.stop(drain_timeout=0)


def submit(runtime: ModelRuntime, text: str) -> Job:
    job = make_job("m", text)
    runtime.submit_nowait(job)
    return job


async def test_a_failed_job_runs_once_more_on_another_replica(autojump_clock: Any, watchdog: None) -> None:
    async with endpoints(2) as (runtime, (one, two)):
        one.down = True
        out = await collect(submit(runtime, "a"))
        assert out.text == "a@2"
        assert (one.ran, two.ran) == (["a"], ["a"])
        two.down = True  # its one retry spent: the second failure is the client's
        out = await collect(submit(runtime, "b"))
        assert out.code == "upstream_connection_error" and out.terminal_events == 1
        assert len(one.ran + two.ran) == 4
        assert runtime.running == 0 and runtime.waiting == 0


async def test_the_retry_waits_for_a_busy_replica_ahead_of_the_queue(autojump_clock: Any, watchdog: None) -> None:
    async with endpoints(2) as (runtime, (one, two)):
        two.down = True
        busy = submit(runtime, "busy")  # on #1 (the first of two idle replicas)
        retried = submit(runtime, "retried")  # on #2: fails, waits for #1
        later = submit(runtime, "later")  # on #2 once free: fails, waits for #1 behind "retried"
        outs = [await collect(j) for j in (busy, retried, later)]
        assert [o.text for o in outs] == ["busy@1", "retried@1", "later@1"]
        assert (one.ran, two.ran) == (["busy", "retried", "later"], ["retried", "later"])


async def test_ejected_replicas_are_passed_over_unless_all_are(autojump_clock: Any, watchdog: None) -> None:
    async with endpoints(3) as (runtime, eps):
        eps[0].set_ejected(True)
        jobs = [submit(runtime, f"j{i}") for i in range(4)]
        outs = [await collect(j) for j in jobs]
        assert all(not o.text.endswith("@1") for o in outs)
        assert eps[0].ran == []
        # every replica ejected: all are tried (panic mode), nothing waits forever
        for ep in eps:
            ep.set_ejected(True)
        out = await collect(submit(runtime, "panic"))
        assert out.text.startswith("panic@")


async def test_reinstatement_places_queued_work_at_once(autojump_clock: Any, watchdog: None) -> None:
    async with endpoints(2) as (runtime, (one, two)):
        one.set_ejected(True)
        first, queued = submit(runtime, "first"), submit(runtime, "queued")  # #2 busy, #1 ejected
        await trio.testing.wait_all_tasks_blocked()
        assert runtime.waiting == 1 and one.ran == []
        t0 = trio.current_time()
        one.set_ejected(False)  # a passing probe: the scheduler hears of it and places the job
        out = await collect(queued)
        assert out.text == "queued@1"
        assert trio.current_time() - t0 == one.delay  # placed at once, not after #2's job
        await collect(first)


async def test_a_job_cancelled_while_waiting_for_its_retry_ends_cleanly(autojump_clock: Any, watchdog: None) -> None:
    async with endpoints(2) as (runtime, (one, two)):
        busy = submit(runtime, "busy")  # on #1
        await trio.testing.wait_all_tasks_blocked()
        two.down = True
        waiting = submit(runtime, "waiting")  # #2 fails it; #1 is busy: it waits for #1
        await trio.testing.wait_all_tasks_blocked()
        assert two.ran == ["waiting"] and waiting.state == "queued"
        waiting.cancel()
        out = await collect(waiting)
        assert out.code == "request_cancelled" and out.terminal_events == 1
        await collect(busy)
        assert one.ran == ["busy"]  # the cancelled job never reached a replica again
        assert runtime.running == 0
        assert runtime.queue.row()["keys"][0]["active"] == 0  # its slot time was charged once
