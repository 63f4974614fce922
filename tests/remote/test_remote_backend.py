"""The remote backend from outside: ``POST /v1/responses`` on a real pool server in front of the
real fake upstream (issue 6): request body and headers, text and usage, every error mapping,
upstream streaming, cancellation and unload."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
import trio
from remote_kit import BOUND, DEFAULT_SYSTEM_PROMPT, KEY, KEY_ENV, MODEL, StartPool
from support.replies import assert_error
from support.sse import parse_responses_sse
from support.upstream import DEFAULT_400_MESSAGE, FakeUpstream, split_words


# ------------------------------------------------------------------ body, headers, text, usage
async def test_json_request_body_headers_text_and_usage(start: StartPool, up: FakeUpstream) -> None:
    up.reply_text = "  \n Bonjour.  \n"
    up.prompt_tokens, up.completion_tokens = 21, 4
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.respond({"decoding": {"beam_size": 3, "top_k": 40, "repetition_penalty": 1.3, "max_tokens": 9}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output_text"] == "Bonjour."
    assert body["output"] == [{"type": "output_text", "text": "Bonjour."}]
    metrics = body["metrics"]
    assert (metrics["engine_prompt_tokens"], metrics["engine_output_tokens"]) == (21, 4)
    assert metrics["request_cost"] is None  # no prices configured
    assert metrics["pool_total_wall_ms"] >= metrics["engine_total_wall_ms"] >= metrics["backend_inference_wall_ms"] > 0
    [call] = up.requests
    assert (call["method"], call["path"]) == ("POST", "/v1/chat/completions")  # trailing "/" stripped
    assert call["headers"]["authorization"] == f"Bearer {KEY}"
    assert call["json"] == {  # beam_size, top_k, repetition_penalty: accepted, not sent
        "model": "up-model",
        "messages": [
            {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
            {"role": "user", "content": "hello world!"},
        ],
        "temperature": 0.1,
        "top_p": 1.0,
        "max_tokens": 9,
    }


async def test_a_chat_conversation_goes_upstream_whole(start: StartPool, up: FakeUpstream) -> None:
    """/v1/chat/completions with several turns: every turn reaches the upstream, in order,
    behind one system message; the reply comes back as the chat completion."""
    up.reply_text = "Fine."
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?"},
    ]
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": turns, "allow_remote": True}
        )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Fine."
    assert up.last_request["json"]["messages"] == turns
    # without a system turn the default one leads
    with trio.fail_after(BOUND):
        r = await pool.client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": turns[1:], "allow_remote": True}
        )
    assert r.status_code == 200, r.text
    assert up.last_request["json"]["messages"] == [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *turns[1:]]


async def test_openai_seed_and_penalties_are_passed_on(start: StartPool, up: FakeUpstream) -> None:
    """The chat route's ``seed`` (as the caller sent it, 64 bits) and OpenAI penalties reach the
    upstream; a request without them sends none (an upstream default is not overridden)."""
    up.reply_text = "Fine."
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "allow_remote": True}
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.client.post(
            "/v1/chat/completions",
            json={**chat, "temperature": 1, "seed": 2**40, "presence_penalty": 0.5, "frequency_penalty": -0.25},
        )
        assert r.status_code == 200, r.text
        sent = up.last_request["json"]
        assert (sent["seed"], sent["presence_penalty"], sent["frequency_penalty"]) == (2**40, 0.5, -0.25)
        assert (await pool.client.post("/v1/chat/completions", json=chat)).status_code == 200
    assert not {"seed", "presence_penalty", "frequency_penalty"} & set(up.last_request["json"])


@pytest.mark.parametrize("thinking", ["enabled", "disabled"])
async def test_body_with_instructions_stop_and_thinking(start: StartPool, up: FakeUpstream, thinking: str) -> None:
    with trio.fail_after(BOUND):
        pool = await start(remote_thinking=thinking)
        r = await pool.respond(
            {
                "instructions": "Be brief.",
                "input": "Hi",
                "decoding": {"stop": ["\n\n", "END"], "temperature": 0.7, "top_p": 0.9},
            }
        )
    assert r.status_code == 200, r.text
    assert up.last_request["json"] == {
        "model": "up-model",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 256,
        "stop": ["\n\n", "END"],
        "thinking": {"type": thinking},
    }


async def test_length_finish_and_missing_usage(start: StartPool, up: FakeUpstream) -> None:
    up.finish_reason, up.fault = "length", "no_usage"
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.respond()
    assert r.status_code == 200, r.text
    metrics = r.json()["metrics"]
    assert (metrics["engine_prompt_tokens"], metrics["engine_output_tokens"]) == (None, None)


async def test_remote_needs_allow_remote_before_the_queue(start: StartPool, up: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        pool = await start(
            remote_price_input_per_1m=1.0,
            remote_price_output_per_1m=1.0,
            remote_cost_ledger_path="ledger.jsonl",
            remote_budget_daily=1.0,
        )
        r = await pool.respond({"allow_remote": False})
    assert r.status_code == 403
    assert r.json()["error"] == {
        "type": "permission_error",
        "code": "remote_execution_disallowed",
        "message": "model 'r' runs on a remote API; set allow_remote: true to use it",
        "param": "allow_remote",
    }
    assert up.requests == []
    assert pool.ledger() == []


# ------------------------------------------------------------------ error mapping (non-stream)
PORT = r"http://127\.0\.0\.1:\d+/v1"
ERRORS: list[tuple[dict[str, Any], int, str, str | re.Pattern[str]]] = [
    (
        {"fault": "401"},
        502,
        "upstream_authentication_failure",
        f"the upstream rejected the API key from environment variable {KEY_ENV} (HTTP 401)",
    ),
    (
        {"fault": "403"},
        502,
        "upstream_authentication_failure",
        f"the upstream rejected the API key from environment variable {KEY_ENV} (HTTP 403)",
    ),
    (
        {"api_key": "another-key"},
        502,
        "upstream_authentication_failure",
        f"the upstream rejected the API key from environment variable {KEY_ENV} (HTTP 401)",
    ),
    (
        {"fault": "400"},
        502,
        "upstream_invalid_request",
        f"the upstream rejected the request (HTTP 400): {DEFAULT_400_MESSAGE}",
    ),
    (
        {"fault": "422", "error_message": "messages[1].content: too long"},
        502,
        "upstream_invalid_request",
        "the upstream rejected the request (HTTP 422): messages[1].content: too long",
    ),
    (
        {"fault": "429"},
        429,
        "upstream_rate_limit",
        "the upstream is rate limiting (HTTP 429): Rate limit reached for requests. Please try again later.",
    ),
    (
        {"fault": "500"},
        502,
        "upstream_server_error",
        "upstream server error (HTTP 500): The server had an error while processing your request. Sorry about that!",
    ),
    ({"fault": "503"}, 502, "upstream_server_error", "upstream server error (HTTP 503): HTTP 503"),
    (
        {"fault": "slow", "slow_s": 5.0},
        504,
        "upstream_timeout",
        "the upstream did not answer within 0.3s (remote_timeout_s)",
    ),
    (
        {"fault": "garbage"},
        502,
        "upstream_response_parse_failure",
        "the upstream's answer is not JSON: '<html><body>Bad Gateway</body></html> not json {'",
    ),
    ({"fault": "no_choices"}, 502, "upstream_response_parse_failure", "the upstream's answer has no choices"),
    (
        {"fault": "non_text"},
        502,
        "upstream_response_parse_failure",
        "the upstream returned no text content (tool_calls)",
    ),
    (
        {"fault": "non_text", "non_text_content": [{"type": "text", "text": "hi"}]},
        502,
        "upstream_response_parse_failure",
        "the upstream returned non-text content (a JSON list, not a string)",
    ),
    (
        {"fault": "disconnect"},
        502,
        "upstream_connection_error",
        re.compile(
            rf"lost the connection to the upstream at {PORT}: RemoteProtocolError: Server disconnected without sending a response\."
        ),
    ),
]


@pytest.mark.parametrize(("knobs", "status", "code", "message"), ERRORS, ids=[str(e[0]) for e in ERRORS])
async def test_error_mapping(
    start: StartPool, up: FakeUpstream, knobs: dict[str, Any], status: int, code: str, message: str | re.Pattern[str]
) -> None:
    for k, v in knobs.items():
        setattr(up, k, v)
    with trio.fail_after(BOUND):
        pool = await start(remote_timeout_s=0.3)
        r = await pool.respond()
        assert_error(r, status, code, message, model=MODEL)
        await pool.wait_idle()
    assert len(up.chat_requests) == 1  # no retries by default
    assert (await pool.row())["runtime_state"] == "loaded"  # the model keeps serving


async def test_rate_limit_passes_retry_after_on(start: StartPool, up: FakeUpstream) -> None:
    up.fault, up.retry_after = "429", 7
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.respond()
    assert_error(r, 429, "upstream_rate_limit", re.compile(r"the upstream is rate limiting \(HTTP 429\): .*"), model=MODEL)
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "7"


async def test_connection_refused(start: StartPool, up: FakeUpstream) -> None:
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with trio.fail_after(BOUND):
        pool = await start(remote_base_url=f"http://127.0.0.1:{port}/v1")
        r = await pool.respond()
    assert_error(
        r,
        502,
        "upstream_connection_error",
        re.compile(rf"cannot connect to the upstream at http://127\.0\.0\.1:{port}/v1: ConnectError: .+"),
        model=MODEL,
    )


# ------------------------------------------------------------------ streaming
async def stream(pool: Any, **fields: Any) -> list[tuple[str, dict[str, Any]]]:
    payload = {"model": "r", "input": "hello world!", "allow_remote": True, "stream": True, **fields}
    async with pool.client.stream("POST", "/v1/responses", json=payload) as s:
        assert s.status_code == 200
        raw = await s.aread()
    pool.seen.append(raw)
    return parse_responses_sse(raw)


async def test_stream_forwards_each_delta_as_the_upstream_sends_it(start: StartPool, up: FakeUpstream) -> None:
    up.stream_chunks = ["  Hel", "lo", " there ", "  ", "friend \n"]
    up.chunk_delay_s = 0.08
    with trio.fail_after(BOUND):
        pool = await start()
        payload = {"model": "r", "input": "hi", "allow_remote": True, "stream": True}
        deltas: list[str] = []
        first_at: float | None = None
        async with pool.client.stream("POST", "/v1/responses", json=payload) as s:
            buf = b""
            async for chunk in s.aiter_bytes():
                buf += chunk
                if first_at is None and b"response.output_text.delta" in buf:
                    first_at = time.monotonic()
                    # the upstream is still answering (7 more frames, 0.08 s apart)
                    assert up.in_flight == 1
            events = parse_responses_sse(buf)
        done_at = time.monotonic()
    assert first_at is not None and done_at - first_at > 0.3
    deltas = [data["delta"] for kind, data in events if kind == "response.output_text.delta"]
    # leading whitespace dropped, trailing whitespace held back until more text came
    assert deltas == ["Hel", "lo", " there", "   friend"]
    assert [kind for kind, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.metrics",
        "response.completed",
    ]
    assert events[-1][1]["output_text"] == "Hello there   friend"
    metrics = events[-2][1]["metrics"]
    assert (metrics["engine_prompt_tokens"], metrics["engine_output_tokens"]) == (10, 3)
    sent = up.last_request["json"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_stream_words_and_usage(start: StartPool, up: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        pool = await start()
        events = await stream(pool)
    deltas = [d["delta"] for k, d in events if k == "response.output_text.delta"]
    assert deltas == split_words(up.reply_text)


STREAM_ERRORS: list[tuple[dict[str, Any], list[str], str, str | re.Pattern[str]]] = [
    (
        {"fault": "500"},
        [],
        "upstream_server_error",
        "upstream server error (HTTP 500): The server had an error while processing your request. Sorry about that!",
    ),
    (
        {"fault": "401"},
        [],
        "upstream_authentication_failure",
        f"the upstream rejected the API key from environment variable {KEY_ENV} (HTTP 401)",
    ),
    (
        {"fault": "garbage"},
        [],
        "upstream_response_parse_failure",
        "the upstream sent a stream event that is not JSON: '<html><body>Bad Gateway</body></html> not json {'",
    ),
    ({"fault": "no_choices"}, [], "upstream_response_parse_failure", "the upstream's stream has no choices"),
    (
        {"fault": "non_text"},
        [],
        "upstream_response_parse_failure",
        "the upstream returned no text content (tool_calls)",
    ),
    (
        {"fault": "disconnect"},
        ["Hello"],
        "upstream_connection_error",
        re.compile(rf"lost the stream from the upstream at {PORT}: RemoteProtocolError: .+"),
    ),
]


@pytest.mark.parametrize(("knobs", "deltas", "code", "message"), STREAM_ERRORS, ids=[str(e[0]) for e in STREAM_ERRORS])
async def test_stream_errors(
    start: StartPool,
    up: FakeUpstream,
    knobs: dict[str, Any],
    deltas: list[str],
    code: str,
    message: str | re.Pattern[str],
) -> None:
    for k, v in knobs.items():
        setattr(up, k, v)
    with trio.fail_after(BOUND):
        pool = await start()
        events = await stream(pool)
    assert [d["delta"] for k, d in events if k == "response.output_text.delta"] == deltas
    kind, data = events[-1]
    assert kind == "error" and data["code"] == code, events
    if isinstance(message, str):
        assert data["message"] == message
    else:
        assert message.fullmatch(data["message"]), data["message"]


async def test_client_gone_stops_reading_the_upstream_at_once(start: StartPool, up: FakeUpstream) -> None:
    up.chunk_delay_s = 5.0  # the upstream would take 20 s to finish
    with trio.fail_after(BOUND):
        pool = await start(
            remote_price_input_per_1m=1000.0, remote_price_output_per_1m=1000.0, remote_cost_ledger_path="ledger.jsonl"
        )
        payload = {"model": "r", "input": "hi", "allow_remote": True, "stream": True}
        async with pool.client.stream("POST", "/v1/responses", json=payload) as s:
            async for chunk in s.aiter_bytes():
                if b"response.output_text.delta" in chunk:
                    break  # leave: the connection is closed
        t0 = time.monotonic()
        await pool.wait_idle()
    assert time.monotonic() - t0 < 2.5  # not after the upstream's next chunk (5 s)
    closing = pool.ledger()[-1]
    assert (closing["event"], closing["reason"]) == ("failed_usage_unknown", "cancelled after the request was sent")


async def test_unload_cancels_a_running_request(start: StartPool, up: FakeUpstream, nursery: trio.Nursery) -> None:
    up.gate = trio.Event()
    with trio.fail_after(BOUND):
        pool = await start(
            remote_price_input_per_1m=1000.0, remote_price_output_per_1m=1000.0, remote_cost_ledger_path="ledger.jsonl"
        )
        result: list[Any] = []
        answered = trio.Event()

        async def ask() -> None:
            result.append(await pool.respond())
            answered.set()

        nursery.start_soon(ask)
        await up.wait_in_flight(1)
        r = await pool.client.post("/v1/admin/models/r/unload", json={"drain_timeout_s": 0})
        assert r.status_code == 200 and r.json()["runtime_state"] == "unloaded", r.text
        await answered.wait()
        up.gate.set()
    assert_error(
        result[0],
        503,
        "request_cancelled",
        "request to model 'r' was cancelled: model unloaded with force",
        model=MODEL,
    )
    assert [e["event"] for e in pool.ledger()] == ["reserved", "failed_usage_unknown"]


async def test_target_inflight_is_the_number_of_concurrent_upstream_calls(start: StartPool, up: FakeUpstream) -> None:
    up.gate = trio.Event()
    replies: list[Any] = []
    with trio.fail_after(BOUND):
        pool = await start(target_inflight=2)

        async def ask() -> None:
            replies.append(await pool.respond())

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(ask)
            while (row := await pool.row())["queue_depth"] < 2 or up.in_flight < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert (row["runtime_inflight"], row["queue_depth"], row["effective_target_inflight"]) == (2, 2, 2)
            assert up.in_flight == 2
            up.gate.set()
    assert [r.status_code for r in replies] == [200] * 4
    assert up.max_in_flight == 2


# ------------------------------------------------------------------ conversations, images, thinking (issue 16)
PNG_URL = "data:image/png;base64,iVBORw0KGgoAAAAA"  # a PNG's signature and a few bytes


async def test_a_conversation_with_an_image_goes_upstream_as_content_parts(start: StartPool, up: FakeUpstream) -> None:
    """A /v1/responses conversation with an image item reaches the upstream as Chat Completions
    content parts, in the caller's order; a text-only turn stays a string."""
    up.reply_text = "A cat."
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is this?"},
                {"type": "input_image", "image_url": PNG_URL, "detail": "low"},
            ],
        },
    ]
    with trio.fail_after(BOUND):
        pool = await start(modalities=["text", "image"])
        r = await pool.client.post(
            "/v1/responses",
            json={"model": MODEL, "allow_remote": True, "instructions": "Be brief.", "messages": messages, "thinking": "disabled"},
        )
    assert r.status_code == 200, r.text
    assert r.json()["output_text"] == "A cat."
    sent = up.last_request["json"]
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
            ],
        },
    ]
    # the request's thinking wins over the model's remote_thinking (unset here)
    assert sent["thinking"] == {"type": "disabled"}


async def test_request_thinking_overrides_remote_thinking(start: StartPool, up: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        pool = await start(remote_thinking="disabled")
        assert (await pool.respond(thinking="enabled")).status_code == 200
        assert up.last_request["json"]["thinking"] == {"type": "enabled"}
        assert (await pool.respond(thinking="default")).status_code == 200
        assert up.last_request["json"]["thinking"] == {"type": "disabled"}
