"""Structured output and tool calling checks against a running server with a real llama.cpp model
(the tiny generated GGUF), shared by the in-process, batched and ``llama_server`` suites.

The tiny model predicts the successor of the last token (``tests/models/tiny_gguf.py``), so a
grammar is what makes its output JSON at all: whatever it produces under one is the grammar's
doing.  The schemas here are bounded (enums, ``maxLength``), so greedy decoding ends them well
inside ``max_tokens``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema

from support.sse import parse_chat_sse

CHAT = "/v1/chat/completions"
#: Every field bounded: the tiny model's favourite letters fill ``word`` up to its maxLength.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "tag": {"enum": ["abc", "xyz"]},
        "word": {"type": "string", "maxLength": 6},
    },
    "required": ["ok", "tag", "word"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


def chat_body(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Weather in Paris?"}], "temperature": 0, "max_tokens": 200, **fields}


def assert_schema_answer(text: str) -> dict[str, Any]:
    """``text`` is one JSON document matching :data:`SCHEMA`; returns it."""
    value = json.loads(text)
    jsonschema.validate(value, SCHEMA)
    return value  # type: ignore[no-any-return]


def assert_weather_call(call: dict[str, Any]) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_PARAMS)


async def check_response_formats(client: httpx.AsyncClient, model: str) -> None:
    """``json_schema`` (both routes, both spellings on ``/v1/responses``, streamed and not) and
    ``json_object`` give JSON; the same request without a format does not."""
    r = await client.post(CHAT, json=chat_body(model, response_format=RESPONSE_FORMAT))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert_schema_answer(choice["message"]["content"])

    free = await client.post(CHAT, json=chat_body(model, max_tokens=30))
    assert free.status_code == 200 and not free.json()["choices"][0]["message"]["content"].startswith("{")

    r = await client.post(CHAT, json={**chat_body(model, response_format=RESPONSE_FORMAT), "stream": True})
    chunks = parse_chat_sse(r.content)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if isinstance(c, dict) and c["choices"])
    assert_schema_answer(text)
    assert [c["choices"][0]["finish_reason"] for c in chunks if isinstance(c, dict) and c["choices"]][-1] == "stop"

    for fmt in ({"response_format": RESPONSE_FORMAT}, {"text": {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA}}}):
        r = await client.post(
            "/v1/responses",
            json={"model": model, "input": "Weather?", "decoding": {"temperature": 0, "max_tokens": 200}, **fmt},
        )
        assert r.status_code == 200, r.text
        assert_schema_answer(r.json()["output_text"])

    r = await client.post(CHAT, json=chat_body(model, response_format={"type": "json_object"}, max_tokens=40))
    assert r.status_code == 200
    content = r.json()["choices"][0]["message"]["content"]
    assert content.startswith("{")  # an object that the tiny model never closes within 40 tokens


async def check_tool_calls(client: httpx.AsyncClient, model: str) -> None:
    """A named or required call is forced by a grammar and comes back as ``tool_calls``, whole
    and streamed; ``none`` is free text."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = await client.post(CHAT, json=chat_body(model, tools=TOOLS, tool_choice=named))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert_weather_call(call)

    r = await client.post(CHAT, json=chat_body(model, tools=TOOLS, tool_choice="required"))
    [call] = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] in ("get_weather", "get_time") and isinstance(json.loads(call["function"]["arguments"]), dict)

    r = await client.post(CHAT, json={**chat_body(model, tools=TOOLS, tool_choice=named), "stream": True})
    chunks = [c for c in parse_chat_sse(r.content) if isinstance(c, dict) and c["choices"]]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert not any(d.get("content") for d in deltas)  # the call's text is never content
    [calls] = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert [c["index"] for c in calls] == [0]
    assert_weather_call({k: v for k, v in calls[0].items() if k != "index"})
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"

    r = await client.post(CHAT, json=chat_body(model, tools=TOOLS, tool_choice="none", max_tokens=10))
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]

    # the conversation goes on after the call: the result is a tool turn, then free text
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{k: v for k, v in call.items()}]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "clear"}'},
    ]
    r = await client.post(CHAT, json={**chat_body(model, tools=TOOLS, max_tokens=10), "messages": messages})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
