"""Helpers for the remote-backend tests: a real pool server (``support.server.start_server`` on
127.0.0.1, port 0) in front of a real fake upstream (``support.upstream``), both in the test's
nursery.

Real clock and real sockets (never the autojump clock here); every test bounds itself with
``trio.fail_after``.  The API key is a recognisable secret so a test can grep every response
body and log line for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from support.server import start_server
from support.settings import make_settings
from support.upstream import FakeUpstream, serve_upstream

from llm_pool.config import DEFAULT_SYSTEM_PROMPT
from llm_pool.pool.logs import JsonFormatter

KEY = "sk-test-SECRET-7f3a9c1e5b2d4f60"
KEY_ENV = "LLM_POOL_TEST_REMOTE_KEY"
#: Upper bound of any single test step (seconds of real time).
BOUND = 10
MODEL = "r"

__all__ = [
    "BOUND",
    "DEFAULT_SYSTEM_PROMPT",
    "KEY",
    "KEY_ENV",
    "MODEL",
    "RemotePool",
    "StartPool",
    "start_upstream",
    "start_remote_pool",
]


def remote_model(base_url: str, **over: Any) -> dict[str, Any]:
    return {
        "backend": "openai_compatible",
        "remote_base_url": base_url + "/",  # the trailing slash is stripped
        "remote_api_key_env": KEY_ENV,
        "remote_model": "up-model",
        "target_inflight": 4,
        **over,
    }


async def start_upstream(nursery: trio.Nursery, **knobs: Any) -> FakeUpstream:
    up = FakeUpstream(api_key=KEY)
    for k, v in knobs.items():
        assert hasattr(up, k), k
        setattr(up, k, v)
    await nursery.start(serve_upstream, up)
    return up


@dataclass
class RemotePool:
    url: str
    client: httpx.AsyncClient
    up: FakeUpstream
    base_dir: Path
    #: every response body this test read (for the key-leak checks)
    seen: list[bytes]

    async def respond(self, body: dict[str, Any] | None = None, **fields: Any) -> httpx.Response:
        payload = {"model": MODEL, "input": "hello world!", "allow_remote": True, **(body or {}), **fields}
        r = await self.client.post("/v1/responses", json=payload)
        self.seen.append(r.content)
        return r

    async def row(self, name: str = MODEL) -> dict[str, Any]:
        r = await self.client.get(f"/v1/admin/models/{name}")
        self.seen.append(r.content)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def wait_settled(self, name: str = MODEL) -> dict[str, Any]:
        """Wait until ``name`` is neither loading nor unloading; its admin row."""
        while (row := await self.row(name))["runtime_state"] in ("loading", "unloading"):  # noqa: ASYNC110
            await trio.sleep(0.01)  # polling the server from outside
        return row

    async def wait_idle(self, name: str = MODEL) -> None:
        while (await self.row(name))["runtime_inflight"]:  # noqa: ASYNC110
            await trio.sleep(0.01)  # polling the server from outside

    def ledger(self, name: str = "ledger.jsonl") -> list[dict[str, Any]]:
        """The ledger's events, ``ts`` checked and dropped."""
        path = self.base_dir / name
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            event = json.loads(line)
            ts = event.pop("ts")
            assert isinstance(ts, str) and ts.endswith("Z"), ts
            out.append(event)
        return out


#: The ``start`` fixture: ``pool = await start(**model_overrides)``.
StartPool = Callable[..., Awaitable["RemotePool"]]


async def start_remote_pool(
    nursery: trio.Nursery,
    up: FakeUpstream,
    base_dir: Path,
    *,
    models: dict[str, Any] | None = None,
    wait: bool = True,
    **over: Any,
) -> RemotePool:
    """Serve a pool with model ``r`` (remote, ``over`` applied) or ``models`` on port 0."""
    assert up.base_url is not None
    raw = {
        "service": {"host": "127.0.0.1", "port": 0, "log_level": "debug"},
        "engine": {"models": models if models is not None else {MODEL: remote_model(up.base_url, **over)}},
    }
    settings = make_settings(raw=raw, base_dir=base_dir)
    url = await start_server(nursery, settings)
    client = httpx.AsyncClient(base_url=url, timeout=BOUND, verify=False)  # plain http; skips loading CAs
    pool = RemotePool(url, client, up, base_dir, [])
    if wait:
        for name in settings.engine.models:
            await pool.wait_settled(name)
    return pool


def formatted_logs(records: list[logging.LogRecord]) -> list[str]:
    fmt = JsonFormatter()
    return [fmt.format(r) + repr(r.__dict__) for r in records]
