"""Helpers of the pool runtime tests: clients that run requests in the background like HTTP
handlers (over ``support.runtime``'s ``collect``), and the invariants every test ends with."""

from __future__ import annotations

import trio
from support.fake_backend import expected_text
from support.runtime import Outcome, collect, make_job

from llm_pool.pool.jobs import Job
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.scheduler import ModelRuntime
from llm_pool.pool.serving import wait_for_dispatch


class Clients:
    """Runs requests in the background, like HTTP handlers; keeps every job and outcome."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.jobs: list[Job] = []
        self.outcomes: dict[str, Outcome] = {}
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    def start(self, job: Job, *, queue_timeout: float | None = None) -> Job:
        """Start a client for an already admitted ``job``."""
        self._enter(job)
        self.nursery.start_soon(self._client, job, queue_timeout)
        return job

    async def request(self, job: Job, *, queue_timeout: float | None = None) -> Outcome:
        """Be the client of an already admitted ``job`` in this task: wait for its end."""
        self._enter(job)
        await self._client(job, queue_timeout)
        return self.outcomes[job.id]

    def _enter(self, job: Job) -> None:
        self.jobs.append(job)
        if self._pending == 0:
            self._idle = trio.Event()
        self._pending += 1

    async def _client(self, job: Job, queue_timeout: float | None) -> None:
        try:
            await wait_for_dispatch(job, queue_timeout)
            self.outcomes[job.id] = await collect(job)
        finally:
            self._pending -= 1
            if self._pending == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until every client started so far has its outcome."""
        await self._idle.wait()

    def outcome(self, job: Job) -> Outcome:
        return self.outcomes[job.id]

    def assert_all_ended_once(self) -> None:
        for job in self.jobs:
            assert job.ended, f"job {job.id} ({job.request.input!r}) never ended"
            out = self.outcomes.get(job.id)
            assert out is not None, f"client of {job.id} did not finish"
            assert out.terminal_events == 1 and out.events_after_end == 0, out
            if out.done is not None:
                assert out.done.text == "".join(out.deltas)


def check_ok(out: Outcome, max_tokens: int) -> None:
    assert out.error is None, out.error
    assert out.done is not None
    assert out.done.text == expected_text(out.job.request.input, max_tokens)
    assert out.done.stats.finish_reason == "length"


def manager_tasks(manager: PoolManager) -> list[str]:
    """Names of the tasks directly under the manager's nursery (one per model lifetime)."""
    assert manager._nursery is not None
    return sorted(t.name for t in manager._nursery.child_tasks)


def runtime_tasks(runtime: ModelRuntime) -> list[str]:
    """Names of the tasks directly under a model's nursery (one per replica)."""
    assert runtime._nursery is not None
    return sorted(t.name.rsplit(".", 1)[-1] for t in runtime._nursery.child_tasks)


def submit(
    manager: PoolManager,
    clients: Clients,
    model: str,
    text: str,
    max_tokens: int = 5,
    *,
    queue_timeout: float | None = None,
) -> Job:
    """Admit a request through the manager (raises its PoolError) and start its client."""
    job = make_job(model, text, max_tokens)
    manager.submit(job, allow_remote=False)
    return clients.start(job, queue_timeout=queue_timeout)


def record_states(manager: PoolManager) -> list[tuple[str, str, str]]:
    """Every state change from now on, as (model, before, after)."""
    changes: list[tuple[str, str, str]] = []
    manager.state_hooks.append(lambda entry, before, after: changes.append((entry.name, before, after)))
    return changes
