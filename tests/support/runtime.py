"""Driving a :class:`PoolManager` in-process, as the HTTP route would, without HTTP: start it,
build a request, admit it, and drain its events into an :class:`Outcome` whose shape is checked.
For the runtime tests (over the fake backend) and the real-backend tests alike."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from llm_pool.config import Settings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Decoding, Delta, Done, Failed, GenerationRequest, Job, Message
from llm_pool.pool.manager import PoolManager


@asynccontextmanager
async def running_manager(
    settings: Settings,
    factory: Callable[[Any], Any] | None = None,
    *,
    autoload: bool = False,
    load: Iterable[str] = (),
) -> AsyncIterator[tuple[PoolManager, trio.Nursery]]:
    """A started :class:`PoolManager` (real backends unless ``factory``), the models ``load``
    loaded, and a nursery for clients; cancelled at exit unless the test shut it down itself."""
    manager = PoolManager(settings) if factory is None else PoolManager(settings, backend_factory=factory)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(manager.run, autoload=autoload))
        for name in load:
            await manager.load(name)
        yield manager, nursery
        nursery.cancel_scope.cancel()


def request(text: str, model: str = "tiny", **decoding: Any) -> GenerationRequest:
    """One user turn, greedy, 5 tokens unless ``decoding`` says otherwise."""
    return GenerationRequest(
        model=model,
        messages=[Message(role="user", content=text)],
        decoding=Decoding(**{"temperature": 0.0, "max_tokens": 5, **decoding}),
    )


def raw_request(text: str, model: str = "tiny", **decoding: Any) -> GenerationRequest:
    """A raw prompt (``/v1/completions``: no template), greedy, 5 tokens unless ``decoding`` says
    otherwise."""
    return GenerationRequest(
        model=model, messages=[], raw_prompt=text, decoding=Decoding(**{"temperature": 0.0, "max_tokens": 5, **decoding})
    )


def make_job(model: str, text: str, max_tokens: int = 5) -> Job:
    """A job of :func:`request`, not admitted yet."""
    return Job(request(text, model, max_tokens=max_tokens))


def submit(manager: PoolManager, req: GenerationRequest) -> Job:
    """Admit ``req`` (local models only; raises the manager's PoolError); its job."""
    job = Job(req)
    manager.submit(job, allow_remote=False)
    return job


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

    def result(self) -> tuple[list[str], Done]:
        """Every delta and the result; raises the job's error."""
        assert self.terminal_events == 1 and self.events_after_end == 0, self
        if self.error is not None:
            raise self.error
        assert self.done is not None
        return self.deltas, self.done


async def collect(job: Job) -> Outcome:
    """Drain a job's whole event stream (until the channel closes), counting its ends."""
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


async def result(job: Job) -> tuple[list[str], Done]:
    """Every delta of ``job``, then its result (exactly one end); raises the job's error."""
    return (await collect(job)).result()


async def run(manager: PoolManager, req: GenerationRequest) -> tuple[list[str], Done]:
    """:func:`submit` ``req`` and wait for its :func:`result`."""
    return await result(submit(manager, req))


def task_tree(*, depth: bool = False) -> list[str]:
    """Every task of this trio run, depth first (as ``"<depth>:<name>"`` with ``depth``)."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task, level: int) -> None:
        names.append(f"{level}:{task.name}" if depth else task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, level + 1)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    walk(root, 0)
    return names
