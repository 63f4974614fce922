"""Shared pytest setup: options, and the fixtures every suite may use.

tests/ has no ``__init__.py``: with pytest's default "prepend" import mode (and ``pythonpath``
in pyproject.toml) tests/ is on ``sys.path``, so test modules anywhere below import the shared
helpers as ``support.*`` (see tests/support/__init__.py).  Fixtures that only one area needs
live beside its tests.
"""

from __future__ import annotations

import pytest
import trio
from support.fake_backend import FakeBackendFactory

#: Virtual seconds after which an autojump test counts as hung (a lost wake-up or a job that
#: never ends).
HANG_AFTER_S = 100_000.0


def pytest_addoption(parser):  # type: ignore[no-untyped-def]
    """``--long``: the long forms of the reliability suites (tests/reliability)."""
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the long forms of the reliability suites (more requests, more fuzz cases)",
    )


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No settings path from the developer's shell leaks into a test, nor the user's tuning cache."""
    for var in ("LLM_POOL_SETTINGS_PATH", "LLM_POOL_LOCAL_SETTINGS_PATH"):
        monkeypatch.delenv(var, raising=False)
    # tuning (issue 21): no test reads or writes the user's tuning cache
    monkeypatch.setenv("LLM_POOL_TUNE_CACHE_DIR", str(tmp_path_factory.mktemp("tune-cache")))


@pytest.fixture
def control() -> FakeBackendFactory:
    """The fake backends of one test: echo text, 10 ms after each chunk (see support.fake_backend)."""
    return FakeBackendFactory.echo()


@pytest.fixture
async def watchdog(nursery: trio.Nursery) -> None:
    """Fail an autojump test that deadlocks instead of letting it hang (virtual time jumps to
    this deadline as soon as every task is blocked for good)."""

    async def bark() -> None:
        await trio.sleep(HANG_AFTER_S)
        raise AssertionError(f"test still running after {HANG_AFTER_S:g} virtual seconds: hung")

    nursery.start_soon(bark)
