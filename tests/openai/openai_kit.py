"""Helpers for the OpenAI-compatibility tests (see ``conftest.py`` beside this file)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")
#: Every SDK call and every test step is bounded by this many seconds (real clock).
BOUND = 10.0
REMOTE_KEY_ENV = "LLMPOOL_TEST_OPENAI_REMOTE_KEY"
#: ``m``: a local model (generic ChatML prompt format); ``r``: a remote (openai_compatible)
#: model, which needs ``allow_remote``.  Both run on the fake backend.
REMOTE: dict[str, Any] = {
    "backend": "openai_compatible",
    "remote_base_url": "http://127.0.0.1:9/v1",
    "remote_model": "gpt-test",
    "remote_api_key_env": REMOTE_KEY_ENV,
}
MODELS: dict[str, Any] = {"m": {"model_path": "m.gguf", "replicas": 1, "replica_max": 2}, "r": REMOTE}


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking SDK call on a worker thread.  The SDK's own ``timeout`` (:data:`BOUND`)
    ends a stuck call; ``fail_after`` reports anything slower."""
    with trio.fail_after(BOUND * 2):
        return await trio.to_thread.run_sync(fn)


# --------------------------------------------------------------------------- quart test client
#: Models of the in-memory pool: ``MODELS`` plus one per prompt format that treats
#: multi-turn differently, and one with a short queue timeout.
CHAT_MODELS: dict[str, Any] = {
    **MODELS,
    "mis": {"model_path": "mis.gguf", "prompt_format": "mistral_template"},
    "tg": {"model_path": "tg.gguf", "prompt_format": "translategemma_template"},
    "q": {"model_path": "q.gguf", "queue_timeout_s": 0.5},
    #: a CTranslate2 model: no per-request seed, no OpenAI penalties (its kind refuses them)
    "c": {"backend": "ct2", "model_path": "c-ct2"},
}
CHAT = "/v1/chat/completions"


async def stream_chat(pool: Any, body: dict[str, Any]) -> tuple[int, Any, bytes]:
    """POST ``body`` (with ``stream: true``) to the chat route through quart's client, read
    chunk by chunk (``support.server.Pool.stream``).  Returns ``(status, headers, raw body)``.
    (A client disconnect is tested over a real socket in ``test_openai_sdk.py``: quart's test
    connection never ends after ``disconnect()``.)"""
    out = await pool.stream({**body, "stream": True}, path=CHAT)
    return out.status, out.headers, out.raw
