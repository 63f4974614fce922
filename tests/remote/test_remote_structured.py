"""Structured output and tool calling on a remote model (issue 16): ``response_format``,
``tools``, ``tool_choice`` and the conversation's calls and tool results are passed on to the
upstream as Chat Completions fields, and its tool calls come back structured, whole and streamed.

Real pool server, real fake upstream (``support.upstream``), real clock; bounded by fail_after.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from remote_kit import BOUND, MODEL, StartPool
from support.sse import parse_chat_sse
from support.upstream import FakeUpstream

CHAT = "/v1/chat/completions"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "allow_remote": True, "messages": [{"role": "user", "content": "hi"}], **fields}


async def test_response_format_is_passed_on(start: StartPool, up: FakeUpstream) -> None:
    up.reply_text = '{"ok": true}'
    with trio.fail_after(BOUND):
        pool = await start()
        fmt = {"type": "json_schema", "json_schema": {"name": "answer", "description": "d", "schema": SCHEMA, "strict": True}}
        r = await pool.client.post(CHAT, json=chat(response_format=fmt))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == '{"ok": true}'
        assert up.last_request["json"]["response_format"] == fmt
        await pool.client.post(CHAT, json=chat(response_format={"type": "json_object"}))
        assert up.last_request["json"]["response_format"] == {"type": "json_object"}
        r = await pool.respond(text={"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}})
        assert r.status_code == 200
        assert up.last_request["json"]["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
        await pool.client.post(CHAT, json=chat())
        assert "response_format" not in up.last_request["json"] and "tools" not in up.last_request["json"]


async def test_tools_and_the_conversations_calls_are_passed_on(start: StartPool, up: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        pool = await start()
        named = {"type": "function", "function": {"name": "get_weather"}}
        r = await pool.client.post(CHAT, json=chat(messages=CONVERSATION, tools=TOOLS, tool_choice=named))
        assert r.status_code == 200, r.text
        sent = up.last_request["json"]
        assert sent["tools"] == TOOLS and sent["tool_choice"] == named
        assert sent["messages"][1:] == CONVERSATION
        await pool.client.post(CHAT, json=chat(tools=TOOLS))
        assert up.last_request["json"]["tool_choice"] == "auto"


async def test_the_upstreams_tool_calls_come_back_whole_and_streamed(start: StartPool, up: FakeUpstream) -> None:
    up.fault, up.fail_times = "non_text", -1  # an answer with tool_calls and null content
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.client.post(CHAT, json=chat(tools=TOOLS))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert choice["message"]["tool_calls"] == [
            {"id": "call_fake0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]
        r = await pool.client.post(CHAT, json=chat(tools=TOOLS, stream=True))
        chunks = [c for c in parse_chat_sse(r.content) if isinstance(c, dict) and c["choices"]]
        [calls] = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
        assert calls == [
            {"index": 0, "id": "call_fake0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_tools_and_formats_are_priced_as_prompt_text() -> None:
    from llm_pool.backends.ledger import estimate_prompt_tokens
    from llm_pool.backends.openai_compatible import priced_messages
    from llm_pool.pool.jobs import GenerationRequest, Message, ResponseFormat, ToolSpec

    plain = GenerationRequest(model=MODEL, messages=[Message(role="user", content="hi")])
    bare = estimate_prompt_tokens(priced_messages(plain))
    plain.tools = [ToolSpec(name="f", description="x" * 400)]
    with_tools = estimate_prompt_tokens(priced_messages(plain))
    assert with_tools >= bare + 100  # 400 characters are at least 100 estimated tokens
    plain.tools, plain.response_format = [], ResponseFormat(type="json_schema", schema={"enum": ["y" * 400]})
    assert estimate_prompt_tokens(priced_messages(plain)) >= bare + 100
