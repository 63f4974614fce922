"""Structured output and tool calling on the real llama-server (issue 16): the pool renders and
tokenizes the prompt as for in-process GGUF and sends the same llama.cpp grammar with the token
ids to ``/completion``; the answers are checked through a real pool server.

Real clock, real child process, real loopback sockets; bounded by ``trio.fail_after``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio
from llama_server_kit import binary_or_skip
from support.server import running_server
from support.settings import make_settings
from support.structured import check_response_formats, check_tool_calls

BINARY = binary_or_skip()

from models.tiny_gguf import write_tiny_gguf  # noqa: E402

LIMIT_S = 120


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
async def base(tiny_gguf: Path) -> AsyncIterator[str]:
    tiny = {
        "model_path": str(tiny_gguf),
        "backend": "llama_server",
        "prompt_format": "generic",
        "llama_server_n_ctx": 2048,
        "n_threads": 1,
    }
    raw = {"service": {"host": "127.0.0.1", "port": 0}, "engine": {"models": {"tiny": tiny}}}
    with trio.fail_after(LIMIT_S):
        async with running_server(make_settings(raw=raw)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=LIMIT_S) as client:
                r = await client.post("/v1/admin/models/tiny/load", json={})
                assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
            yield url


async def test_response_formats_and_tool_calls_are_enforced(base: str) -> None:
    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient(base_url=base, timeout=LIMIT_S) as client:
            await check_response_formats(client, "tiny")
            await check_tool_calls(client, "tiny")
