"""Legacy completions and embeddings through a remote (``openai_compatible``) model (issue 16 §2):
the pool sends the upstream's own ``/v1/completions`` and ``/v1/embeddings`` (the fake upstream
of ``support.upstream`` answers OpenAI's shapes), and reads its answers back.

Real clock, real sockets on 127.0.0.1; every step bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json

import trio
from remote_kit import BOUND, KEY, MODEL, StartPool
from support.replies import assert_error
from support.upstream import FakeUpstream, fake_embedding


async def test_completion_goes_to_the_upstreams_completions_unstripped(start: StartPool, up: FakeUpstream) -> None:
    up.reply_text = " and then some "
    up.prompt_tokens, up.completion_tokens = 5, 4
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "Once upon", "max_tokens": 7, "seed": 3, "allow_remote": True},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"] == [{"text": " and then some ", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
    [call] = up.requests
    assert (call["path"], call["headers"]["authorization"]) == ("/v1/completions", f"Bearer {KEY}")
    assert call["json"] == {
        "model": "up-model",
        "prompt": "Once upon",  # no system prompt, no template
        "temperature": 0.1,
        "top_p": 1.0,
        "max_tokens": 7,
        "seed": 3,
    }


async def test_completion_stream_from_the_upstream(start: StartPool, up: FakeUpstream) -> None:
    up.stream_chunks = ["Hel", "lo ", "there"]
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.client.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "x", "stream": True, "allow_remote": True,
                  "stream_options": {"include_usage": True}},
        )  # fmt: skip
    assert r.status_code == 200, r.text
    frames = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    assert "".join(c["text"] for ch in chunks for c in ch["choices"]) == "Hello there"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == up.completion_tokens
    assert up.requests[-1]["json"]["stream"] is True


async def test_embeddings_pass_through(start: StartPool, up: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        pool = await start(embeddings=True)
        r = await pool.client.post(
            "/v1/embeddings", json={"model": MODEL, "input": ["one two", "three"], "allow_remote": True}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["embedding"] for d in body["data"]] == [fake_embedding("one two", 4), fake_embedding("three", 4)]
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        [call] = up.requests
        assert call["path"] == "/v1/embeddings"
        assert call["json"] == {"model": "up-model", "input": ["one two", "three"], "encoding_format": "float"}
        # an embeddings model generates nothing; it needs allow_remote like any remote model
        r = await pool.client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "allow_remote": True})
        assert_error(r, 400, "generation_unsupported", param="$.model")
        r = await pool.client.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
        assert r.status_code == 403, r.text
    assert len(up.requests) == 1


async def test_embeddings_on_a_chat_model_are_refused(start: StartPool, up: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        pool = await start()
        r = await pool.client.post("/v1/embeddings", json={"model": MODEL, "input": "x", "allow_remote": True})
    assert_error(
        r, 400, "embeddings_unsupported", "model 'r' is not an embeddings model (its config has no `embeddings = true`)"
    )
    assert up.requests == []
