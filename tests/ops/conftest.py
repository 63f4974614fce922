"""Fixtures for the operator-surface tests (see ``ops_kit``).

Tests on trio's autojump clock use only event-driven fakes; ``/metrics`` reads GPUs on a worker
thread, during which virtual time may leap to the next timer, so no test holds a job with a timer
across a scrape: their fake backends emit at once (``token_delay=0``), and a job is held by the
``"hold"`` input (an event) instead.  The browser test runs a real server on the real clock.
"""

from __future__ import annotations

import pytest
from support.fake_backend import FakeBackendFactory


@pytest.fixture
def control() -> FakeBackendFactory:
    """Echo text with no delay (no timer in any job); ``"hold"`` holds until ``release()``."""
    return FakeBackendFactory.echo(token_delay=0)
