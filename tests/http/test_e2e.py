"""End to end over a real socket: ``pool.server.serve`` (hypercorn + manager) on port 0
(``support.server.start_server``), talked to with httpx, on the real clock (every step bounded
by ``trio.fail_after``).  The backend is the echo fake, so this stays fast and needs no model
file."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.replies import METRIC_KEYS, RESP_ID
from support.server import start_server
from support.settings import make_settings
from support.sse import parse_responses_sse

BOUND = 10.0


@pytest.fixture
async def server(nursery: trio.Nursery, control: FakeBackendFactory) -> str:
    settings = make_settings(
        {"m": {"replicas": 1, "replica_max": 2}}, {"service": {"host": "127.0.0.1", "port": 0, "max_body_bytes": 4096}}
    )
    with trio.fail_after(BOUND):
        base_url = await start_server(nursery, settings, factory=control)
    assert base_url.startswith("http://127.0.0.1:") and not base_url.endswith(":0")
    return base_url


async def test_end_to_end_over_http(server: str, control: FakeBackendFactory) -> None:
    control.configure(token_delay=0.05)
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient(base_url=server, timeout=BOUND) as client:
            # the server answers at once; the model loads in the background, and an admin load
            # of a loading model waits for that load to end (the manager's event)
            r = await client.post("/v1/admin/models/m/load", json={})
            assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
            assert (await client.get("/v1/models")).json()["models"] == ["m"]

            r = await client.post("/v1/responses", json={"model": "m", "input": "The capital of France"})
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            body = r.json()
            assert RESP_ID.match(body["id"]) and body["object"] == "response" and body["model"] == "m"
            # llm-pool's output item; OpenAI SDKs (X-Stainless-Lang) get OpenAI's message item
            assert body["output"] == [{"type": "output_text", "text": "The capital of France"}]
            r = await client.post(
                "/v1/responses", json={"model": "m", "input": "x y"}, headers={"X-LLM-Pool-Output": "openai"}
            )
            [item] = r.json()["output"]
            assert item["type"] == "message" and item["role"] == "assistant"
            assert item["content"] == [{"type": "output_text", "text": "x y", "annotations": []}]
            assert body["output_text"] == "The capital of France"
            assert METRIC_KEYS <= set(body["metrics"])
            m = body["metrics"]
            assert m["pool_total_wall_ms"] >= m["engine_total_wall_ms"] >= m["backend_inference_wall_ms"] >= 0
            assert m["backend_inference_wall_ms"] >= 4 * 50 * 0.9  # four words, 50 ms apart, really waited

            # streaming, read as it arrives
            t0 = time.perf_counter()
            arrivals: list[tuple[float, bytes]] = []
            async with client.stream("POST", "/v1/responses", json={"model": "m", "input": "a b c d e", "stream": True}) as s:
                assert s.status_code == 200
                assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
                async for chunk in s.aiter_bytes():
                    arrivals.append((time.perf_counter() - t0, chunk))
            raw = b"".join(c for _, c in arrivals)
            events = parse_responses_sse(raw)
            assert [e for e, _ in events] == [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                *["response.output_text.delta"] * 5,
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.metrics",
                "response.completed",
            ]
            assert [d["sequence_number"] for _, d in events] == list(range(14))
            assert events[-1][1]["output_text"] == "a b c d e"
            first_delta = next(t for t, c in arrivals if b"output_text.delta" in c)
            assert first_delta < arrivals[-1][0] - 0.15  # deltas arrived while it was still generating

            # errors over the wire
            r = await client.post("/v1/responses", json={"model": "m", "input": "x", "decoding": {"top_k": 0}})
            assert r.status_code == 400
            assert r.json()["error"] == {
                "type": "invalid_request_error",
                "code": "invalid_request",
                "message": "invalid request body: $.decoding.top_k: expected an integer from 1 to 200",
                "param": "$.decoding.top_k",
            }
            r = await client.post("/v1/responses", content=b'{"model": "m", "input": "caf\xe9"}')
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
            r = await client.post("/v1/responses", json={"model": "m", "input": "x" * 5000})
            assert r.status_code == 413 and r.json()["detail"]["code"] == "payload_too_large"
            r = await client.get("/nope")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            r = await client.get("/v1/admin/models")
            assert r.status_code == 200 and r.json()["models"][0]["runtime_state"] == "loaded"


async def test_chunked_body_above_the_limit_is_413(server: str) -> None:
    async def body() -> Any:
        for _ in range(10):
            yield b"x" * 1000

    with trio.fail_after(BOUND):
        async with httpx.AsyncClient(base_url=server, timeout=BOUND) as client:
            r = await client.post("/v1/responses", content=body())
            assert r.status_code == 413
            assert r.json()["error"]["message"] == "request body larger than 4096 bytes"


async def test_client_disconnect_stops_generation_and_frees_the_replica(
    server: str, control: FakeBackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llm_pool.inference")
    control.configure(token_delay=0.05)
    words = " ".join(f"w{i}" for i in range(100))  # 5 s if it ran to the end
    with trio.fail_after(BOUND):
        async with httpx.AsyncClient(base_url=server, timeout=BOUND) as client:
            r = await client.post("/v1/admin/models/m/load", json={})  # waits for the background load
            assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
            async with client.stream("POST", "/v1/responses", json={"model": "m", "input": words, "stream": True}) as s:
                async for chunk in s.aiter_bytes():
                    if b"output_text.delta" in chunk:
                        break  # leave mid-stream: the connection closes
            t0 = time.perf_counter()
            r = await client.post("/v1/responses", json={"model": "m", "input": "next"})
            assert r.status_code == 200 and r.json()["output_text"] == "next"
            assert time.perf_counter() - t0 < 2.5  # the one replica was free again: not after the 5 s stream
            assert words not in control.finished and control.cancelled == [words]
            assert json.dumps(words) not in r.text
    # the request whose client left still has its inference line, written when its job ended
    gone, nxt = [r.fields for r in caplog.records if r.name == "llm_pool.inference"]  # type: ignore[attr-defined]
    assert (gone["status"], gone["error"], gone["stream"], gone["finish_reason"]) == (499, "client_closed_request", True, "cancelled")
    assert 1 <= gone["metrics"]["engine_output_tokens"] < 100
    assert (nxt["status"], nxt["error"]) == (200, None)
