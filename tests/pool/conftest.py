"""Fixtures for the pool runtime tests (virtual time only: request ``autojump_clock`` too)."""

from __future__ import annotations

import pytest
import trio

#: Virtual seconds after which a test counts as hung (a lost wake-up or a job that never ends).
HANG_AFTER_S = 100_000.0


@pytest.fixture
async def watchdog(nursery: trio.Nursery) -> None:
    """Fail a test that deadlocks instead of letting it hang (with the autojump clock, virtual
    time jumps to this deadline as soon as every task is blocked for good)."""

    async def bark() -> None:
        await trio.sleep(HANG_AFTER_S)
        raise AssertionError(f"test still running after {HANG_AFTER_S:g} virtual seconds: hung")

    nursery.start_soon(bark)
