"""R3 faults: a backend that raises mid-stream, replicas whose runtime dies, SIGTERM under load.

* Mid-stream failure (the async FakeBackend's ``fail_jobs`` knob, real server, real clock): the
  client of the failing job gets a 200 stream ending in an ``error`` event (``backend_error``,
  naming the failure) or, not streamed, a 502 JSON error; every other request in flight at the
  same time is answered in full, and the replica keeps serving.
* Runtime death (FakeBackend ``kill``: the runtime dies and abandons what it ran): the dying
  replica's stream ends with an ``error`` event, the model keeps serving on the other replica,
  the admin row's ``replica_details`` marks the dead one with its error; when the last replica
  dies, its running and queued requests get 502 (none hangs), new ones 409 ``model_failed``, the
  admin row says ``failed`` with the error, and an admin load brings the model back.
* The same death on a threaded replica (the real GGUF backend, whose ``generate`` escapes with
  a ``BaseException`` as a crashed runtime would): marked dead, the other replica serves on.
* SIGTERM under load, on a real ``llm-pool serve`` subprocess with the tiny GGUF: the streams
  in flight finish with 200 and their whole text, the requests still queued get 503
  ``shutting_down``, new requests are refused (503 ``shutting_down`` or connection refused),
  and the process exits 0 within ``IDLE_EXIT_BOUND_S`` of the streams' end although the clients
  keep their idle keep-alive connections open.

Upstream 5xx / timeout / garbage faults are covered in tests/remote.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from models.tiny_gguf import expected_continuation
from reliability_kit import (
    CHAT,
    RESPONSES,
    Resources,
    admin_row,
    chat_stream_text,
    check_error_body,
    http_clients,
    responses_stream_text,
    tiny_settings,
    wait_state,
    wait_threads_back,
)
from support.fake_backend import FakeBackendFactory, expected_text
from support.server import running_server
from support.server_process import serve_process
from support.settings import make_settings

from llm_pool.backends import BackendContext, create_backend
from llm_pool.pool.jobs import GenerationStats, Job

pytestmark = pytest.mark.reliability

LIMIT_S = 60
#: The subprocess must be gone this long after its streams ended, with the clients' idle
#: keep-alive connections still open (hypercorn's graceful_timeout is 5 s).
IDLE_EXIT_BOUND_S = 3.0
#: Tokens of each stream running at SIGTERM: ~0.5 s of generation for two replicas here.
STREAM_TOKENS = 1000


def fake_settings(**model: Any) -> Any:
    return make_settings(
        {"m": {"replicas": 2, "replica_max": 2, "max_queue": 16, **model}},
        raw={"service": {"host": "127.0.0.1", "port": 0}},
    )


def responses_body(text: str, max_tokens: int, stream: bool, model: str = "m") -> dict[str, Any]:
    return {"model": model, "input": text, "stream": stream, "decoding": {"max_tokens": max_tokens}}


def chat_body(text: str, max_tokens: int, stream: bool, model: str = "m") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "stream": stream}


async def post(client: httpx.AsyncClient, route: str, body: dict[str, Any]) -> tuple[httpx.Response, bytes]:
    async with client.stream("POST", route, json=body) as r:
        return r, await r.aread()


# ------------------------------------------------------------------------------ mid-stream raise
async def test_r3_backend_raises_mid_stream(long: bool) -> None:
    factory = FakeBackendFactory(token_delay=0.002, fail_jobs={"boom": 3})
    rounds = 10 if long else 2
    with trio.fail_after(LIMIT_S):
        async with running_server(fake_settings(), factory=factory) as base:
            async with http_clients(base, 32) as (client, *_):
                await wait_state(client, "loaded", "m")
                chat = (await client.post(CHAT, content=b"{}")).status_code != 404
                failures: list[str] = []

                async def failing(route: str, stream: bool) -> None:
                    body = (responses_body if route == RESPONSES else chat_body)("boom", 8, stream)
                    r, raw = await post(client, route, body)
                    if not stream:
                        check_error_body(r, 502, {"backend_error"})
                        failures.append(json.loads(raw)["error"]["message"])
                        return
                    assert r.status_code == 200
                    if route == RESPONSES:
                        text, names, error = responses_stream_text(raw)
                        assert error is not None and error["code"] == "backend_error", (names, error)
                        failures.append(error["message"])
                    else:
                        text, finish, payload = chat_stream_text(raw)
                        assert payload is not None and payload["error"]["code"] == "backend_error", payload
                        failures.append(payload["error"]["message"])
                    assert text == "nop"  # the three tokens before the failure reached the client

                async def fine(i: int, route: str, stream: bool) -> None:
                    word = "abcdefghijklmnopqrstuvwxy"[i % 25]
                    body = (responses_body if route == RESPONSES else chat_body)(word, 6, stream)
                    r, raw = await post(client, route, body)
                    assert r.status_code == 200, raw
                    if not stream:
                        data = json.loads(raw)
                        text = data["output_text"] if route == RESPONSES else data["choices"][0]["message"]["content"]
                    elif route == RESPONSES:
                        text, _, error = responses_stream_text(raw)
                        assert error is None
                    else:
                        text, _, payload = chat_stream_text(raw)
                        assert payload is None
                    assert text == expected_text(word, 6)

                routes = [RESPONSES, CHAT] if chat else [RESPONSES]
                for _ in range(rounds):
                    async with trio.open_nursery() as nursery:
                        for route in routes:
                            for stream in (True, False):
                                nursery.start_soon(failing, route, stream)
                        for i in range(24):
                            nursery.start_soon(fine, i, routes[i % len(routes)], i % 2 == 0)
                assert set(failures) == {"model 'm' failed: RuntimeError: fake failure at token 3"}
                assert len(failures) == rounds * 2 * len(routes)

                row = await admin_row(client, "m")
                assert row["runtime_state"] == "loaded" and row["last_error"] is None, row
                assert [(d["state"], d["active"], d["error"]) for d in row["replica_details"]] == [("serving", 0, None)] * 2
                assert {b.outcomes.get(j.id) for b in factory.of("m") for j in b.begun} == {"length", "failed"}


# ------------------------------------------------------------------------------ runtime death
async def wait_first_delta(client: httpx.AsyncClient, body: dict[str, Any], started: trio.Event, out: dict[str, Any]) -> None:
    """Stream ``body``; set ``started`` at the first delta; keep the whole body in ``out``."""
    async with client.stream("POST", RESPONSES, json=body) as r:
        out["status"] = r.status_code
        chunks: list[bytes] = []
        async for chunk in r.aiter_bytes():
            chunks.append(chunk)
            if not started.is_set() and b"output_text.delta" in b"".join(chunks[-2:]):
                started.set()
        out["raw"] = b"".join(chunks)
    started.set()


async def test_r3_replica_death_then_the_last_one(short_thread_idle: None) -> None:
    factory = FakeBackendFactory(token_delay=0.005)
    before = Resources.now()
    with trio.fail_after(LIMIT_S):
        # no restarts: a dead replica stays dead here (restarts: tests/pool/test_healing.py)
        async with running_server(fake_settings(restart_max_attempts=0), factory=factory) as base:
            async with http_clients(base, 32) as (client, *_):
                await wait_state(client, "loaded", "m")
                one, two = factory.of("m")

                # a long stream on each replica; replica 1 dies under its stream
                streams: list[tuple[dict[str, Any], trio.Event]] = [({}, trio.Event()), ({}, trio.Event())]
                async with trio.open_nursery() as nursery:
                    for i, (first_out, first_started) in enumerate(streams):
                        body = responses_body("ab"[i], 100, True)
                        nursery.start_soon(wait_first_delta, client, body, first_started, first_out)
                        await first_started.wait()
                    one.kill("fake segfault")
                    more = [await client.post(RESPONSES, json=responses_body(c, 4, False)) for c in "cde"]
                for r, c in zip(more, "cde", strict=True):
                    assert r.status_code == 200 and r.json()["output_text"] == expected_text(c, 4), r.text
                text, _, error = responses_stream_text(streams[0][0]["raw"])
                assert error is not None and (error["code"], error["message"]) == (
                    "backend_error",
                    "model 'm' failed: runtime died: RuntimeError: fake segfault",
                )
                assert expected_text("a", 100).startswith(text) and text != expected_text("a", 100)
                text, _, error = responses_stream_text(streams[1][0]["raw"])
                assert error is None and text == expected_text("b", 100)

                row = await admin_row(client, "m")
                assert (row["runtime_state"], row["loaded_replicas"], row["runtime_inflight"]) == ("loaded", 1, 0), row
                assert [(d["name"], d["state"], d["error"]) for d in row["replica_details"]] == [
                    ("m#1", "dead", "runtime died: RuntimeError: fake segfault"),
                    ("m#2", "serving", None),
                ]

                # the last replica dies with a stream running and three requests queued
                out: dict[str, Any] = {}
                started = trio.Event()
                queued: list[httpx.Response] = []

                async def queue_one(c: str) -> None:
                    queued.append(await client.post(RESPONSES, json=responses_body(c, 4, False)))

                t0 = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait_first_delta, client, responses_body("f", 100, True), started, out)
                    await started.wait()
                    for c in "ghi":
                        nursery.start_soon(queue_one, c)
                    while (await admin_row(client, "m"))["queue_depth"] < 3:  # noqa: ASYNC110 - polling over HTTP
                        await trio.sleep(0.005)
                    two.kill("fake segfault")
                assert time.perf_counter() - t0 < 5, "the requests of a dead model must end at once"
                _, _, error = responses_stream_text(out["raw"])
                assert error is not None and error["message"] == "model 'm' failed: runtime died: RuntimeError: fake segfault"
                for r in queued:
                    check_error_body(r, 502, {"backend_error"})
                    assert r.json()["error"]["message"] == "model 'm' failed: no replica left: runtime died: RuntimeError: fake segfault"
                r = await client.post(RESPONSES, json=responses_body("j", 4, False))
                check_error_body(r, 409, {"model_failed"})
                assert r.json()["error"]["message"] == "model 'm' failed while serving: runtime died: RuntimeError: fake segfault"
                row = await admin_row(client, "m")
                assert (row["runtime_state"], row["last_error"]) == ("failed", "runtime died: RuntimeError: fake segfault")

                # an admin load brings it back
                r = await client.post("/v1/admin/models/m/load")
                assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
                r = await client.post(RESPONSES, json=responses_body("k", 4, False))
                assert r.status_code == 200 and r.json()["output_text"] == expected_text("k", 4)
        threads = await wait_threads_back(before.threads, within_s=5)
    assert threads <= before.threads and Resources.now().tasks == before.tasks


class RuntimeCrash(BaseException):
    """What a crashed native runtime looks like from Python: not an ``Exception``."""


async def test_r3_threaded_replica_death_keeps_the_model_serving(tiny_gguf: Path, short_thread_idle: None) -> None:
    def factory(ctx: BackendContext) -> Any:
        backend: Any = create_backend(ctx)
        generate = backend.generate

        def crashing(job: Job) -> GenerationStats:
            if job.request.input == "crash":
                raise RuntimeCrash("llama.cpp aborted")
            stats: GenerationStats = generate(job)
            return stats

        backend.generate = crashing
        return backend

    before = Resources.now()
    with trio.fail_after(LIMIT_S):
        # no restarts: a dead replica stays dead here (restarts: tests/pool/test_healing.py)
        async with running_server(tiny_settings(tiny_gguf, restart_max_attempts=0), factory=factory) as base:
            async with http_clients(base, 16) as (client, *_):
                await wait_state(client, "loaded")
                r = await client.post(RESPONSES, json=responses_body("crash", 4, False, "tiny"))
                check_error_body(r, 502, {"backend_error"})
                assert r.json()["error"]["message"] == "model 'tiny' failed: RuntimeCrash: llama.cpp aborted"
                while len((row := await admin_row(client))["replica_details"]) != 2 or row["loaded_replicas"] != 1:  # noqa: ASYNC110
                    await trio.sleep(0.005)
                dead = [d for d in row["replica_details"] if d["state"] == "dead"]
                assert [d["error"] for d in dead] == ["runtime died: RuntimeCrash: llama.cpp aborted"], row
                for c in "abcdef":
                    r = await client.post(RESPONSES, json=responses_body(c, 5, False, "tiny"))
                    assert r.status_code == 200 and r.json()["output_text"] == expected_continuation(c, 5), r.text
                assert (await admin_row(client))["runtime_state"] == "loaded"
        threads = await wait_threads_back(before.threads, within_s=5)
    assert threads <= before.threads, "the dead replica's worker thread is still running"


# ------------------------------------------------------------------------------ SIGTERM
def write_config(path: Path, model: Path) -> Path:
    path.write_text(
        f"""
