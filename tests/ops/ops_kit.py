"""Helpers for the operator-surface tests (metrics, health, OpenAPI, idle unload, status page).

:class:`GateBackend` is an async fake (``threaded = False``, safe under the autojump clock) whose
jobs are held by *events*, never by timers: ``/metrics`` reads GPUs on a worker thread, and while
a thread runs the autojump clock leaps to the next timer, so a job held by a sleep could finish
in the middle of a scrape.  Inputs:

* ``"hold"``  emits ``"held"``, then waits until the test calls :meth:`GateControl.release` (or
  the job's stop flag is set: it then finishes with ``finish_reason="cancelled"``);
* ``"fail"``  emits ``"partial"``, then raises ``RuntimeError("gate backend exploded")``;
* anything else: the input's words, one chunk each, at once.

Stats: ``prompt_tokens`` = words in the input, ``output_tokens`` = chunks emitted.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import trio
from pool_http_kit import Reply
from prometheus_client.parser import text_string_to_metric_families

from llm_pool.config import Settings, decode_settings
from llm_pool.pool.http import create_app
from llm_pool.pool.jobs import GenerationStats, Job
from llm_pool.pool.manager import PoolManager


@dataclass
class GateControl:
    gate: trio.Event = field(default_factory=trio.Event)
    #: model name → virtual seconds each replica's load takes
    load_delay_s: dict[str, float] = field(default_factory=dict)
    #: model name → an event each replica's load waits for (loads held by events, not timers)
    load_gates: dict[str, trio.Event] = field(default_factory=dict)
    #: model name → message its load raises
    load_errors: dict[str, str] = field(default_factory=dict)
    capability: int = 1
    held: int = 0

    def release(self) -> None:
        """Let every held job (now and later) finish."""
        self.gate.set()


class GateBackend:
    threaded = False

    def __init__(self, ctx: Any, control: GateControl) -> None:
        self.ctx = ctx
        self.control = control
        self.capability = control.capability

    def describe(self) -> dict[str, object]:
        return {"fake": True}

    async def load(self) -> None:
        delay = self.control.load_delay_s.get(self.ctx.name, 0.0)
        await trio.sleep(delay)
        gate = self.control.load_gates.get(self.ctx.name)
        if gate is not None:
            await gate.wait()
        error = self.control.load_errors.get(self.ctx.name)
        if error is not None:
            raise RuntimeError(error)

    async def close(self) -> None:
        await trio.lowlevel.checkpoint()

    async def serve(self, inbox: trio.MemoryReceiveChannel[Job | None]) -> None:
        async with trio.open_nursery() as nursery:
            async for job in inbox:
                if job is None:
                    break
                nursery.start_soon(self._run, job)

    async def _run(self, job: Job) -> None:
        try:
            if job.should_stop():
                job.finish(GenerationStats(finish_reason="cancelled", output_tokens=0))
                return
            job.begin()
            text = job.request.input
            prompt = len(text.split())
            if text == "hold":
                job.emit("held")
                self.control.held += 1
                try:
                    while not self.control.gate.is_set():
                        if job.should_stop():
                            job.finish(GenerationStats(finish_reason="cancelled", prompt_tokens=prompt, output_tokens=1))
                            return
                        with trio.move_on_after(1.0):  # the stop flag is a threading.Event: poll it
                            await self.control.gate.wait()
                finally:
                    self.control.held -= 1
                job.finish(GenerationStats(finish_reason="stop", prompt_tokens=prompt, output_tokens=1))
                return
            if text == "fail":
                job.emit("partial")
                await trio.lowlevel.checkpoint()
                raise RuntimeError("gate backend exploded")
            words = text.split() or [text]
            for i, word in enumerate(words):
                job.emit(word if i == 0 else " " + word)
            job.finish(GenerationStats(finish_reason="stop", prompt_tokens=prompt, output_tokens=len(words)))
        except Exception as e:
            job.fail(e)
        finally:
            if not job.ended:  # the replica's scope was cancelled (unload past its drain)
                if job.cancel_error is not None:
                    job.fail(job.cancel_error)
                else:
                    job.finish(GenerationStats(finish_reason="cancelled", output_tokens=0))


def settings_of(models: dict[str, dict[str, Any]], **service: Any) -> Settings:
    raw: dict[str, Any] = {
        "engine": {"backend": "gguf", "models": {n: {"model_path": f"{n}.gguf", **m} for n, m in models.items()}}
    }
    if service:
        raw["service"] = service
    return decode_settings(raw, source="test settings")


@dataclass
class Ops:
    manager: PoolManager
    app: Any
    control: GateControl

    async def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
        client = self.app.test_client()
        data = None if body is None else json.dumps(body).encode()
        resp = await client.open(
            path, method=method, data=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        return Reply(resp.status_code, resp.headers, await resp.get_data())

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("POST", path, body, **kw)

    async def respond(self, text: str, model: str = "m", **extra: Any) -> Reply:
        return await self.post("/v1/responses", {"model": model, "input": text, **extra})

    async def scrape(self) -> Samples:
        reply = await self.get("/metrics")
        assert reply.status == 200, reply.raw
        return Samples.parse(reply.text)

    async def wait_until(self, predicate: Any) -> None:
        """Poll (1 ms of trio time) for a condition nothing signals, e.g. a queue depth."""
        while not predicate():  # noqa: ASYNC110 - no event exists for these conditions
            await trio.sleep(0.001)


@dataclass
class Samples:
    """A parsed exposition: ``samples[name, {labels}]``."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]
    text: str

    @classmethod
    def parse(cls, text: str) -> Samples:
        values = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                values[(s.name, frozenset(s.labels.items()))] = s.value
        return cls(values, text)

    def __call__(self, metric: str, /, **labels: str) -> float:
        key = (metric, frozenset(labels.items()))
        assert key in self.values, f"no sample {metric}{labels} in:\n{self.text}"
        return self.values[key]

    def names(self) -> set[str]:
        return {name for name, _ in self.values}


async def start_ops(
    nursery: trio.Nursery,
    models: dict[str, dict[str, Any]] | None = None,
    *,
    control: GateControl | None = None,
    settings: Settings | None = None,
    autoload: bool = True,
    wait: bool = True,
) -> Ops:
    """A running manager (in ``nursery``) over :class:`GateBackend`, and its app."""
    control = control or GateControl()
    settings = settings or settings_of(models or {"m": {"max_queue": 1, "replica_max": 2}})
    manager = PoolManager(settings, backend_factory=lambda ctx: GateBackend(ctx, control))
    await nursery.start(functools.partial(manager.run, autoload=autoload))
    app = create_app(manager, settings)
    if wait:
        for entry in manager.entries.values():
            if entry.state == "loading":
                await entry.load_done.wait()
    return Ops(manager, app, control)
