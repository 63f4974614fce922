"""Fixtures for the operator-surface tests (see ``ops_kit``).

Tests on trio's autojump clock use only event-driven fakes; ``/metrics`` reads GPUs on a worker
thread, during which virtual time may leap to the next timer, so no test holds a job with a timer
across a scrape.  The browser test runs a real server on the real clock.
"""

from __future__ import annotations

import pytest
import trio
from ops_kit import GateControl


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No settings path from the developer's shell leaks into a test."""
    for var in ("LLM_POOL_SETTINGS_PATH", "LLM_POOL_LOCAL_SETTINGS_PATH"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def control() -> GateControl:
    return GateControl()


#: Virtual seconds after which an autojump test counts as hung (a lost wake-up).
HANG_AFTER_S = 100_000.0


@pytest.fixture
async def watchdog(nursery: trio.Nursery) -> None:
    """Fail an autojump test that deadlocks instead of letting it hang."""

    async def bark() -> None:
        await trio.sleep(HANG_AFTER_S)
        raise AssertionError(f"test still running after {HANG_AFTER_S:g} virtual seconds: hung")

    nursery.start_soon(bark)
