"""``POST /v1/responses`` and ``GET /v1/models`` from outside (issue 2 §5), through quart's
in-memory client, with the fake async backend under trio's autojump clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.replies import METRIC_KEYS, RESP_ID, Reply, StreamReply, assert_error
from support.server import Pool, start_pool
from support.sse import parse_responses_sse
from trio.testing import MockClock

# Every test takes ``autojump_clock`` (pytest-trio passes a clock to trio.run only when the test
# function itself requests it): virtual time, so a 100 s load or a 10 s drain costs nothing.


# ------------------------------------------------------------------ 200 JSON
async def test_json_response_shape(autojump_clock: MockClock, pool: Pool) -> None:
    r = await pool.respond({"model": "m", "input": "Hello there world"})
    assert r.status == 200
    assert r.headers["Content-Type"] == "application/json"
    body = r.json
    assert list(body) == [
        "id",
        "object",
        "created_at",
        "status",
        "model",
        "output",
        "output_text",
        "incomplete_details",
        "usage",
        "metrics",
    ]
    assert RESP_ID.match(body["id"]), body["id"]
    assert body["object"] == "response"
    assert body["status"] == "completed" and body["incomplete_details"] is None
    assert body["model"] == "m"
    # llm-pool's output shape (issue 2's contract)
    assert body["output"] == [{"type": "output_text", "text": "Hello there world"}]
    assert body["output_text"] == "Hello there world"
    assert body["usage"] == {"input_tokens": 3, "output_tokens": 3, "total_tokens": 6}
    check_metrics(body["metrics"], output_tokens=3)


@pytest.mark.parametrize(
    "headers",
    [{"X-Stainless-Lang": "python"}, {"X-LLM-Pool-Output": "openai"}, {"X-LLM-Pool-Output": "OpenAI"}],
)
async def test_openai_sdks_get_openai_output_items(autojump_clock: MockClock, pool: Pool, headers: dict[str, str]) -> None:
    r = await pool.respond({"model": "m", "input": "Hello there world"}, headers=headers)
    body = r.json
    # OpenAI's output shape (what the openai SDK's ``Response.output_text`` reads)
    assert body["output"] == [
        {
            "type": "message",
            "id": "msg_" + body["id"][len("resp_") :],
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello there world", "annotations": []}],
        }
    ]
    assert body["output_text"] == "Hello there world"


async def test_llm_pool_output_can_be_forced_for_an_sdk(autojump_clock: MockClock, pool: Pool) -> None:
    headers = {"X-Stainless-Lang": "python", "X-LLM-Pool-Output": "llm-pool"}
    r = await pool.respond({"model": "m", "input": "Hello"}, headers=headers)
    assert r.json["output"] == [{"type": "output_text", "text": "Hello"}]


def check_metrics(metrics: dict[str, Any], *, output_tokens: int) -> None:
    assert METRIC_KEYS <= set(metrics), METRIC_KEYS - set(metrics)
    pool_total = metrics["pool_total_wall_ms"]
    engine_total = metrics["engine_total_wall_ms"]
    backend = metrics["backend_inference_wall_ms"]
    assert pool_total >= engine_total >= backend >= 0, metrics
    assert 0 <= metrics["engine_queue_wait_ms"] <= engine_total
    assert metrics["engine_outside_backend_wall_ms"] == pytest.approx(engine_total - backend, abs=0.002)
    assert metrics["engine_output_tokens"] == output_tokens
    assert metrics["engine_prompt_tokens"] == output_tokens
    assert metrics["engine_tokens_per_second"] == pytest.approx(output_tokens / 0.001)


async def test_each_response_gets_a_new_id(autojump_clock: MockClock, pool: Pool) -> None:
    ids = {(await pool.respond({"model": "m", "input": "x"})).json["id"] for _ in range(3)}
    assert len(ids) == 3


# ------------------------------------------------------------------ SSE
async def test_stream_frames_and_order(autojump_clock: MockClock, pool: Pool) -> None:
    s = await pool.stream({"model": "m", "input": "one two three", "stream": True})
    assert s.status == 200
    assert s.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert s.headers["Cache-Control"] == "no-cache"
    events = parse_responses_sse(s.raw)  # strict: only `event: <type>\ndata: <json>\n\n` frames
    kinds = [e for e, _ in events]
    # llm-pool's events, with OpenAI's Responses stream events between them (tests/openai pins those)
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.metrics",
        "response.completed",
    ]
    for i, (event, data) in enumerate(events):
        assert data["type"] == event
        assert data["sequence_number"] == i
    rid = events[0][1]["id"]
    assert RESP_ID.match(rid)
    created = events[0][1]
    assert set(created) == {"type", "sequence_number", "id", "model", "object", "response"}
    assert (created["model"], created["object"]) == ("m", "response")
    assert [d["delta"] for e, d in events if e == "response.output_text.delta"] == ["one", " two", " three"]
    assert all(d["id"] == rid for _, d in events)
    assert set(events[-2][1]) == {"type", "sequence_number", "id", "metrics"}
    check_metrics(events[-2][1]["metrics"], output_tokens=3)
    completed = events[-1][1]
    assert set(completed) == {"type", "sequence_number", "id", "output_text", "response"}
    assert completed["output_text"] == completed["response"]["output_text"] == "one two three"


async def test_stream_deltas_arrive_while_the_backend_still_generates(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    control.configure(token_delay=1.0)  # one word per second of (virtual) time
    out = StreamReply()
    seen_at: list[tuple[float, bool]] = []
    t0 = trio.current_time()
    async for chunk in pool.stream_chunks({"model": "m", "input": "a b c d e", "stream": True}, out):
        if b"response.output_text.delta" in chunk:
            seen_at.append((trio.current_time() - t0, bool(control.finished)))
    assert out.status == 200
    assert [d["delta"] for e, d in parse_responses_sse(out.raw) if e == "response.output_text.delta"] == ["a", " b", " c", " d", " e"]
    # the first delta reached the client at once, long before the backend finished
    first_t, finished_then = seen_at[0]
    assert first_t < 0.5 and not finished_then
    assert seen_at[-1][0] >= 4.0


async def test_stream_failure_after_start_is_an_error_event(autojump_clock: MockClock, pool: Pool) -> None:
    s = await pool.stream({"model": "m", "input": "fail", "stream": True})
    assert s.status == 200
    events = parse_responses_sse(s.raw)
    assert [e for e, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "error",
    ]
    assert events[4][1]["delta"] == "partial"
    assert events[5][1] == {
        "type": "error",
        "sequence_number": 5,
        "code": "backend_error",
        "message": "model 'm' failed: RuntimeError: fake backend exploded",
        "param": None,
    }


async def test_backend_failure_without_stream_is_502(autojump_clock: MockClock, pool: Pool) -> None:
    assert_error(
        await pool.respond({"model": "m", "input": "fail"}),
        502,
        "backend_error",
        "model 'm' failed: RuntimeError: fake backend exploded",
        model="m",
    )
    ok = await pool.respond({"model": "m", "input": "next"})  # the replica still serves
    assert ok.status == 200


async def test_stream_errors_before_the_stream_are_plain_statuses(autojump_clock: MockClock, pool: Pool) -> None:
    s = await pool.stream({"model": "nope", "input": "x", "stream": True})
    assert s.status == 404 and s.headers["Content-Type"] == "application/json"
    assert json.loads(s.raw)["error"]["code"] == "unknown_model"


# ------------------------------------------------------------------ decoding defaults
async def test_decoding_defaults_from_settings(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    raw = {
        "engine": {
            "decoding": {"top_k": 5, "top_p": 0.9, "temperature": 0.7, "max_tokens": 7, "stop": ["END"]},
        }
    }
    pool = await start_pool(nursery, control, raw)
    assert (await pool.respond({"model": "m", "input": "x"})).status == 200
    assert (await pool.respond({"model": "m", "input": "y", "decoding": {"top_k": 3, "stop": []}})).status == 200
    assert (await pool.respond({"model": "m", "input": "z", "decoding": None})).status == 200
    d0, d1, d2 = (req.decoding for req in control.seen)
    assert (d0.beam_size, d0.top_k, d0.top_p, d0.temperature, d0.repetition_penalty, d0.max_tokens, d0.stop) == (
        1, 5, 0.9, 0.7, 1.0, 7, ["END"],
    )
    assert (d1.top_k, d1.temperature, d1.max_tokens, d1.stop) == (3, 0.7, 7, [])
    assert d2 == d0


async def test_shipped_decoding_defaults(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    assert (await pool.respond({"model": "m", "input": "x", "instructions": "Be brief."})).status == 200
    req = control.seen[0]
    d = req.decoding
    assert (d.beam_size, d.top_k, d.top_p, d.temperature, d.repetition_penalty, d.max_tokens, d.stop) == (
        1, 1, 1.0, 0.1, 1.0, 256, [],
    )
    assert (req.system, req.input) == ("Be brief.", "x")


async def test_max_tokens_is_honoured(autojump_clock: MockClock, pool: Pool) -> None:
    r = await pool.respond({"model": "m", "input": "a b c d e", "decoding": {"max_tokens": 2}})
    assert r.json["output_text"] == "a b"


# ------------------------------------------------------------------ 400 invalid_request
def body(**decoding: Any) -> dict[str, Any]:
    return {"model": "m", "input": "x", "decoding": decoding}


# Our own words (llm_pool.config.validation), never msgspec's: what was expected, derived from
# the field's Meta, after the path.
INVALID = [
    ({"model": "m", "input": "x", "foo": 1}, "$.foo: unknown field", "$.foo"),
    (body(bar=1), "$.decoding.bar: unknown field", "$.decoding.bar"),
    ({"input": "x"}, "$.model: required field is missing", "$.model"),
    ({"model": "", "input": "x"}, "$.model: expected a string of 1 to 256 characters", "$.model"),
    ({"model": "m", "input": 3}, "$.input: expected a string or a list of 1 to 4096 items or null", "$.input"),
    ({"model": "m", "input": []}, "$.input: expected a string or a list of 1 to 4096 items or null", "$.input"),
    ({"model": "m", "input": "x", "stream": "yes"}, "$.stream: expected true or false", "$.stream"),
    ({"model": "m", "input": "x", "allow_remote": 1}, "$.allow_remote: expected true or false", "$.allow_remote"),
    ({"model": "m", "input": "x", "decoding": []}, "$.decoding: expected an object or null", "$.decoding"),
    (body(max_tokens="10"), "$.decoding.max_tokens: expected an integer >= 1", "$.decoding.max_tokens"),
    (body(max_tokens=1.5), "$.decoding.max_tokens: expected an integer >= 1", "$.decoding.max_tokens"),
    (body(max_tokens=0), "$.decoding.max_tokens: expected an integer >= 1", "$.decoding.max_tokens"),
    (body(top_k=0), "$.decoding.top_k: expected an integer from 1 to 200", "$.decoding.top_k"),
    (body(top_k=201), "$.decoding.top_k: expected an integer from 1 to 200", "$.decoding.top_k"),
    (body(top_k=True), "$.decoding.top_k: expected an integer from 1 to 200", "$.decoding.top_k"),
    (body(top_p=0), "$.decoding.top_p: expected a number > 0 and <= 1", "$.decoding.top_p"),
    (body(top_p=1.01), "$.decoding.top_p: expected a number > 0 and <= 1", "$.decoding.top_p"),
    (body(temperature=3), "$.decoding.temperature: expected a number from 0 to 2", "$.decoding.temperature"),
    (body(temperature=-0.1), "$.decoding.temperature: expected a number from 0 to 2", "$.decoding.temperature"),
    (body(repetition_penalty=4.5), "$.decoding.repetition_penalty: expected a number from 0 to 4", "$.decoding.repetition_penalty"),
    (body(beam_size=17), "$.decoding.beam_size: expected an integer from 1 to 16", "$.decoding.beam_size"),
    (body(beam_size=0), "$.decoding.beam_size: expected an integer from 1 to 16", "$.decoding.beam_size"),
    (body(stop="x"), "$.decoding.stop: expected a list of at most 16 items", "$.decoding.stop"),
    (body(stop=["a", ""]), "$.decoding.stop[1]: expected a string of at least 1 character", "$.decoding.stop[1]"),
    (body(stop=[str(i) for i in range(17)]), "$.decoding.stop: expected a list of at most 16 items", "$.decoding.stop"),
    # prompt cache (issue 16)
    ({"model": "m", "input": "x", "prompt_cache_key": ""}, "$.prompt_cache_key: expected a string of 1 to 1024 characters or null", "$.prompt_cache_key"),
    ({"model": "m", "input": "x", "prompt_cache_key": 7}, "$.prompt_cache_key: expected a string of 1 to 1024 characters or null", "$.prompt_cache_key"),
]


@pytest.mark.parametrize(("payload", "message", "param"), INVALID, ids=[m for _, m, _ in INVALID])
async def test_invalid_fields_name_their_path(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, payload: Any, message: str, param: str) -> None:
    r = await pool.respond(payload)
    assert_error(r, 400, "invalid_request", f"invalid request body: {message}", param=param)
    assert r.json["error"]["type"] == "invalid_request_error"
    assert not control.seen


async def test_max_tokens_above_the_configured_limit(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool = await start_pool(nursery, control, {"engine": {"max_tokens_limit": 100}})
    assert_error(
        await pool.respond(body(max_tokens=101)),
        400,
        "invalid_request",
        "decoding.max_tokens=101 exceeds this server's limit of 100",
        param="$.decoding.max_tokens",
    )
    assert (await pool.respond(body(max_tokens=100))).status == 200


async def test_default_max_tokens_limit_is_4096(autojump_clock: MockClock, pool: Pool) -> None:
    assert (await pool.respond(body(max_tokens=4096))).status == 200
    assert_error(
        await pool.respond(body(max_tokens=4097)),
        400,
        "invalid_request",
        "decoding.max_tokens=4097 exceeds this server's limit of 4096",
        param="$.decoding.max_tokens",
    )


RAW_INVALID = [
    (b"", "invalid JSON body: the body is empty", None),
    (b"   ", "invalid JSON body: the body is empty", None),
    (b"model=m&input=x", "invalid JSON body: not valid JSON", None),
    (b'{"model": "m", "input": "x"', "invalid JSON body: not valid JSON", None),
    (b'{"model": "m", "input": "x"} {}', "invalid JSON body: not valid JSON", None),
    (b"[]", "invalid request body: $: expected an object", "$"),
    (b'[{"model": "m", "input": "x"}]', "invalid request body: $: expected an object", "$"),
    (b'"m"', "invalid request body: $: expected an object", "$"),
    (b"null", "invalid request body: $: expected an object", "$"),
    (b'{"model": "m", "input": "caf\xe9"}', "invalid JSON body: not valid UTF-8", None),
    (b'\xff\xfe{"model": "m"}', "invalid JSON body: not valid UTF-8", None),
    (b'{"model": "m", "input": "x", "decoding": {"temperature": NaN}}', "invalid JSON body: not valid JSON", None),
    (b'{"model": "m", "input": "x", "decoding": {"top_p": Infinity}}', "invalid JSON body: not valid JSON", None),
    (b'{"model": "m", "input": "x", "decoding": {"temperature": -Infinity}}', "invalid JSON body: not valid JSON", None),
    (
        b'{"model": "m", "input": "x", "decoding": {"temperature": 1e999}}',
        "invalid request body: $.decoding.temperature: expected a number from 0 to 2",
        "$.decoding.temperature",
    ),
]


@pytest.mark.parametrize(("raw", "message", "param"), RAW_INVALID, ids=[repr(r[0][:30]) for r in RAW_INVALID])
async def test_malformed_bodies_are_400_never_500(autojump_clock: MockClock, pool: Pool, raw: bytes, message: str, param: str | None) -> None:
    r = await pool.respond(None, raw=raw)
    err = assert_error(r, 400, "invalid_request", param=param)
    assert err["message"] == message, err


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"model": "m", "input": "a\u0000b"}, "$.input"),
        ({"model": "m", "input": "x", "instructions": "\u0000"}, "$.instructions"),
        ({"model": "m", "input": "x", "decoding": {"stop": ["ok", "a\u0000"]}}, "$.decoding.stop[1]"),
    ],
)
async def test_nul_characters_are_refused(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, payload: Any, param: str) -> None:
    # the message names the field as the chat route does (the path without "$.")
    assert_error(await pool.respond(payload), 400, "invalid_request", f"{param[2:]} contains a NUL character", param=param)
    assert not control.seen


async def test_translategemma_needs_its_language_codes(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    models = {"tg": {"model_path": "tg.gguf", "prompt_format": "translategemma_template"}}
    pool = await start_pool(nursery, control, models=models)
    assert_error(
        await pool.respond({"model": "tg", "input": "Hallo", "source_lang_code": "de"}),
        400,
        "invalid_request",
        "translategemma models need target_lang_code",
        param="target_lang_code",
        model="tg",
    )
    ok = await pool.respond({"model": "tg", "input": "Hallo", "source_lang_code": "de", "target_lang_code": "en"})
    assert ok.status == 200
    # a mixed or unknown source is the model's to detect (issue 16): omitted, "auto" or "mixed"
    for source in ({}, {"source_lang_code": "auto"}, {"source_lang_code": "mixed"}):
        ok = await pool.respond({"model": "tg", "input": "Hallo, world", "target_lang_code": "fr", **source})
        assert ok.status == 200, ok.json


# ------------------------------------------------------------------ 404 / 409 / 403
async def test_unknown_model(autojump_clock: MockClock, pool: Pool) -> None:
    assert_error(
        await pool.respond({"model": "nope", "input": "x"}), 404, "unknown_model", "unknown model 'nope'", param="model", model="nope"
    )


STATE_MODELS = {
    "m": {"model_path": "m.gguf"},
    "off": {"model_path": "off.gguf", "enabled": False},
    "bad": {"model_path": "bad.gguf"},
    "slow": {"model_path": "slow.gguf"},
}


async def test_model_state_conflicts(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    control.configure("bad", fail_load="weights are corrupt")
    control.configure("slow", load_delay=100.0)
    pool = await start_pool(nursery, control, models=STATE_MODELS, wait=False)
    await pool.wait_state("bad", "failed")
    await pool.wait_state("m", "loaded")
    assert pool.manager.entries["slow"].state == "loading"

    assert_error(await pool.respond({"model": "off", "input": "x"}), 409, "model_not_loaded", "model 'off' is not loaded", model="off")
    assert_error(await pool.respond({"model": "slow", "input": "x"}), 409, "model_loading", "model 'slow' is loading", model="slow")
    assert_error(
        await pool.respond({"model": "bad", "input": "x"}),
        409,
        "model_failed",
        "model 'bad' failed to load: weights are corrupt",
        model="bad",
    )
    assert (await pool.get("/v1/models")).json["models"] == ["m"]
    await pool.wait_state("slow", "loaded")
    assert (await pool.get("/v1/models")).json["models"] == ["m", "slow"]


async def test_model_unloading_conflict(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, nursery: trio.Nursery) -> None:
    replies: list[Any] = []

    async def long_request() -> None:
        replies.append(await pool.respond({"model": "m", "input": "wait:10"}))

    nursery.start_soon(long_request)
    await pool.wait_until(lambda: control.started == ["wait:10"])
    nursery.start_soon(lambda: pool.post("/v1/admin/models/m/unload"))
    await pool.wait_state("m", "unloading")
    assert_error(await pool.respond({"model": "m", "input": "x"}), 409, "model_unloading", "model 'm' is unloading", model="m")
    await pool.wait_state("m", "unloaded")
    await pool.wait_until(lambda: bool(replies))
    assert replies[0].status == 200 and replies[0].json["output_text"] == "waited"  # drained, not dropped
    assert_error(await pool.respond({"model": "m", "input": "x"}), 409, "model_not_loaded", model="m")


REMOTE = {
    "backend": "openai_compatible",
    "remote_base_url": "http://127.0.0.1:9/v1",
    "remote_model": "gpt-test",
}


async def test_remote_model_needs_allow_remote(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    models = {"r": dict(REMOTE), "r_off": {**REMOTE, "enabled": False}}
    pool = await start_pool(nursery, control, models=models)
    for name in ("r", "r_off"):  # decided before the state: an unloaded remote model says 403 too
        assert_error(
            await pool.respond({"model": name, "input": "x"}),
            403,
            "remote_execution_disallowed",
            f"model {name!r} runs on a remote API; set allow_remote: true to use it",
            param="allow_remote",
            model=name,
        )
    assert (await pool.respond({"model": "r", "input": "hi", "allow_remote": True})).json["output_text"] == "hi"
    assert_error(await pool.respond({"model": "r_off", "input": "x", "allow_remote": True}), 409, "model_not_loaded")
    assert len(control.seen) == 1


# ------------------------------------------------------------------ 413 / 429 / 503
async def test_body_above_max_body_bytes_is_413(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool = await start_pool(nursery, control, {"service": {"max_body_bytes": 200}})
    small = {"model": "m", "input": "x" * 50}
    assert (await pool.respond(small)).status == 200
    big = {"model": "m", "input": "x" * 300}
    assert_error(await pool.respond(big), 413, "payload_too_large", "request body larger than 200 bytes")
    assert len(control.seen) == 1


async def test_full_queue_is_429_with_retry_after(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool = await start_pool(nursery, control, models={"m": {"model_path": "m.gguf", "max_queue": 1}})
    replies: list[Any] = []

    async def call(text: str) -> None:
        replies.append(await pool.respond({"model": "m", "input": text}))

    nursery.start_soon(call, "wait:5")
    await pool.wait_until(lambda: control.started == ["wait:5"])
    nursery.start_soon(call, "queued")
    await pool.wait_until(lambda: pool.manager.entries["m"].runtime.waiting == 1)  # type: ignore[union-attr]
    r = await pool.respond({"model": "m", "input": "x"})
    assert_error(r, 429, "executor_queue_full", "model 'm' is busy: its queue is full (max_queue=1); retry later", model="m")
    assert r.headers["Retry-After"] == "1"
    assert r.json["error"]["type"] == "rate_limit_error"
    await pool.wait_until(lambda: len(replies) == 2)
    assert [x.json["output_text"] for x in replies] == ["waited", "queued"]


@pytest.mark.parametrize("stream", [False, True])
async def test_queue_timeout_is_503(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, stream: bool) -> None:
    pool = await start_pool(nursery, control, models={"m": {"model_path": "m.gguf", "queue_timeout_s": 2.0}})
    nursery.start_soon(pool.respond, {"model": "m", "input": "wait:10"})
    await pool.wait_until(lambda: control.started == ["wait:10"])
    t0 = trio.current_time()
    payload = {"model": "m", "input": "never runs", "stream": stream}
    if stream:
        s = await pool.stream(payload)
        r = Reply(s.status or 0, s.headers, s.raw)
    else:
        r = await pool.respond(payload)
    assert trio.current_time() - t0 == pytest.approx(2.0, abs=0.05)
    assert_error(r, 503, "queue_timeout", "request waited more than 2s in model 'm''s queue", model="m")
    assert control.started == ["wait:10"]  # the timed-out job never reached the backend
    assert pool.manager.entries["m"].runtime.waiting == 0  # type: ignore[union-attr]


# ------------------------------------------------------------------ routes and /v1/models
async def test_unknown_routes_and_methods_are_json(autojump_clock: MockClock, pool: Pool) -> None:
    assert_error(await pool.get("/nope"), 404, "not_found", "no route for GET /nope")
    r = await pool.get("/v1/responses")
    assert_error(r, 405, "method_not_allowed", "method GET is not allowed on /v1/responses")
    assert r.headers["Allow"] == "OPTIONS, POST"
    assert_error(await pool.request("DELETE", "/v1/models"), 405, "method_not_allowed", "method DELETE is not allowed on /v1/models")
    assert_error(await pool.post("/v1/admin/nope"), 404, "not_found", "no route for POST /v1/admin/nope")


async def test_models_lists_loaded_ids_sorted_without_replicas(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    models = {
        "zeta": {"model_path": "z.gguf", "replicas": 2, "replica_max": 2},
        "alpha": {"model_path": "a.gguf"},
        "off": {"model_path": "o.gguf", "enabled": False},
        "broken": {"model_path": "b.gguf"},
        "Mid": {"model_path": "m.gguf"},
    }
    control.configure("broken", fail_load="nope")
    pool = await start_pool(nursery, control, models=models)
    r = await pool.get("/v1/models")
    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
    assert r.json["models"] == ["Mid", "alpha", "zeta"]
    # OpenAI's list shape alongside, naming the same models (what ``client.models.list()`` reads)
    assert r.json["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in r.json["data"]] == [
        (name, "model", "llm-pool") for name in ["Mid", "alpha", "zeta"]
    ]
    assert all(isinstance(m["created"], int) and m["created"] > 0 for m in r.json["data"])
