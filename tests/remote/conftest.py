"""Fixtures for the remote-backend tests (real clock, real sockets on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from remote_kit import KEY, KEY_ENV, RemotePool, StartPool, start_remote_pool, start_upstream
from support.upstream import FakeUpstream


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The upstream key in its variable."""
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
async def up(nursery: trio.Nursery) -> FakeUpstream:
    """A fake upstream on 127.0.0.1:<ephemeral> expecting ``KEY``."""
    return await start_upstream(nursery)


@pytest.fixture
async def start(nursery: trio.Nursery, up: FakeUpstream, tmp_path: Path) -> AsyncIterator[StartPool]:
    """``pool = await start(**model_overrides)``: a pool server in front of ``up``, its files in
    ``tmp_path``; the test clients are closed at the end."""
    pools: list[RemotePool] = []

    async def _start(**kw: Any) -> RemotePool:
        pool = await start_remote_pool(nursery, up, tmp_path, **kw)
        pools.append(pool)
        return pool

    yield _start
    for pool in pools:
        await pool.client.aclose()
