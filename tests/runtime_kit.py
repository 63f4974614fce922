"""Helpers for tests that drive a real backend through the real PoolManager, in-process: build a
request, submit it as the HTTP route would, and collect its deltas and result."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from llm_pool.config import Settings
from llm_pool.pool.jobs import Decoding, Delta, Done, GenerationRequest, Job, Message
from llm_pool.pool.manager import PoolManager


@asynccontextmanager
async def serving(settings: Settings, *load: str) -> AsyncIterator[PoolManager]:
    """A PoolManager running in its own nursery, with the models ``load`` loaded; stopped at exit."""
    manager = PoolManager(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        for name in load:
            await manager.load(name)
        yield manager
        nursery.cancel_scope.cancel()


def request(text: str, model: str = "tiny", **decoding: Any) -> GenerationRequest:
    """One user turn, greedy, 5 tokens unless ``decoding`` says otherwise."""
    return GenerationRequest(
        model=model,
        messages=[Message(role="user", content=text)],
        decoding=Decoding(**{"temperature": 0.0, "max_tokens": 5, **decoding}),
    )


def submit(manager: PoolManager, req: GenerationRequest) -> Job:
    job = Job(req)
    manager.submit(job, allow_remote=False)
    return job


async def collect(job: Job) -> tuple[list[str], Done]:
    """Every delta, then the result; raises the job's error."""
    deltas: list[str] = []
    async for event in job.events():
        if isinstance(event, Delta):
            deltas.append(event.text)
        elif isinstance(event, Done):
            return deltas, event
        else:
            raise event.error
    raise AssertionError("no result")


async def run(manager: PoolManager, req: GenerationRequest) -> tuple[list[str], Done]:
    return await collect(submit(manager, req))
