"""Replicas that heal (pool/scheduler.py): a replica whose worker died restarts with backoff.

Async replicas (the FakeBackend) run on the autojump clock; the threaded replica test runs a real
worker thread, so it uses the real clock, synchronised with events and bounded by ``fail_after``.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from pool_harness import Clients, check_ok, submit
from support.fake_backend import FakeBackendFactory
from support.runtime import make_job, running_manager
from support.settings import make_settings
from trio.testing import wait_all_tasks_blocked

from llm_pool.pool.jobs import GenerationStats, Job
from llm_pool.pool.scheduler import ModelRuntime

M = {"model_path": "fake-model.gguf"}


@asynccontextmanager
async def healing(
    replicas: int, *, max_attempts: int = 3, backoff: float = 2.0, **knobs: Any
) -> AsyncIterator[tuple[ModelRuntime, FakeBackendFactory, Clients, list[str]]]:
    factory = FakeBackendFactory(token_delay=1.0, **knobs)
    restarts: list[str] = []
    runtime = ModelRuntime(
        "m", make_backend=factory.for_runtime("m"), target_inflight=1, max_queue=100,
        restart_max_attempts=max_attempts, restart_backoff_s=backoff, on_restart=lambda: restarts.append("m"),
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        loaded = trio.Event()
        nursery.start_soon(functools.partial(runtime.run, replicas, on_loaded=loaded.set))
        await loaded.wait()
        yield runtime, factory, Clients(nursery), restarts
        await runtime.stop(drain_timeout=0)


def start(runtime: ModelRuntime, clients: Clients, text: str, max_tokens: int) -> Job:
    job = make_job("m", text, max_tokens)
    runtime.submit_nowait(job)
    return clients.start(job)


async def test_a_dead_async_replica_restarts_after_its_backoff(autojump_clock: Any, watchdog: None) -> None:
    async with healing(1) as (runtime, factory, clients, restarts):
        (replica,) = runtime.replicas
        running = start(runtime, clients, "a", 5)
        await trio.sleep(1.5)
        factory.backends[0].kill("boom")
        await wait_all_tasks_blocked()
        assert clients.outcome(running).error.message == "model 'm' failed: runtime died: RuntimeError: boom"
        assert (replica.state, replica.error, restarts) == ("restarting", "runtime died: RuntimeError: boom", ["m"])
        waiting = start(runtime, clients, "b", 2)  # no free slot while it restarts: it waits
        await trio.sleep(1.9)
        assert waiting.state == "queued" and runtime.admitting
        await trio.sleep(0.2)  # the 2 s backoff is over: a new backend loaded and took the job
        assert (replica.state, replica.error, waiting.replica) == ("serving", None, "m#1")
        assert len(factory.backends) == 2 and factory.backends[0].closed
        await clients.wait_idle()
        check_ok(clients.outcome(waiting), 2)
        clients.assert_all_ended_once()


async def test_restart_attempts_double_and_then_the_model_fails(autojump_clock: Any, watchdog: None) -> None:
    async with trio.open_nursery() as outer:
        factory = FakeBackendFactory(token_delay=1.0)
        runtime = ModelRuntime(
            "m", make_backend=factory.for_runtime("m"), target_inflight=1, max_queue=10,
            restart_max_attempts=3, restart_backoff_s=1.0,
        )  # fmt: skip
        loaded = trio.Event()
        outer.start_soon(functools.partial(runtime.run, 1, on_loaded=loaded.set))
        await loaded.wait()
        factory.configure("m", fail_load="no GPU")  # every new backend fails to load
        t0 = trio.current_time()
        factory.backends[0].kill("boom")
        await runtime.finished.wait()
        assert trio.current_time() - t0 == 1.0 + 2.0 + 4.0  # three attempts, doubling
        assert [b.replica_index for b in factory.backends] == [1, 1, 1, 1]
        assert runtime.last_error == (
            "runtime died and 3 restart attempt(s) failed; last: restart failed: RuntimeError: no GPU"
        )
        assert not runtime.admitting


async def test_the_manager_counts_restarts_and_heals_the_model(autojump_clock: Any, watchdog: None) -> None:
    factory = FakeBackendFactory(token_delay=1.0)
    settings = make_settings({"m": {**M, "replicas": 2, "replica_max": 2, "restart_backoff_s": 0.5}})
    async with running_manager(settings, factory) as (manager, nursery):
        await manager.load("m")
        clients = Clients(nursery)
        factory.backends[0].kill("segfault")
        factory.backends[1].kill("segfault")
        await trio.sleep(0.1)
        entry = manager.entry("m")
        assert (entry.state, entry.replica_restarts) == ("loaded", 2)
        job = submit(manager, clients, "m", "a", 2)
        await clients.wait_idle()
        check_ok(clients.outcome(job), 2)
        assert entry.state == "loaded" and len(factory.live("m")) == 2


class DyingThreadedBackend:
    """A threaded backend whose serve raises on the input ``die`` (its worker thread ends)."""

    threaded = True
    crashed = False
    capability = 1

    def __init__(self, made: list[DyingThreadedBackend]) -> None:
        self.thread: int | None = None
        made.append(self)

    def load(self) -> None:
        self.thread = threading.get_ident()

    def serve(self, inbox: queue.SimpleQueue[Job | None]) -> None:
        while (job := inbox.get()) is not None:
            if job.request.input == "die":
                raise MemoryError("native code ran out of memory")
            job.begin()
            job.emit("ok")
            job.finish(GenerationStats(finish_reason="stop", output_tokens=1))

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, object]:
        return {}


async def test_a_threaded_replica_whose_worker_died_restarts_with_a_new_backend() -> None:
    made: list[DyingThreadedBackend] = []
    restarted = trio.Event()
    runtime = ModelRuntime(
        "t", make_backend=lambda index: DyingThreadedBackend(made), target_inflight=1, max_queue=10,  # type: ignore[arg-type,return-value]
        restart_max_attempts=2, restart_backoff_s=0.0, on_restart=restarted.set,
    )  # fmt: skip
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            loaded = trio.Event()
            nursery.start_soon(functools.partial(runtime.run, 1, on_loaded=loaded.set))
            await loaded.wait()
            clients = Clients(nursery)
            doomed = make_job("t", "die")
            runtime.submit_nowait(doomed)
            out = await clients.request(doomed)
            assert (out.error.status, out.error.code, out.error.message) == (
                502, "backend_error", "model 't' failed: runtime died: MemoryError: native code ran out of memory"
            )  # fmt: skip
            await restarted.wait()
            fine = make_job("t", "hello")
            runtime.submit_nowait(fine)  # waits while the new thread loads, then runs there
            out = await clients.request(fine)
            assert out.done is not None and out.done.text == "ok"
            assert runtime.replicas[0].state == "serving"
            # a new backend, loaded on a worker thread (trio's thread cache may reuse the OS thread)
            assert len(made) == 2 and made[1].thread not in (None, threading.get_ident())
            await runtime.stop(drain_timeout=0)
