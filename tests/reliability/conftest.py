"""Fixtures of the reliability suites (R1–R4, issue 9).

Every suite runs in a bounded CI form by default; ``pytest --long`` (the option is declared in
tests/conftest.py, where pytest reads options) runs the long forms.  The ``reliability`` marker
selects the suites (``-m reliability``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from models.tiny_gguf import write_tiny_gguf


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability: the reliability suites of issue 9 (R1–R4); --long for long forms")


@pytest.fixture
def long(request: pytest.FixtureRequest) -> bool:
    """True under ``--long``: the suites size themselves from this."""
    return bool(request.config.getoption("--long"))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real tiny deterministic GGUF (tests/models/tiny_gguf.py), written once per session."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make install`)")
    return write_tiny_gguf(tmp_path_factory.mktemp("reliability") / "tiny.gguf")


@pytest.fixture
def short_thread_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """trio keeps a finished worker thread cached for 10 s before it exits; shorten that so a
    test can require ``threading.active_count()`` back at its baseline soon after a server
    stopped (a thread alive after that still runs something: a leak)."""
    from trio._core import _thread_cache

    monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.1)

