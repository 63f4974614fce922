"""Structured output and tool calling on the tiny generated GGUF through a real server (issue 16):
llama.cpp grammars built from the request's schema, in the one-at-a-time backend and in the
batched one (where each sequence samples through its own grammar), and the official SDK.

Real clock, real sockets on 127.0.0.1 port 0, real llama.cpp threads; bounded by fail_after.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from support.server import running_server
from support.settings import make_settings
from support.structured import (
    CHAT,
    RESPONSE_FORMAT,
    TOOLS,
    assert_schema_answer,
    chat_body,
    check_response_formats,
    check_tool_calls,
)

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make install`)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.tiny_gguf import write_tiny_gguf  # noqa: E402

LIMIT_S = 120


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def settings(path: Path, **model: Any) -> Any:
    tiny = {"model_path": str(path), "backend": "gguf", "prompt_format": "generic", "gguf_n_ctx": 2048, "n_threads": 1, **model}
    return make_settings(raw={"service": {"host": "127.0.0.1", "port": 0}, "engine": {"models": {"tiny": tiny}}})


@pytest.fixture(params=[{}, {"gguf_batching": True, "target_inflight": 2}], ids=["sequential", "batched"])
async def base(tiny_gguf: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    with trio.fail_after(LIMIT_S):
        async with running_server(settings(tiny_gguf, **request.param)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=LIMIT_S) as client:
                r = await client.post("/v1/admin/models/tiny/load", json={})
                assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
            yield url


async def test_response_formats_are_enforced(base: str) -> None:
    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient(base_url=base, timeout=LIMIT_S) as client:
            await check_response_formats(client, "tiny")


async def test_forced_tool_calls_and_the_turn_after(base: str) -> None:
    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient(base_url=base, timeout=LIMIT_S) as client:
            await check_tool_calls(client, "tiny")


async def test_a_constrained_and_a_free_request_side_by_side(base: str) -> None:
    """In the batched backend both run in one batch, each with its own sampler chain."""
    out: dict[str, Any] = {}
    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient(base_url=base, timeout=LIMIT_S) as client:

            async def ask(key: str, body: dict[str, Any]) -> None:
                out[key] = (await client.post(CHAT, json=body)).json()["choices"][0]["message"]["content"]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, "json", chat_body("tiny", response_format=RESPONSE_FORMAT))
                nursery.start_soon(ask, "free", chat_body("tiny", max_tokens=12))
    assert_schema_answer(out["json"])
    assert out["free"] == "abcdefghijkl"


async def test_the_openai_sdk_gets_parsed_json_and_tool_calls(base: str) -> None:
    sdk = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=LIMIT_S)

    def run() -> tuple[Any, Any]:
        with sdk:
            answer = sdk.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Weather?"}],
                temperature=0,
                max_tokens=200,
                response_format=RESPONSE_FORMAT,  # type: ignore[arg-type]
            )
            called = sdk.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Weather?"}],
                temperature=0,
                max_tokens=200,
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice="required",
            )
            return answer, called

    with trio.fail_after(LIMIT_S):
        answer, called = await trio.to_thread.run_sync(run)
    assert_schema_answer(answer.choices[0].message.content)
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls" and call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)


#: A Qwen-like chat template that lists ``tools`` with ``tojson`` (prompt_format ``native``).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


async def test_a_native_template_renders_the_tools_and_the_call_is_forced(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tools.gguf", chat_template=TOOLS_TEMPLATE)
    with trio.fail_after(LIMIT_S):
        async with running_server(settings(path, prompt_format="native")) as url:
            async with httpx.AsyncClient(base_url=url, timeout=LIMIT_S) as client:
                assert (await client.post("/v1/admin/models/tiny/load", json={})).status_code == 200
                named = {"type": "function", "function": {"name": "get_weather"}}
                r = await client.post(CHAT, json=chat_body("tiny", tools=TOOLS, tool_choice=named))
                assert r.status_code == 200, r.text
                [call] = r.json()["choices"][0]["message"]["tool_calls"]
                assert call["function"]["name"] == "get_weather"
                # the prompt holds both tools' JSON: far more tokens than the question alone
                assert r.json()["usage"]["prompt_tokens"] > len(json.dumps(TOOLS))
