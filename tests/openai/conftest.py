"""Fixtures for the OpenAI-compatibility tests: the official ``openai`` SDK against a real
server (``test_openai_sdk.py``, real clock, every step bounded), and quart's in-memory client for
exact wire shapes (the other modules, autojump clock).

Both use the echo fake of ``support.fake_backend`` (the ``control`` fixture of tests/conftest.py:
it echoes its input one word per chunk; ``"fail"`` fails after one chunk; ``"wait:<s>"`` sleeps).

The SDK runs as its *sync* client on a worker thread (``trio.to_thread.run_sync``): its async
client leaves its SSE async generators (``openai._streaming``, ``httpx2``, ``httpcore2``) to the
garbage collector when a stream ends at ``[DONE]``, which trio reports as ResourceWarnings at
random later points.  The sync client has no async generators, so no warning needs a filter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import openai
import pytest
import trio
from openai_kit import BOUND, CHAT_MODELS, MODELS, REMOTE_KEY_ENV, in_thread
from support.fake_backend import FakeBackendFactory
from support.server import Pool, start_pool, start_server
from support.settings import make_settings


@pytest.fixture(autouse=True)
def _remote_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """The remote model's key is set."""
    monkeypatch.setenv(REMOTE_KEY_ENV, "sk-test")


@pytest.fixture
async def server(nursery: trio.Nursery, control: FakeBackendFactory) -> str:
    """``pool.server.serve`` on 127.0.0.1:<ephemeral> (models :data:`openai_kit.MODELS`); its URL."""
    settings = make_settings(raw={"service": {"host": "127.0.0.1", "port": 0}, "engine": {"models": MODELS}})
    with trio.fail_after(BOUND):
        return await start_server(nursery, settings, factory=control)


@pytest.fixture
async def client(server: str) -> AsyncIterator[openai.OpenAI]:
    """The SDK pointed at ``server``, once both models are loaded.  No retries: a retried 409
    or 5xx would hide what the pool answered."""
    sdk = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=BOUND)
    try:
        # the models load in the background; an admin load of a loading model waits for that
        # load to end (the manager's load event) and answers the model's row
        with trio.fail_after(BOUND):
            async with httpx.AsyncClient(base_url=server, timeout=BOUND) as http:
                for name in sorted(MODELS):
                    r = await http.post(f"/v1/admin/models/{name}/load", json={})
                    assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
        assert sorted(m.id for m in await in_thread(sdk.models.list)) == ["m", "r"], "the models did not load"
        yield sdk
    finally:
        sdk.close()


@pytest.fixture
async def pool(nursery: trio.Nursery, control: FakeBackendFactory) -> Pool:
    """An in-memory pool (quart's test client) with :data:`openai_kit.CHAT_MODELS` loaded."""
    return await start_pool(nursery, control, models=CHAT_MODELS)
