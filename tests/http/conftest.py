"""Fixtures for the HTTP and admin contract tests (see ``pool_http_kit``)."""

from __future__ import annotations

import pytest
import trio
from pool_http_kit import FakeControl, Pool, start_pool


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No settings path from the developer's shell leaks into a test."""
    for var in ("LLM_POOL_SETTINGS_PATH", "LLM_POOL_LOCAL_SETTINGS_PATH"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def control() -> FakeControl:
    return FakeControl()


@pytest.fixture
async def pool(nursery: trio.Nursery, control: FakeControl) -> Pool:
    """One loaded fake model ``m`` (1 replica, replica_max 3)."""
    return await start_pool(nursery, control)
