"""A handler's response starts once the job's runtime has its request (``Job.handed_over``,
``serving.run_job``): an engine child's request goes out before the handler's own work on the
event loop (quart, hypercorn, the opening frames).  Async FakeBackend, virtual time."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.runtime import collect, request, running_manager
from support.settings import make_settings
from trio.testing import wait_all_tasks_blocked

from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Job
from llm_pool.pool.serving import run_job

M = {"max_queue": 4}


async def test_run_job_returns_once_the_backend_handed_the_job_over(autojump_clock: Any, watchdog: None) -> None:
    gate = trio.Event()
    factory = FakeBackendFactory(token_delay=1.0, handover_gate=gate)
    async with running_manager(make_settings({"m": M}), factory, load=["m"]) as (manager, nursery):
        returned: list[Job] = []

        async def handler() -> None:
            job = await run_job(manager, request("a", "m", max_tokens=3), allow_remote=False)
            returned.append(job)
            await collect(job)

        nursery.start_soon(handler)
        await wait_all_tasks_blocked()
        (job,) = factory.backends[0].received
        assert job.state == "running" and job.t_dispatched is not None  # on its replica...
        assert not job.handed_over.is_set() and returned == []  # ...but not with its engine yet
        gate.set()
        await wait_all_tasks_blocked()
        assert returned == [job] and job.output == []  # back to the handler before any token
        await trio.sleep(5)
        assert "".join(job.output) == "bcd"


async def test_an_in_process_backend_hands_a_job_over_at_dispatch(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    async with running_manager(make_settings({"m": M}), factory, load=["m"]) as (manager, nursery):
        job = await run_job(manager, request("a", "m", max_tokens=2), allow_remote=False)
        assert job.handed_over.is_set() and job.state == "running" and trio.current_time() == 0
        await collect(job)


async def test_a_job_that_ends_before_its_handover_does_not_hold_its_handler(autojump_clock: Any, watchdog: None) -> None:
    """The engine died before the request went out: the handler gets the job's error as a
    status (not a stream that fails at once), as for a job that ended in its queue."""
    factory = FakeBackendFactory(token_delay=1.0, handover_gate=trio.Event())
    async with running_manager(make_settings({"m": M}), factory, load=["m"]) as (manager, nursery):
        failed: list[PoolError] = []

        async def handler() -> None:
            with pytest.raises(PoolError) as e:
                await run_job(manager, request("a", "m", max_tokens=3), allow_remote=False)
            failed.append(e.value)

        nursery.start_soon(handler)
        await wait_all_tasks_blocked()
        factory.backends[0].kill("engine gone")
        await trio.sleep(1)
        assert [(e.status, e.code) for e in failed] == [(502, "backend_error")]
