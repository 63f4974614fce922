"""Fixtures for the HTTP and admin contract tests (``control`` is tests/conftest.py's)."""

from __future__ import annotations

import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.server import Pool, start_pool


@pytest.fixture
async def pool(nursery: trio.Nursery, control: FakeBackendFactory) -> Pool:
    """One loaded fake model ``m`` (1 replica, replica_max 3)."""
    return await start_pool(nursery, control)
