"""Tests for the fake OpenAI-compatible upstream in tests/support/upstream.py (real clock)."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from support.sse import sse_data
from support.upstream import FakeUpstream, run_upstream, serve_upstream, split_words

KEY = "sk-test-key"
BOUND = 10  # seconds; every test step is bounded by trio.fail_after


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> FakeUpstream:
    up = FakeUpstream(api_key=KEY)
    await nursery.start(serve_upstream, up)
    return up


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m1", "messages": [{"role": "user", "content": "hi"}], **extra}


async def post_chat(
    client: httpx.AsyncClient, up: FakeUpstream, key: str = KEY, **extra: Any
) -> httpx.Response:
    return await client.post(
        f"{up.base_url}/chat/completions", json=chat_body(**extra), headers=auth(key)
    )


@pytest.mark.trio
async def test_normal_json(upstream: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient() as client:
            r = await post_chat(client, upstream, max_tokens=5)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "m1"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from upstream."},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
    }
    [req] = upstream.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["method"] == "POST"
    assert req["headers"]["authorization"] == f"Bearer {KEY}"
    assert req["json"] == chat_body(max_tokens=5)
    assert upstream.max_in_flight == 1 and upstream.in_flight == 0


@pytest.mark.trio
async def test_models_and_keepalive(upstream: FakeUpstream) -> None:
    upstream.models = ["a", "b"]
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient() as client:
            r1 = await client.get(f"{upstream.base_url}/models", headers=auth())
            r2 = await post_chat(client, upstream)
            r3 = await client.get(f"{upstream.base_url}/nope", headers=auth())
    assert r1.status_code == 200
    assert r1.json()["object"] == "list"
    assert [m["id"] for m in r1.json()["data"]] == ["a", "b"]
    assert all(m["object"] == "model" for m in r1.json()["data"])
    assert r2.status_code == 200
    assert r3.status_code == 404 and "error" in r3.json()


@pytest.mark.trio
async def test_streaming_with_usage(upstream: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient() as client:
            r = await post_chat(
                client, upstream, stream=True, stream_options={"include_usage": True}
            )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_data(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    content_chunks = [
        c for c in chunks if c["choices"] and "content" in c["choices"][0]["delta"]
    ]
    assert content_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["delta"]["content"] for c in content_chunks] == [
        "Hello",
        " from",
        " upstream.",
    ]
    finish = chunks[-2]
    assert (
        finish["choices"][0]["finish_reason"] == "stop"
        and finish["choices"][0]["delta"] == {}
    )
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
    }
    assert all(c["usage"] is None for c in chunks[:-1])


@pytest.mark.trio
async def test_streaming_custom_chunks_without_usage_option(
    upstream: FakeUpstream,
) -> None:
    upstream.stream_chunks = ["He", "llo", "!"]
    with trio.fail_after(BOUND):
        async with (
            httpx.AsyncClient() as client,
            client.stream(
                "POST",
                f"{upstream.base_url}/chat/completions",
                json=chat_body(stream=True),
                headers=auth(),
            ) as r,
        ):
            events = [
                line async for line in r.aiter_lines() if line.startswith("data: ")
            ]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert events[-1] == "data: [DONE]"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hello!"
    assert all("usage" not in c for c in chunks)  # no include_usage -> no usage at all


@pytest.mark.trio
async def test_no_usage_stream(upstream: FakeUpstream) -> None:
    upstream.fault = "no_usage"
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient() as client:
            r = await post_chat(
                client, upstream, stream=True, stream_options={"include_usage": True}
            )
            r2 = await post_chat(client, upstream)
    chunks = [json.loads(e) for e in sse_data(r.text)[:-1]]
    assert all(c.get("usage") is None for c in chunks)
    assert all(c["choices"] for c in chunks)
    assert "usage" not in r2.json() and r2.json()["choices"]


@pytest.mark.trio
async def test_wrong_key_401(upstream: FakeUpstream) -> None:
    upstream.fault, upstream.fail_times = "500", 1
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient() as client:
            r = await post_chat(client, upstream, key="sk-wrong")
            r_none = await client.post(
                f"{upstream.base_url}/chat/completions", json=chat_body()
            )
    assert r.status_code == 401 and r_none.status_code == 401
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    assert err["code"] == "invalid_api_key"
    assert upstream.fail_times == 1  # auth failures do not consume the fault
    assert len(upstream.requests) == 2  # still recorded


@pytest.mark.trio
async def test_429_retry_after(upstream: FakeUpstream) -> None:
    upstream.fault, upstream.retry_after = "429", 2
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient() as client:
            r = await post_chat(client, upstream)
            upstream.retry_after = 0.5
            r2 = await post_chat(client, upstream)
            upstream.retry_after = None
            r3 = await post_chat(client, upstream)
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert r2.headers["retry-after"] == "0.5"
    assert r3.status_code == 429 and "retry-after" not in r3.headers


@pytest.mark.trio
async def test_status_faults_have_openai_errors(upstream: FakeUpstream) -> None:
    async with httpx.AsyncClient() as client:
        for status in ("400", "403", "500", "503"):
            upstream.fault = status
            with trio.fail_after(BOUND):
                r = await post_chat(client, upstream)
            assert r.status_code == int(status)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        upstream.fault = "400"
        r = await post_chat(client, upstream)
        assert "Invalid 'max_tokens': too large" in r.json()["error"]["message"]
        upstream.error_message = "custom boom"
        r = await post_chat(client, upstream)
        assert r.json()["error"]["message"] == "custom boom"


@pytest.mark.trio
async def test_fail_times_then_success(upstream: FakeUpstream) -> None:
    upstream.fault, upstream.fail_times = "500", 2
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient() as client:
            statuses = [
                (await post_chat(client, upstream)).status_code for _ in range(4)
            ]
    assert statuses == [500, 500, 200, 200]
    assert upstream.fail_times == 0


@pytest.mark.trio
async def test_garbage(upstream: FakeUpstream) -> None:
    upstream.fault = "garbage"
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient() as client:
            r = await post_chat(client, upstream)
            rs = await post_chat(client, upstream, stream=True)
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r.json()
    assert rs.status_code == 200
    events = sse_data(rs.text)
    assert events[-1] == "[DONE]"
    with pytest.raises(json.JSONDecodeError):
        json.loads(events[0])


@pytest.mark.trio
async def test_no_choices_and_non_text(upstream: FakeUpstream) -> None:
    async with httpx.AsyncClient() as client:
        with trio.fail_after(BOUND):
            upstream.fault = "no_choices"
            assert (await post_chat(client, upstream)).json()["choices"] == []
            upstream.fault = "non_text"
            msg = (await post_chat(client, upstream)).json()["choices"][0]["message"]
            assert msg["content"] is None and msg["tool_calls"]
            upstream.non_text_content = [{"type": "text", "text": "x"}]
            msg = (await post_chat(client, upstream)).json()["choices"][0]["message"]
            assert msg["content"] == [{"type": "text", "text": "x"}]


@pytest.mark.trio
async def test_disconnect(upstream: FakeUpstream) -> None:
    upstream.fault, upstream.fail_times = "disconnect", 2
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await post_chat(client, upstream)
            got: list[str] = []
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream(
                    "POST",
                    f"{upstream.base_url}/chat/completions",
                    json=chat_body(stream=True),
                    headers=auth(),
                ) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            got.append(line)
            assert (
                len(got) == 1
                and json.loads(got[0][6:])["choices"][0]["delta"]["content"] == "Hello"
            )
            assert (await post_chat(client, upstream)).status_code == 200  # recovers


@pytest.mark.trio
async def test_slow(upstream: FakeUpstream) -> None:
    upstream.fault, upstream.slow_s = "slow", 30.0
    async with httpx.AsyncClient() as client:
        with trio.move_on_after(0.3) as scope:
            await post_chat(client, upstream)
        assert scope.cancelled_caught
        upstream.slow_s = 0.05
        t0 = trio.current_time()
        with trio.fail_after(BOUND):
            r = await post_chat(client, upstream, stream=True)
        # 3 content frames + finish + [DONE] -> sleeps before headers and 4 more frames
        assert trio.current_time() - t0 >= 0.05 * 5
        assert sse_data(r.text)[-1] == "[DONE]"


@pytest.mark.trio
async def test_gate_and_concurrency(upstream: FakeUpstream) -> None:
    upstream.gate = trio.Event()
    results: list[int] = []
    async with httpx.AsyncClient() as client:

        async def one() -> None:
            results.append((await post_chat(client, upstream)).status_code)

        with trio.fail_after(BOUND):
            async with trio.open_nursery() as n:
                for _ in range(3):
                    n.start_soon(one)
                await upstream.wait_in_flight(3)
                assert results == []
                upstream.gate.set()
    assert results == [200, 200, 200] and upstream.max_in_flight == 3


@pytest.mark.trio
async def test_clean_shutdown_and_context_manager() -> None:
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient() as client:
            async with run_upstream(api_key=None, reply_text="ctx") as up:
                r = await client.post(
                    f"{up.base_url}/chat/completions", json=chat_body()
                )
                assert r.json()["choices"][0]["message"]["content"] == "ctx"
                # leave an idle keep-alive connection and a stuck request open
                up.gate = trio.Event()
                async with trio.open_nursery() as n:
                    n.start_soon(client.get, f"{up.base_url}/models")
                    n.start_soon(
                        partial(
                            client.post,
                            f"{up.base_url}/chat/completions",
                            json=chat_body(),
                        )
                    )
                    await up.wait_in_flight(1)
                    n.cancel_scope.cancel()
            # server gone: the listener is closed, nothing is left behind
            assert up.base_url is not None
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{up.base_url}/models")


def test_split_words() -> None:
    assert split_words("Hello from upstream.") == ["Hello", " from", " upstream."]
    for text in ["", "  ", " a  b \n", "x"]:
        assert "".join(split_words(text)) == text
