"""Structured output and tool calling on the OpenAI routes, over the fake echo backend (issue 16):
who refuses what (400s in our words), and how a local model's ``<tool_call>`` text becomes
``tool_calls``, whole and streamed, through quart's client and the official SDK.

The echo backend answers with the last user message, so a test writes the model's answer.
"""

from __future__ import annotations

import json
from typing import Any

import openai
from openai_kit import CHAT, in_thread, stream_chat
from support.fake_backend import FakeBackendFactory
from support.replies import assert_error
from support.server import Pool
from support.sse import parse_chat_sse
from trio.testing import MockClock

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def body(text: str = "hello there", model: str = "m", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


async def test_a_runtime_that_cannot_enforce_a_format_refuses_it(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    r = await pool.post(CHAT, body(model="c", response_format={"type": "json_object"}))
    assert_error(
        r, 400, "response_format_unsupported",
        "model 'c' (ct2) cannot enforce response_format 'json_object'; it offers: text",
        model="c", param="$.response_format",
    )
    r = await pool.post("/v1/responses", {"model": "c", "input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {}}}})
    assert_error(
        r, 400, "response_format_unsupported",
        "model 'c' (ct2) cannot enforce response_format 'json_schema'; it offers: text",
        model="c", param="$.response_format",
    )
    assert (await pool.post(CHAT, body(model="c", response_format={"type": "text"}))).status == 200
    r = await pool.post(CHAT, body(model="c", tools=TOOLS))
    assert_error(
        r, 400, "tools_unsupported",
        "model 'c' does no tool calling: the ct2 runtime cannot constrain or parse calls", model="c", param="$.tools",
    )
    r = await pool.post(CHAT, body(model="mis", tools=TOOLS))
    assert_error(
        r, 400, "tools_unsupported",
        "model 'mis' does no tool calling: prompt_format 'mistral_template' has no tool calls; generic, qwen3_template, native do",
        model="mis", param="$.tools",
    )
    assert len(control.seen) == 1  # only the text request ran


async def test_both_spellings_of_a_format_at_once_are_refused(autojump_clock: MockClock, pool: Pool) -> None:
    fmt = {"type": "json_object"}
    r = await pool.post("/v1/responses", {"model": "m", "input": "x", "response_format": fmt, "text": {"format": fmt}})
    assert_error(r, 400, "invalid_request", "send response_format or text.format, not both", param="$.text.format")


async def test_a_local_models_call_text_becomes_tool_calls(autojump_clock: MockClock, pool: Pool) -> None:
    r = await pool.post(CHAT, body("Checking. " + CALL, tools=TOOLS))
    assert r.status == 200, r.raw
    choice = r.json["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # without tools (or with tool_choice none) the same text is just text
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        r = await pool.post(CHAT, body("Checking. " + CALL, **extra))
        assert r.json["choices"][0] == {
            "index": 0, "message": {"role": "assistant", "content": "Checking. " + CALL}, "finish_reason": "stop", "logprobs": None
        }


async def test_a_streamed_call_is_one_tool_calls_delta_and_never_content(autojump_clock: MockClock, pool: Pool) -> None:
    status, _, raw = await stream_chat(pool, body("Checking. " + CALL, tools=TOOLS))
    assert status == 200
    chunks = [c for c in parse_chat_sse(raw) if isinstance(c, dict)]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == "Checking."
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    assert len(calls) == 1 and calls[0][0]["index"] == 0 and calls[0][0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_text_that_is_not_a_call_stays_content_in_a_stream(autojump_clock: MockClock, pool: Pool) -> None:
    text = "use <tool_call> tags"
    status, _, raw = await stream_chat(pool, body(text, tools=TOOLS))
    chunks = [c for c in parse_chat_sse(raw) if isinstance(c, dict) and c["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_the_sdk_reads_tool_calls_and_sends_them_back(client: openai.OpenAI) -> None:
    answer = await in_thread(
        lambda: client.chat.completions.create(model="m", messages=[{"role": "user", "content": CALL}], tools=TOOLS)  # type: ignore[arg-type, list-item]
    )
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls" and message.content is None
    assert message.tool_calls is not None and json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    # the SDK's own message goes back as the assistant turn, followed by the tool's answer
    history: list[Any] = [
        {"role": "user", "content": "weather?"},
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    again = await in_thread(lambda: client.chat.completions.create(model="m", messages=history, tools=TOOLS))  # type: ignore[arg-type]
    assert again.choices[0].message.content == "thanks"
    streamed = await in_thread(
        lambda: list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": CALL}], tools=TOOLS, stream=True))  # type: ignore[arg-type, list-item]
    )
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert [d.tool_calls[0].function.name for d in deltas if d.tool_calls] == ["get_weather"]
    fmt = await in_thread(
        lambda: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": '{"ok": true}'}], response_format={"type": "json_object"}
        )
    )
    assert json.loads(fmt.choices[0].message.content or "") == {"ok": True}
