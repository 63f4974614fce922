"""Shared helpers for the HTTP, admin, OpenAI-compatibility and ops tests: a deterministic async
fake backend, settings builders, and thin wrappers over quart's in-memory test client.

The fake is an *async* backend (``threaded = False``): it runs in the replica's trio task, so it
is safe under trio's autojump clock (no threads, no sockets).  What it answers is a function of
the request's ``input``:

* ``"wait:<s>"``   one chunk ``"waited"`` after sleeping ``s`` seconds (stop flag checked every
  10 ms of trio time);
* ``"fail"``        emits ``"partial"`` then raises ``RuntimeError("fake backend exploded")``;
* anything else     the input itself, streamed one word per chunk (``"a b c"`` → ``"a"``,
  ``" b"``, ``" c"``), ``step_s`` of trio time between chunks, cut at ``decoding.max_tokens``.
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from llm_pool.config import Settings, decode_settings
from llm_pool.pool.http import create_app
from llm_pool.pool.jobs import GenerationRequest, GenerationStats, Job
from llm_pool.pool.manager import PoolManager

ERROR_KEYS = {"type", "code", "message", "param"}
DETAIL_KEYS = {"code", "model", "message"}
METRIC_KEYS = {
    "engine_queue_wait_ms",
    "backend_inference_wall_ms",
    "engine_total_wall_ms",
    "engine_outside_backend_wall_ms",
    "pool_total_wall_ms",
    "engine_tokenize_ms",
    "gpu_time_to_first_token_ms",
    "gpu_generate_total_ms",
    "gpu_decode_after_first_token_ms",
    "engine_prompt_tokens",
    "engine_output_tokens",
    "engine_tokens_per_second",
}
RESP_ID = re.compile(r"^resp_[0-9a-f]{32}$")


# --------------------------------------------------------------------------- fake backend
@dataclass
class FakeControl:
    """Knobs and records shared by every fake replica of one test."""

    step_s: float = 0.01
    capability: int = 1
    #: model name → seconds its replicas take to load
    load_delay_s: dict[str, float] = field(default_factory=dict)
    #: model name → message its load raises (RuntimeError)
    load_errors: dict[str, str] = field(default_factory=dict)
    seen: list[GenerationRequest] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    #: inputs whose generation ran to its end (EOS / max_tokens)
    finished: list[str] = field(default_factory=list)
    #: inputs whose generation stopped early on the job's stop flag
    cancelled: list[str] = field(default_factory=list)
    #: set each time a job ends (finished or cancelled): lets a test thread wait without polling
    job_ended: threading.Event = field(default_factory=threading.Event)
    contexts: list[Any] = field(default_factory=list)


class FakeBackend:
    threaded = False

    def __init__(self, ctx: Any, control: FakeControl) -> None:
        self.ctx = ctx
        self.control = control
        self.capability = control.capability
        self.name = f"{ctx.name}#{ctx.replica_index}"

    def describe(self) -> dict[str, object]:
        return {"fake": True}

    async def load(self) -> None:
        delay = self.control.load_delay_s.get(self.ctx.name, 0.0)
        if delay:
            await trio.sleep(delay)
        error = self.control.load_errors.get(self.ctx.name)
        if error is not None:
            raise RuntimeError(error)
        self.control.loaded.append(self.name)

    async def close(self) -> None:
        self.control.closed.append(self.name)

    async def serve(self, inbox: trio.MemoryReceiveChannel[Job]) -> None:
        async with trio.open_nursery() as nursery:
            async for job in inbox:
                nursery.start_soon(self._run, job)

    async def _run(self, job: Job) -> None:
        if job.should_stop():
            job.finish(GenerationStats(finish_reason="cancelled", output_tokens=0))
            return
        job.begin()
        self.control.seen.append(job.request)
        self.control.started.append(job.request.input)
        try:
            stats = await self._generate(job)
        except Exception as e:
            job.fail(e)
        else:
            job.finish(stats)
            done = self.control.cancelled if stats.finish_reason == "cancelled" else self.control.finished
            done.append(job.request.input)
            self.control.job_ended.set()

    async def _generate(self, job: Job) -> GenerationStats:
        text = job.request.input
        if text.startswith("wait:"):
            deadline = trio.current_time() + float(text[5:])
            while trio.current_time() < deadline:
                if job.should_stop():
                    return GenerationStats(finish_reason="cancelled", output_tokens=0)
                await trio.sleep(min(0.01, deadline - trio.current_time()))
            job.emit("waited")
            return GenerationStats(finish_reason="stop", prompt_tokens=1, output_tokens=1)
        if text == "fail":
            job.emit("partial")
            await trio.sleep(self.control.step_s)
            raise RuntimeError("fake backend exploded")
        words = re.findall(r"\s*\S+", text) or [text]
        limit = job.request.decoding.max_tokens
        out = 0
        reason = "stop"
        for word in words:
            if job.should_stop():
                reason = "cancelled"
                break
            if out >= limit:
                reason = "length"
                break
            job.emit(word)
            out += 1
            await trio.sleep(self.control.step_s)
        return GenerationStats(
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=len(words),
            output_tokens=out,
            tokenize_ms=0.0,
            time_to_first_token_ms=0.0,
            generate_total_ms=1.0,
            decode_after_first_token_ms=1.0,
        )


class FakeFactory:
    """``PoolManager(settings, backend_factory=FakeFactory(control))``."""

    def __init__(self, control: FakeControl) -> None:
        self.control = control

    def __call__(self, ctx: Any) -> FakeBackend:
        self.control.contexts.append(ctx)
        return FakeBackend(ctx, self.control)


# --------------------------------------------------------------------------- settings
def settings_from(raw: dict[str, Any], base_dir: str | Path = ".") -> Settings:
    return decode_settings(raw, source="test settings", base_dir=str(base_dir))


def default_models() -> dict[str, Any]:
    return {"m": {"model_path": "m.gguf", "replica_max": 3}}


# --------------------------------------------------------------------------- a running pool
@dataclass
class Reply:
    status: int
    headers: Any
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def text(self) -> str:
        return self.raw.decode()


@dataclass
class Pool:
    manager: PoolManager
    app: Any
    client: Any
    settings: Settings
    control: FakeControl

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
    ) -> Reply:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        resp = await self.client.open(path, method=method, data=data, headers=hdrs, query_string=query)
        return Reply(resp.status_code, resp.headers, await resp.get_data())

    async def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("POST", path, body, **kw)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def respond(self, body: dict[str, Any] | None, **kw: Any) -> Reply:
        return await self.post("/v1/responses", body, **kw)

    async def stream(self, body: dict[str, Any], *, headers: dict[str, str] | None = None) -> StreamReply:
        """POST /v1/responses and read the whole response chunk by chunk."""
        out = StreamReply()
        async for _ in self.stream_chunks(body, out, headers=headers):
            pass
        return out

    async def stream_chunks(self, body: dict[str, Any], out: StreamReply, *, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        conn = self.client.request(
            "/v1/responses", method="POST", headers={"Content-Type": "application/json", **(headers or {})}
        )
        async with conn:
            await conn.send(json.dumps(body).encode())
            await conn.send_complete()
            while True:
                try:
                    chunk = await conn.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    break
                out.status = conn.status_code
                out.headers = conn.headers
                out.chunks.append(chunk)
                yield chunk

    async def wait_state(self, name: str, *states: str) -> None:
        """Wait (on the manager's state hooks, not by polling) until ``name`` is in ``states``."""
        while self.manager.entries[name].state not in states:
            changed = trio.Event()

            def hook(entry: Any, before: str, after: str, changed: trio.Event = changed) -> None:
                changed.set()

            self.manager.state_hooks.append(hook)
            try:
                await changed.wait()
            finally:
                self.manager.state_hooks.remove(hook)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Poll (1 ms of trio time) for a condition nothing signals, e.g. a queue depth."""
        while not predicate():  # noqa: ASYNC110 - no event exists for these conditions
            await trio.sleep(0.001)


@dataclass
class StreamReply:
    status: int | None = None
    headers: Any = None
    chunks: list[bytes] = field(default_factory=list)

    @property
    def raw(self) -> bytes:
        return b"".join(self.chunks)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return parse_sse(self.raw)


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Strictly parse ``event: <type>\\ndata: <json>\\n\\n`` frames (nothing else allowed)."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-80:]
    events = []
    for frame in text[:-2].split("\n\n"):
        lines = frame.split("\n")
        assert len(lines) == 2, frame
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), frame
        events.append((lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])))
    return events


def assert_error(reply: Reply, status: int, code: str, message: str | None = None, *, param: Any = ..., model: Any = ...) -> dict[str, Any]:
    """The reply is ``status`` with the two-shaped error body; returns the ``error`` object."""
    assert reply.status == status, (reply.status, reply.raw)
    assert reply.headers["Content-Type"] == "application/json", reply.headers
    body = reply.json
    assert set(body) == {"error", "detail"}, body
    err, detail = body["error"], body["detail"]
    assert set(err) == ERROR_KEYS and set(detail) == DETAIL_KEYS, body
    assert err["code"] == detail["code"] == code, body
    assert err["message"] == detail["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    if message is not None:
        assert err["message"] == message, body
    if param is not ...:
        assert err["param"] == param, body
    if model is not ...:
        assert detail["model"] == model, body
    return err


def to_builtins(x: Any) -> Any:
    return msgspec.to_builtins(x)


async def start_pool(
    nursery: trio.Nursery,
    control: FakeControl,
    raw: dict[str, Any] | None = None,
    *,
    models: dict[str, Any] | None = None,
    base_dir: str | Path = ".",
    autoload: bool = True,
    wait: bool = True,
    config_path: str | None = None,
    factory: Callable[[Any], Any] | None = None,
    settings: Settings | None = None,
) -> Pool:
    """A running manager (in ``nursery``) and its app; by default ``wait`` for the autoloads."""
    if settings is None:
        raw = dict(raw or {})
        engine = dict(raw.get("engine", {}))
        engine.setdefault("models", models if models is not None else default_models())
        raw["engine"] = engine
        settings = settings_from(raw, base_dir)
    manager = PoolManager(settings, backend_factory=factory or FakeFactory(control), config_path=config_path)
    await nursery.start(functools.partial(manager.run, autoload=autoload))
    app = create_app(manager, settings)
    pool = Pool(manager, app, app.test_client(), settings, control)
    if wait:
        for entry in manager.entries.values():
            if entry.state == "loading":
                await entry.load_done.wait()
    return pool
