"""``POST /v1/completions`` and ``n`` choices, wire contract through quart's in-memory client
(autojump clock, the echo fake backend of ``support.fake_backend``: it answers its prompt one word
per chunk).  The same routes on a real model, through the official SDK: tests/gguf/test_openai_gguf.py.
"""

from __future__ import annotations

import re
from typing import Any

from openai_kit import CHAT
from support.fake_backend import FakeBackendFactory
from support.replies import METRIC_KEYS, assert_error
from support.server import Pool
from support.sse import parse_chat_sse
from trio.testing import MockClock

COMPLETIONS = "/v1/completions"
CMPL_ID = re.compile(r"^cmpl-[0-9a-f]{32}$")


def body(prompt: Any = "one two", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": prompt, **extra}


async def test_json_shape(autojump_clock: MockClock, pool: Pool) -> None:
    r = await pool.post(COMPLETIONS, body(echo=True))
    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
    b = r.json
    assert list(b) == ["id", "object", "created", "model", "choices", "usage", "metrics"]
    assert CMPL_ID.match(b["id"]) and b["object"] == "text_completion" and b["model"] == "m"
    assert b["choices"] == [{"text": "one twoone two", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    assert b["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert METRIC_KEYS <= set(b["metrics"])


async def test_the_prompt_reaches_the_backend_raw(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    r = await pool.post(COMPLETIONS, body("a <|im_end|> b", max_tokens=7, seed=5, user="u1"))
    assert r.status == 200, r.raw
    [gen] = control.seen[-1:]
    assert (gen.raw_prompt, gen.messages, gen.kind) == ("a <|im_end|> b", [], "raw")
    assert (gen.decoding.max_tokens, gen.decoding.seed, gen.fairness_key) == (7, 5, "u1")
    await pool.post(COMPLETIONS, body())
    assert control.seen[-1].decoding.max_tokens == 16  # OpenAI's default


async def test_prompts_and_n_are_one_job_each_in_openai_order(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory
) -> None:
    r = await pool.post(COMPLETIONS, body(["a", "b c"], n=2, seed=10, temperature=1.0))
    assert r.status == 200, r.raw
    assert [(c["index"], c["text"]) for c in r.json["choices"]] == [(0, "a"), (1, "a"), (2, "b c"), (3, "b c")]
    seen = control.seen[-4:]
    assert [(g.raw_prompt, g.decoding.seed) for g in seen] == [("a", 10), ("a", 11), ("b c", 10), ("b c", 11)]
    # each distinct prompt once, every choice's output
    assert r.json["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


async def test_stream_frames(autojump_clock: MockClock, pool: Pool) -> None:
    r = await pool.stream(body(stream=True, echo=True, stream_options={"include_usage": True}), path=COMPLETIONS)
    assert r.status == 200
    *chunks, usage, done = parse_chat_sse(r.raw)
    assert done == "[DONE]"
    cid, created = chunks[0]["id"], chunks[0]["created"]
    assert CMPL_ID.match(cid)
    head = {"id": cid, "object": "text_completion", "created": created, "model": "m"}
    metrics = chunks[-1].pop("metrics")
    assert METRIC_KEYS <= set(metrics)

    def choice(text: str, finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

    assert chunks == [choice("one two"), choice("one"), choice(" two"), choice("", "stop")]
    assert usage == {**head, "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}


async def test_a_failure_mid_stream_is_an_error_frame_then_done(autojump_clock: MockClock, pool: Pool) -> None:
    r = await pool.stream(body("fail", stream=True), path=COMPLETIONS)
    frames = parse_chat_sse(r.raw)
    assert frames[0]["choices"][0]["text"] == "partial"
    assert frames[1]["error"]["code"] == "backend_error" and frames[2:] == ["[DONE]"]


async def test_chat_n_streams_each_choice_whole_with_one_usage_chunk(autojump_clock: MockClock, pool: Pool) -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "n": 2, "stream": True,
               "stream_options": {"include_usage": True}}  # fmt: skip
    r = await pool.stream(payload, path=CHAT)
    *chunks, usage, done = parse_chat_sse(r.raw)
    assert done == "[DONE]" and len({c["id"] for c in [*chunks, usage]}) == 1
    for c in chunks:
        c.pop("metrics", None)
    got = [(c["choices"][0]["index"], c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]
    role = {"role": "assistant", "content": ""}
    assert got == [
        (0, role, None), (0, {"content": "a"}, None), (0, {"content": " b"}, None), (0, {}, "stop"),
        (1, role, None), (1, {"content": "a"}, None), (1, {"content": " b"}, None), (1, {}, "stop"),
    ]  # fmt: skip
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}


async def test_chat_n_json(autojump_clock: MockClock, pool: Pool) -> None:
    r = await pool.post(CHAT, {"model": "m", "messages": [{"role": "user", "content": "a b"}], "n": 3})
    assert [(c["index"], c["message"]["content"]) for c in r.json["choices"]] == [(0, "a b"), (1, "a b"), (2, "a b")]
    assert r.json["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}


async def test_bad_requests(autojump_clock: MockClock, pool: Pool) -> None:
    assert_error(
        await pool.post(COMPLETIONS, body(logit_bias={"1": 2})),
        400,
        "invalid_request",
        "logit_bias is not supported by llm-pool (its samplers take no logit bias); leave it out or send {}",
        param="$.logit_bias",
    )
    assert_error(
        await pool.post(COMPLETIONS, body([1, 2])),
        400,
        "invalid_request",
        "invalid request body: $.prompt[0]: expected a string",  # token arrays are not taken
        param="$.prompt[0]",
    )
    assert_error(
        await pool.post(COMPLETIONS, body("a\x00")), 400, "invalid_request", "prompt contains a NUL character", param="$.prompt"
    )
    assert_error(
        await pool.post(COMPLETIONS, body(model="c", logprobs=1)),
        400,
        "invalid_request",
        "model 'c' (ct2) does not return log probabilities; leave logprobs out",
        param="$.logprobs",
        model="c",
    )
    assert_error(
        await pool.post("/v1/embeddings", {"model": "m", "input": "x"}),
        400,
        "embeddings_unsupported",
        "model 'm' is not an embeddings model (its config has no `embeddings = true`)",
        param="$.model",
        model="m",
    )