[service]
host = "127.0.0.1"
port = 0
log_level = "info"
shutdown_drain_s = 30

[engine.models.tiny]
model_path = "{model}"
backend = "gguf"
prompt_format = "native"
gguf_n_ctx = 1024
n_threads = 1
replicas = 2
replica_max = 2
max_queue = 16
"""
    )
    return path


async def test_r3_sigterm_during_load_drains_and_exits_0(tiny_gguf: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "pool.toml", tiny_gguf)
    with trio.fail_after(LIMIT_S):
        async with serve_process(config) as (proc, log):
            url = (await log.wait_for("serving"))["urls"][0]  # raises if it exits first
            await run_sigterm_scenario(url, proc)
    records = log.records
    raw = [r["event"] for r in records if r["level"] == "raw"]
    print("R3 SIGTERM: non-JSON stderr lines:", raw[:10])
    errors = [r for r in records if r["level"] in ("error", "critical") or "exception" in r]
    assert errors == [], errors[:3]
    # the log outlived the two replicas' loads (llama.cpp's quiet load once left fds 1/2 on
    # /dev/null) and tells the story: loaded, stopping, the two streams served
    events = [r["event"] for r in records]
    assert "model tiny loaded with 2 replica(s)" in events and "stopping: draining running requests" in events, events
    served = [r for r in records if r["event"] == "inference" and r["stream"] and r["status"] == 200]
    assert len(served) == 2, served


async def run_sigterm_scenario(base: str, proc: trio.Process) -> None:
    streams: list[tuple[dict[str, Any], trio.Event]] = [({}, trio.Event()), ({}, trio.Event())]
    queued: list[httpx.Response] = []
    refused: list[str] = []
    t: dict[str, float] = {}

    async def knock() -> None:
        """New requests after SIGTERM, each on a new connection, until the server is gone."""
        async with http_clients(base, 1) as (fresh,):
            while True:
                try:
                    body = responses_body("z", 4, False, "tiny")
                    r = await fresh.post(RESPONSES, json=body, headers={"Connection": "close"})
                except httpx.TransportError as e:
                    refused.append(type(e).__name__)
                    return
                refused.append(check_error_body(r, 503, {"shutting_down"}))
                await trio.sleep(0.05)

    async with trio.open_nursery() as outer:
        async with http_clients(base, 16) as (client, *_):
            await wait_state(client, "loaded")

            async def queue_one(c: str) -> None:
                queued.append(await client.post(RESPONSES, json=responses_body(c, 8, False, "tiny")))

            # two long streams, one per replica, and three requests queued behind them
            async with trio.open_nursery() as nursery:
                for i, (out, started) in enumerate(streams):
                    body = responses_body("ab"[i], STREAM_TOKENS, True, "tiny")
                    nursery.start_soon(wait_first_delta, client, body, started, out)
                    await started.wait()
                for c in "cde":
                    nursery.start_soon(queue_one, c)
                # both streams' jobs still generating, three jobs queued: now
                while (row := await admin_row(client))["queue_depth"] < 3:  # noqa: ASYNC110 - polling over HTTP
                    await trio.sleep(0.005)
                assert row["runtime_inflight"] == 2, row
                t["sigterm"] = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                outer.start_soon(knock)
            t["streams_done"] = time.perf_counter()
            # the clients' keep-alive connections stay open, idle: the server closes them itself
            # (they once held the exit for hypercorn's whole 5 s graceful_timeout)
            with trio.fail_after(IDLE_EXIT_BOUND_S):
                code = await proc.wait()
            t["exited"] = time.perf_counter()
    print(
        f"\nR3 SIGTERM: streams done {t['streams_done'] - t['sigterm']:.2f}s and exit "
        f"{t['exited'] - t['sigterm']:.2f}s after SIGTERM; new requests got {Counter(refused)}"
    )
    assert code == 0
    for i, (out, _) in enumerate(streams):
        assert out["status"] == 200
        text, names, error = responses_stream_text(out["raw"])
        assert error is None, error
        assert text == expected_continuation("ab"[i], STREAM_TOKENS)
    for r in queued:
        check_error_body(r, 503, {"shutting_down"})
    assert refused and refused[-1] in ("ConnectError", "RemoteProtocolError", "ReadError"), refused
    assert set(refused[:-1]) <= {"shutting_down"}
