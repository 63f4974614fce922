"""Helpers shared by the pool runtime tests: submit requests like the HTTP route does, record how
each one ended, and check the invariants every test ends with."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from fakes.backend import FakeBackendFactory, expected_text

from llm_pool.config import Settings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Decoding, Delta, Done, Failed, GenerationRequest, Job, Message
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.scheduler import ModelRuntime
from llm_pool.pool.serving import wait_for_dispatch


def make_job(model: str, text: str, max_tokens: int = 5) -> Job:
    return Job(
        GenerationRequest(
            model=model,
            messages=[Message(role="user", content=text)],
            decoding=Decoding(max_tokens=max_tokens),
        )
    )


@dataclass
class Outcome:
    """How one request ended, as its client saw it."""

    job: Job
    deltas: list[str] = field(default_factory=list)
    done: Done | None = None
    error: PoolError | None = None
    terminal_events: int = 0
    events_after_end: int = 0
    ended_at: float | None = None

    @property
    def text(self) -> str:
        assert self.done is not None, self.error
        return self.done.text

    @property
    def code(self) -> str | None:
        return self.error.code if self.error else None


async def collect(job: Job) -> Outcome:
    """Drain a job's whole event stream (until the channel closes), checking its shape."""
    out = Outcome(job)
    async for event in job.events():
        if out.terminal_events:
            out.events_after_end += 1
        if isinstance(event, Delta):
            out.deltas.append(event.text)
        elif isinstance(event, Done):
            out.terminal_events += 1
            out.done = event
        elif isinstance(event, Failed):
            out.terminal_events += 1
            out.error = event.error
    out.ended_at = trio.current_time()
    return out


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


@asynccontextmanager
async def running_manager(
    settings: Settings, factory: FakeBackendFactory, *, autoload: bool = False
) -> AsyncIterator[tuple[PoolManager, trio.Nursery]]:
    """A started :class:`PoolManager` and a nursery for clients; cancelled at exit unless the
    test shut the manager down itself."""
    manager = PoolManager(settings, backend_factory=factory)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(manager.run, autoload=autoload))
        yield manager, nursery
        nursery.cancel_scope.cancel()


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


def all_task_names() -> list[str]:
    """Every task of this trio run, depth first."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names
