"""``POST /v1/chat/completions`` wire contract through quart's in-memory client (autojump clock,
fake async backend): exact shapes, the field policy of :mod:`pool.openai_compat`, multi-turn
rendering per prompt format, and the admission / cancellation behaviour it shares with
``/v1/responses``."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import pytest
import trio
from openai_kit import CHAT, stream_chat
from support.fake_backend import FakeBackendFactory
from support.replies import METRIC_KEYS, assert_error
from support.server import Pool
from support.sse import parse_chat_sse
from trio.testing import MockClock

from llm_pool.backends.prompts import render_prompt
from llm_pool.config import DEFAULT_SYSTEM_PROMPT
from llm_pool.pool.jobs import NO_TOP_K
from llm_pool.pool.openai_compat import IGNORED_FIELDS, NEUTRAL_FIELDS

CHAT_ID = re.compile(r"^chatcmpl-[0-9a-f]{32}$")


def body(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


# ------------------------------------------------------------------ 200 JSON
async def test_json_shape(autojump_clock: MockClock, pool: Pool) -> None:
    r = await pool.post(CHAT, body("one two three"))
    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
    b = r.json
    assert list(b) == ["id", "object", "created", "model", "choices", "usage", "metrics"]
    assert CHAT_ID.match(b["id"]) and b["object"] == "chat.completion" and b["model"] == "m"
    assert isinstance(b["created"], int)
    assert b["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "one two three"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ]
    assert b["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert METRIC_KEYS <= set(b["metrics"]) and b["metrics"]["engine_output_tokens"] == 3


async def test_max_tokens_cut_is_length(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    r = await pool.post(CHAT, body("one two three", max_tokens=2))
    assert r.json["choices"][0]["message"]["content"] == "one two"
    assert r.json["choices"][0]["finish_reason"] == "length"
    r = await pool.post(CHAT, body("one two three", max_tokens=2, max_completion_tokens=2))  # equal: fine
    assert r.status == 200 and control.seen[-1].decoding.max_tokens == 2


async def test_decoding_fields_reach_the_engine(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    r = await pool.post(
        CHAT,
        body(temperature=0, top_p=0.5, max_completion_tokens=7, stop="END", top_k=3, repetition_penalty=1.2),
    )
    assert r.status == 200
    d = control.seen[-1].decoding
    assert (d.temperature, d.top_p, d.max_tokens, d.stop, d.top_k, d.repetition_penalty) == (0, 0.5, 7, ["END"], 3, 1.2)
    await pool.post(CHAT, body(stop=["a", "b"]))
    assert control.seen[-1].decoding.stop == ["a", "b"]
    await pool.post(CHAT, body(temperature=None, stop=None, max_tokens=None))  # nulls: the defaults
    defaults = msgspec.to_builtins(pool.settings.engine.decoding)
    openai_only = {"seed": None, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    assert msgspec.to_builtins(control.seen[-1].decoding) == {**defaults, **openai_only}


async def test_temperature_samples_over_the_whole_vocabulary(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory
) -> None:
    """OpenAI's API has no top_k: the server's default (1: greedy) must not turn a caller's
    temperature into nothing (issue 16: "temperature has no effect unless top_k is also sent")."""
    assert pool.settings.engine.decoding.top_k == 1
    await pool.post(CHAT, body(temperature=0.7))
    d = control.seen[-1].decoding
    assert (d.temperature, d.top_k, d.greedy) == (0.7, NO_TOP_K, False)
    await pool.post(CHAT, body(temperature=0.7, top_k=5))  # the extension still limits it
    assert (control.seen[-1].decoding.top_k, control.seen[-1].decoding.greedy) == (5, False)
    await pool.post(CHAT, body(temperature=0))
    assert control.seen[-1].decoding.greedy
    await pool.post(CHAT, body(top_p=0.9))  # no temperature: the server's defaults, as a pair
    d = control.seen[-1].decoding
    assert (d.temperature, d.top_k) == (0.1, 1)
    # /v1/responses keeps its decoding object and the server's defaults
    await pool.respond({"model": "m", "input": "x", "decoding": {"temperature": 0.7}})
    assert (control.seen[-1].decoding.top_k, control.seen[-1].decoding.greedy) == (1, True)


async def test_seed_and_penalties_reach_the_engine(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory
) -> None:
    r = await pool.post(CHAT, body(temperature=1, seed=-7, presence_penalty=0.5, frequency_penalty=-1.5))
    assert r.status == 200
    d = control.seen[-1].decoding
    assert (d.seed, d.presence_penalty, d.frequency_penalty) == (-7, 0.5, -1.5)
    await pool.post(CHAT, body(temperature=1))
    assert control.seen[-1].decoding.seed is None


async def test_a_runtime_without_seeds_refuses_a_seed_it_would_ignore(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory
) -> None:
    message = (
        "model 'c' (ct2) cannot make sampling reproducible: its runtime takes no per-request seed; "
        "leave seed out, or send temperature 0"
    )
    r = await pool.post(CHAT, body(model="c", temperature=1, seed=3))
    assert_error(r, 400, "invalid_request", message, param="$.seed", model="c")
    assert control.seen == []
    # greedy ignores a seed on every runtime: a client that sends one by habit still works
    assert (await pool.post(CHAT, body(model="c", temperature=0, seed=3))).status == 200
    assert (await pool.post(CHAT, body(model="c", seed=3))).status == 200  # the defaults: greedy


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
async def test_a_runtime_without_openai_penalties_refuses_them(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, field: str
) -> None:
    what = field.split("_")[0]
    message = (
        f"model 'c' (ct2) does not accept {field}=0.5: {field} must be 0 "
        f"(its runtime has no {what} penalty; repetition_penalty is an extension)"
    )
    assert_error(await pool.post(CHAT, body(model="c", **{field: 0.5})), 400, "invalid_request", message, param=f"$.{field}", model="c")
    assert (await pool.post(CHAT, body(model="c", **{field: 0}))).status == 200


# ------------------------------------------------------------------ SSE
async def test_stream_frames(autojump_clock: MockClock, pool: Pool) -> None:
    status, headers, raw = await stream_chat(pool, body("a b"))
    assert status == 200 and headers["Content-Type"] == "text/event-stream; charset=utf-8"
    frames = parse_chat_sse(raw)
    assert frames[-1] == "[DONE]"
    chunks = frames[:-1]
    cid, created = chunks[0]["id"], chunks[0]["created"]
    assert CHAT_ID.match(cid)
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": "m"}
    metrics = chunks[-1].pop("metrics")
    assert METRIC_KEYS <= set(metrics)

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    assert chunks == [
        choice({"role": "assistant", "content": ""}),
        choice({"content": "a"}),
        choice({"content": " b"}),
        choice({}, "stop"),
    ]


async def test_stream_include_usage(autojump_clock: MockClock, pool: Pool) -> None:
    _, _, raw = await stream_chat(pool, body("a b c", max_tokens=2, stream_options={"include_usage": True}))
    *chunks, usage, done = parse_chat_sse(raw)
    assert done == "[DONE]"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)
    assert usage == {
        "id": chunks[0]["id"],
        "object": "chat.completion.chunk",
        "created": chunks[0]["created"],
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


async def test_stream_failure_is_an_error_frame_then_done(autojump_clock: MockClock, pool: Pool) -> None:
    status, _, raw = await stream_chat(pool, body("fail"))
    assert status == 200
    frames = parse_chat_sse(raw)
    assert [f["choices"][0]["delta"] for f in frames[:2]] == [
        {"role": "assistant", "content": ""},
        {"content": "partial"},
    ]
    message = "model 'm' failed: RuntimeError: fake backend exploded"
    assert frames[2:] == [
        {
            "error": {"type": "server_error", "code": "backend_error", "message": message, "param": None},
            "detail": {"code": "backend_error", "model": "m", "message": message},
        },
        "[DONE]",
    ]


async def test_errors_before_the_stream_are_plain_statuses(autojump_clock: MockClock, pool: Pool) -> None:
    status, headers, raw = await stream_chat(pool, {**body(), "model": "nope"})
    assert status == 404 and headers["Content-Type"] == "application/json"
    assert_error(
        await pool.post(CHAT, {**body(), "model": "nope", "stream": True}), 404, "unknown_model", "unknown model 'nope'"
    )


async def test_queue_timeout_as_in_responses(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, nursery: trio.Nursery
) -> None:
    nursery.start_soon(pool.post, CHAT, {**body("wait:10"), "model": "q"})
    await pool.wait_until(lambda: control.started == ["wait:10"])  # q's one replica is busy
    assert_error(
        await pool.post(CHAT, {**body("queued"), "model": "q"}),
        503,
        "queue_timeout",
        "request waited more than 0.5s in model 'q''s queue",
        model="q",
    )


# ------------------------------------------------------------------ 400s
BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"bogus": 1}, "invalid request body: $.bogus: unknown field", "$.bogus"),
    (
        {"messages": [{"role": "user", "content": "x", "weight": 1}]},
        "invalid request body: $.messages[0].weight: unknown field",
        "$.messages[0].weight",
    ),
    (
        {"stream_options": {"include_usage": True, "extra": 1}},
        "invalid request body: $.stream_options.extra: unknown field",
        "$.stream_options.extra",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
        'invalid request body: $.messages[0].content[0].type: expected one of "text", "image_url"',
        "$.messages[0].content[0].type",
    ),
    (
        {"messages": [{"role": "tool", "content": "x"}]},
        'invalid request body: $.messages[0].role: expected one of "assistant", "developer", "system", "user"',
        "$.messages[0].role",
    ),
    ({"messages": []}, "invalid request body: $.messages: expected a list of at least 1 item", "$.messages"),
    ({"n": 3}, "n=3 is not supported: llm-pool returns one choice; leave n out or send 1", "$.n"),
    ({"temperature": 3}, "invalid request body: $.temperature: expected a number from 0 to 2 or null", "$.temperature"),
    ({"top_k": 0}, "invalid request body: $.top_k: expected an integer from 1 to 200 or null", "$.top_k"),
    ({"stop": ""}, "invalid request body: $.stop: expected a string of at least 1 character or a list of at most 16 items or null", "$.stop"),
    ({"stop": ["a", "b\x00"]}, "stop[1] contains a NUL character", "$.stop[1]"),
    ({"max_tokens": 5000}, "max_tokens=5000 exceeds this server's limit of 4096", "$.max_tokens"),
    (
        {"max_completion_tokens": 5000},
        "max_completion_tokens=5000 exceeds this server's limit of 4096",
        "$.max_completion_tokens",
    ),
    (
        {"max_tokens": 5, "max_completion_tokens": 6},
        "max_tokens=5 and max_completion_tokens=6 disagree; send one of them",
        "$.max_completion_tokens",
    ),
    (
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        "tools is not supported by llm-pool (it does no tool calling); leave it out or send []",
        "$.tools",
    ),
    (
        {"tool_choice": "auto"},
        'tool_choice is not supported by llm-pool (it does no tool calling); leave it out or send "none"',
        "$.tool_choice",
    ),
    (
        {"logprobs": True},
        "logprobs is not supported by llm-pool (it returns no log probabilities); leave it out or send false",
        "$.logprobs",
    ),
    (
        {"presence_penalty": 2.5},
        "invalid request body: $.presence_penalty: expected a number from -2 to 2 or null",
        "$.presence_penalty",
    ),
    (
        {"seed": 1.5},
        "invalid request body: $.seed: expected an integer from -9223372036854775808 to 9223372036854775807 or null",
        "$.seed",
    ),
    (
        {"response_format": {"type": "json_object"}},
        'response_format is not supported by llm-pool (it does not constrain the output\'s format); leave it out or send {"type":"text"}',
        "$.response_format",
    ),
    (
        {"reasoning_effort": "high"},
        "reasoning_effort is not supported by llm-pool (it has no reasoning-effort setting); leave it out",
        "$.reasoning_effort",
    ),
    (
        {
            "messages": [
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]},
                {"role": "user", "content": "x"},
            ]
        },
        "messages[0].tool_calls is not supported by llm-pool (it does no tool calling); leave it out or send []",
        "$.messages[0].tool_calls",
    ),
    (
        {"messages": [{"role": "user", "content": "a\x00b"}]},
        "messages[0].content contains a NUL character",
        "$.messages[0].content",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "the last message must be a user message (llm-pool generates the next assistant turn)",
        "$.messages",
    ),
    (
        {"messages": [{"role": "system", "content": "s"}]},
        "the last message must be a user message (llm-pool generates the next assistant turn)",
        "$.messages",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "system", "content": "s"},
                {"role": "user", "content": "y"},
            ]
        },
        "messages[1] is a system message after the conversation started; "
        "llm-pool takes system messages only before the first user or assistant message",
        "$.messages[1].role",
    ),
]


@pytest.mark.parametrize(("change", "message", "param"), BAD, ids=[p for _, _, p in BAD])
async def test_bad_request(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, change: dict[str, Any], message: str, param: str
) -> None:
    assert_error(await pool.post(CHAT, {**body(), **change}), 400, "invalid_request", message, param=param)
    assert control.seen == []


async def test_ignored_and_neutral_fields_are_accepted(autojump_clock: MockClock, pool: Pool) -> None:
    ignored = {
        "user": "u1",
        "metadata": {"k": "v"},
        "store": False,
        "service_tier": "auto",
        "safety_identifier": "s",
        "prompt_cache_key": "p",
        "parallel_tool_calls": True,
        "stream_options": {"include_obfuscation": False},
    }
    neutral = {
        "logprobs": False,
        "top_logprobs": 0,
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "functions": [],
        "function_call": "none",
        "response_format": {"type": "text"},
        "modalities": ["text"],
        "audio": None,
        "reasoning_effort": None,
        "verbosity": None,
        "prediction": None,
        "web_search_options": None,
    }
    assert set(neutral) == set(NEUTRAL_FIELDS)
    assert {f for f in IGNORED_FIELDS if "." not in f} <= set(ignored)
    # an assistant message as the SDK's model_dump() writes it, and a named user message
    messages = [
        {"role": "user", "content": "hi", "name": "ann"},
        {
            "role": "assistant",
            "content": "hello",
            "refusal": None,
            "tool_calls": None,
            "function_call": None,
            "audio": None,
            "annotations": [],
        },
        {"role": "user", "content": "bye"},
    ]
    r = await pool.post(CHAT, {**body(), **ignored, **neutral, "messages": messages})
    assert r.status == 200, r.raw
    assert r.json["choices"][0]["message"]["content"] == "bye"


# ------------------------------------------------------------------ messages and prompt formats
async def test_multi_turn_through_the_generic_format(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory
) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": [{"type": "text", "text": "Capital of"}, {"type": "text", "text": "France?"}]},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Italy?"},
    ]
    r = await pool.post(CHAT, {"model": "m", "messages": messages})
    assert r.status == 200 and r.json["choices"][0]["message"]["content"] == "And Italy?"
    seen = control.seen[-1]
    assert [(m.role, m.content) for m in seen.messages] == [
        ("system", "Be brief.\n\nAnswer in French."),
        ("user", "Capital of\nFrance?"),
        ("assistant", "Paris."),
        ("user", "And Italy?"),
    ]
    assert render_prompt("generic", seen).text == (
        "<|im_start|>system\nBe brief.\n\nAnswer in French.<|im_end|>\n"
        "<|im_start|>user\nCapital of\nFrance?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nAnd Italy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


async def test_multi_turn_through_the_mistral_format(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory
) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    r = await pool.post(CHAT, {"model": "mis", "messages": messages})
    assert r.status == 200
    assert render_prompt("mistral_template", control.seen[-1]).text == (
        f"<s>[INST] {DEFAULT_SYSTEM_PROMPT}\n\nHi [/INST] Hello!</s>[INST] How are you? [/INST]"
    )


async def test_formats_that_take_one_turn_refuse_multi_turn(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory
) -> None:
    langs = {"source_lang_code": "en", "target_lang_code": "fr"}
    one = await pool.post(CHAT, {"model": "tg", "messages": [{"role": "user", "content": "Hello"}], **langs})
    assert one.status == 200 and control.seen[-1].source_lang_code == "en"
    turns = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Bye"},
    ]
    assert_error(
        await pool.post(CHAT, {"model": "tg", "messages": turns, **langs}),
        400,
        "invalid_request",
        "translategemma models take exactly one user message",
        param="messages",
        model="tg",
    )
    assert len(control.seen) == 1
    # a remote model takes the whole conversation (tests/remote checks what goes upstream)
    remote = await pool.post(CHAT, {"model": "r", "messages": turns, "allow_remote": True})
    assert remote.status == 200
    assert [m.content for m in control.seen[-1].messages] == ["Hello", "Bonjour", "Bye"]
