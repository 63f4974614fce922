"""Starting the pool for a test, two ways, over the same settings builder and fake backend:

* :func:`start_pool`: a :class:`PoolManager` in the test's nursery and its quart app, driven
  through quart's in-memory test client (:class:`Pool`): no socket, safe under the autojump clock;
* :func:`start_server`: ``pool.server.serve`` (hypercorn + manager) on the settings' address
  (127.0.0.1, port 0) in a nursery, its base URL; :func:`running_server` (in a nursery of its
  own, stopped at exit) and :func:`server_in_thread` (in a thread of its own, for a test that
  blocks, e.g. a browser) are that same start.

Real sockets mean the real clock: such a test bounds every step with ``trio.fail_after``.
"""

from __future__ import annotations

import functools
import json
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from llm_pool.config import Settings
from llm_pool.pool.http import create_app
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.server import serve
from support.fake_backend import FakeBackendFactory
from support.replies import Reply, StreamReply
from support.settings import make_settings

#: The models of :func:`start_pool` when neither ``models`` nor ``raw`` name any.
DEFAULT_MODELS: dict[str, Any] = {"m": {"replica_max": 3}}
RESPONSES = "/v1/responses"


# --------------------------------------------------------------------------- in memory
@dataclass
class Pool:
    """A running manager and its app, spoken to through quart's test client."""

    manager: PoolManager
    app: Any
    client: Any
    settings: Settings
    control: FakeBackendFactory

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
        """POST ``body`` to /v1/responses."""
        return await self.post(RESPONSES, body, **kw)

    async def ask(self, text: str, model: str = "m", **fields: Any) -> Reply:
        """POST /v1/responses ``{"model": model, "input": text, **fields}``."""
        return await self.respond({"model": model, "input": text, **fields})

    async def stream(
        self, body: dict[str, Any], *, path: str = RESPONSES, headers: dict[str, str] | None = None
    ) -> StreamReply:
        """POST ``body`` to ``path`` and read the whole response chunk by chunk (quart's
        buffered ``open`` would block on a long stream)."""
        out = StreamReply()
        async for _ in self.stream_chunks(body, out, path=path, headers=headers):
            pass
        return out

    async def stream_chunks(  # type: ignore[no-untyped-def]
        self, body: dict[str, Any], out: StreamReply, *, path: str = RESPONSES, headers: dict[str, str] | None = None
    ):
        """Yield each chunk as it arrives, recording it (and the status) in ``out``."""
        conn = self.client.request(path, method="POST", headers={"Content-Type": "application/json", **(headers or {})})
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
        out.status = conn.status_code
        out.headers = conn.headers

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


async def start_pool(
    nursery: trio.Nursery,
    control: FakeBackendFactory | None = None,
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
    """A running manager (in ``nursery``) over ``factory`` (default: ``control``, itself by
    default an echo :class:`FakeBackendFactory`) and its app; by default ``wait`` for the
    autoloads.  ``settings``, else :func:`make_settings` of ``models`` and ``raw`` (with
    :data:`DEFAULT_MODELS` when neither names a model)."""
    control = control if control is not None else FakeBackendFactory.echo()
    if settings is None:
        if models is None and "models" not in (raw or {}).get("engine", {}):
            models = DEFAULT_MODELS
        settings = make_settings(models, raw, base_dir=base_dir)
    manager = PoolManager(settings, backend_factory=factory or control, config_path=config_path)
    await nursery.start(functools.partial(manager.run, autoload=autoload))
    app = create_app(manager, settings)
    pool = Pool(manager, app, app.test_client(), settings, control)
    if wait:
        for entry in manager.entries.values():
            if entry.state == "loading":
                await entry.load_done.wait()
    return pool


# --------------------------------------------------------------------------- over a socket
async def start_server(
    nursery: trio.Nursery,
    settings: Settings,
    *,
    factory: Callable[[Any], Any] | None = None,
    config_path: str | None = None,
) -> str:
    """``pool.server.serve`` in ``nursery`` (no signal handlers); its base URL once it listens."""
    url: str = await nursery.start(
        functools.partial(serve, settings, backend_factory=factory, config_path=config_path, handle_signals=False)
    )
    return url


@asynccontextmanager
async def running_server(settings: Settings, factory: Callable[[Any], Any] | None = None, **kw: Any) -> AsyncIterator[str]:
    """:func:`start_server` in a nursery of this task; yields the base URL.  At exit the server's
    nursery is cancelled and this waits until every task of it ended (hypercorn, the manager,
    each model's nursery and each replica's worker thread)."""
    async with trio.open_nursery() as nursery:
        base = await start_server(nursery, settings, factory=factory, **kw)
        try:
            yield base
        finally:
            nursery.cancel_scope.cancel()


@contextmanager
def server_in_thread(settings: Settings, factory: Callable[[Any], Any] | None = None, *, start_timeout_s: float = 30.0) -> Iterator[str]:
    """:func:`start_server` in a trio run of a background thread (real clock), for a test whose
    own thread blocks; yields the base URL; stops the server at exit."""
    started: queue.Queue[Any] = queue.Queue()
    handles: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            handles["token"] = trio.lowlevel.current_trio_token()
            handles["scope"] = nursery.cancel_scope
            started.put(await start_server(nursery, settings, factory=factory))

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            started.put(e)

    thread = threading.Thread(target=run, name="llm-pool test server", daemon=True)
    thread.start()
    got = started.get(timeout=start_timeout_s)
    if isinstance(got, BaseException):
        raise got
    try:
        yield got
    finally:
        trio.from_thread.run_sync(handles["scope"].cancel, trio_token=handles["token"])
        thread.join(timeout=30)
        assert not thread.is_alive(), "the test server did not stop"
