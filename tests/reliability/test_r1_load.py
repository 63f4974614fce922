"""R1 load: many concurrent clients against a real server and the real tiny GGUF model.

``pool.server.serve`` runs on 127.0.0.1:0 in this test's nursery (real clock, real sockets, two
llama.cpp replicas on their worker threads, one compute thread each, a queue of 16).  256
closed-loop httpx clients (16 ``AsyncClient``s of 16 keep-alive connections) send mixed requests:
``/v1/responses`` and, when it exists, ``/v1/chat/completions``; streamed and not; half of them
1–8 tokens (inputs ending on EOS or on the budget), half 100–220 tokens so the replicas, not
the HTTP layer, are the bottleneck and the queue fills.  Then:

* every response is 200 or 429 (no 5xx, no transport error); each 429 is the JSON error with a
  ``Retry-After``; each 200 is exactly the tiny model's deterministic continuation, with the
  right finish reason; each stream is well formed (strict SSE framing, sequence numbers, one
  terminal event, deltas equal to the final text);
* afterwards the admin row shows no in-flight job and an empty queue; once the server stopped,
  the trio task tree, Python threads and file descriptors are back to what they were before
  it started, and RSS grew less than the bounds below.

CI form: 600 requests (about 5 s on 2 cores); ``--long``: 2,000 requests, as issue 9 asks.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio
from reliability_kit import (
    RESPONSES,
    Resources,
    admin_row,
    http_clients,
    open_connections,
    routes_available,
    rss_mib,
    run_load,
    tiny_settings,
    wait_state,
    wait_threads_back,
)
from support.server import running_server

from llm_pool.backends import BackendContext
from llm_pool.backends.gguf import GGUFBackend
from llm_pool.pool.jobs import GenerationRequest, GenerationStats, Job, Message

pytestmark = pytest.mark.reliability

LIMIT_S = 120
CONNECTIONS = 256
PER_CLIENT = 16
#: RSS the process may gain over a whole run, server start to server stop: two llama.cpp
#: contexts' allocator arenas, hypercorn/httpx connection state for 256 clients.  Measured
#: here: +14 to +26 MiB (CI and --long forms).
RSS_GROWTH_BOUND_MIB = 64.0
#: RSS the load itself may add once the server is warm; per-request state must not pile up.
#: Measured here: +6 to +15 MiB for 600 to 2,000 requests.
RSS_LOAD_BOUND_MIB = 32.0


async def test_r1_load_mixed_stream_and_json(tiny_gguf: Path, long: bool, short_thread_idle: None) -> None:
    requests = 2000 if long else 600
    before = Resources.now()
    with trio.fail_after(LIMIT_S):
        async with running_server(tiny_settings(tiny_gguf, replicas=2, max_queue=16)) as base:
            async with http_clients(base, CONNECTIONS, per_client=PER_CLIENT) as clients:
                await wait_state(clients[0], "loaded")
                routes = await routes_available(clients[0])
                warm = await run_load(clients[0], requests=64, concurrency=8, routes=routes, seed=1)
                assert warm.problems() == [], warm.problems()[:5]
                await open_connections(clients, PER_CLIENT)
                rss_warm = rss_mib()

                report = await run_load(
                    clients, requests=requests, concurrency=CONNECTIONS, routes=routes, seed=2, long_share=0.5
                )
                rss_loaded = rss_mib()
                print(f"\nR1 {report.summary()}")

                problems = report.problems()
                assert problems == [], f"{len(problems)} bad responses, e.g. {problems[:5]}"
                assert {code for status, code in report.statuses() if status == 429} == {"executor_queue_full"}
                served = [r for r in report.results if r.status == 200]
                # the pool served, not only refused (how much depends on the machine: the 256
                # clients share this process's event loop with the server)
                assert len(served) >= max(20, requests // 50), report.summary()
                # every route and mode is served under load, not only refused.  ~27 of 600 are
                # served and a streamed /v1/responses is ~15 % of the asks, so one round misses a
                # kind about 1 time in 50: up to two more rounds of the same load may fill it in
                wanted = {(route, stream) for route in routes for stream in (True, False)}
                for seed in (3, 4):
                    if {(r.ask.route, r.ask.stream) for r in served} == wanted:
                        break
                    more = await run_load(
                        clients, requests=requests, concurrency=CONNECTIONS, routes=routes, seed=seed, long_share=0.5
                    )
                    assert more.problems() == [], more.problems()[:5]
                    served += [r for r in more.results if r.status == 200]
                kinds = {(r.ask.route, r.ask.stream) for r in served}
                assert kinds == wanted, kinds
                assert len({r.job_id for r in served}) == len(served)

                row = await admin_row(clients[0])
                assert (row["runtime_inflight"], row["queue_depth"], row["inflight_requests"]) == (0, 0, 0), row
                assert [(d["state"], d["active"]) for d in row["replica_details"]] == [("serving", 0)] * 2, row
        t_stop = time.perf_counter()
        threads = await wait_threads_back(before.threads, within_s=5, os_baseline=before.os_threads)
    after = Resources.now()
    print(
        f"R1 resources before/after: tasks {len(before.tasks)}/{len(after.tasks)}, "
        f"threads {before.threads}/{threads} (OS {before.os_threads}/{after.os_threads}), "
        f"fds {before.fds}/{after.fds}, RSS {before.rss_mib:.1f} before/{rss_warm:.1f} warm/"
        f"{rss_loaded:.1f} loaded/{after.rss_mib:.1f} MiB after stop; "
        f"threads back in {time.perf_counter() - t_stop:.2f}s"
    )
    assert after.tasks == before.tasks
    assert threads <= before.threads, f"{threads - before.threads} thread(s) still running after the server stopped"
    assert after.os_threads <= before.os_threads
    assert after.fds <= before.fds, f"{after.fds - before.fds} file descriptor(s) leaked"
    assert after.rss_mib - before.rss_mib < RSS_GROWTH_BOUND_MIB
    assert rss_loaded - rss_warm < RSS_LOAD_BOUND_MIB


async def test_r1_connection_burst(tiny_gguf: Path) -> None:
    """256 clients connecting at the same moment, each sending one 200-token request: none may
    see its connection reset (a real client pool opening at once, or a load balancer's burst)."""
    with trio.fail_after(LIMIT_S):
        async with running_server(tiny_settings(tiny_gguf, replicas=2, max_queue=16)) as base:
            async with http_clients(base, CONNECTIONS, per_client=1) as clients:
                await wait_state(clients[0], "loaded")
                errors: list[str] = []
                statuses: list[int] = []

                async def one(client: httpx.AsyncClient) -> None:
                    body = {"model": "tiny", "input": "abc", "decoding": {"max_tokens": 200}}
                    try:
                        statuses.append((await client.post(RESPONSES, json=body)).status_code)
                    except httpx.TransportError as e:
                        errors.append(repr(e))

                async with trio.open_nursery() as nursery:
                    for client in clients:
                        nursery.start_soon(one, client)
    assert errors == [], f"{len(errors)} of {CONNECTIONS} connections failed, e.g. {errors[0]}"
    assert set(statuses) <= {200, 429}


async def test_r1_finished_result_is_read_without_a_round_per_token() -> None:
    """Found by R1: ``Job.result()`` took one scheduling round per queued delta, so under load a
    finished 200-token JSON answer reached its client seconds late (pool_total 12 s for an
    engine_total of 1 s at 256 clients).  Reading a finished job must not yield per event."""
    job = Job(GenerationRequest(model="m", messages=[Message(role="user", content="x")]))
    for _ in range(200):
        job.emit("a")  # on the trio thread: delivered at once
    job.finish(GenerationStats(output_tokens=200))
    rounds = 0

    async def ticker() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()  # the ticker is running
            start = rounds
            done = await job.result()
            assert done.text == "a" * 200
            assert rounds - start <= 2
            nursery.cancel_scope.cancel()


def test_r1_parallel_replica_loads_keep_stdout_and_stderr(tiny_gguf: Path) -> None:
    """Found by R1 (its output vanished): llama-cpp-python with ``verbose=False`` silences a load
    by dup2-ing /dev/null over the process's fds 1 and 2 and restoring saved copies; replicas
    loading at once on their threads interleaved that, leaving both fds on /dev/null for good,
    so every later log line of the server was lost.  Loads now hold
    ``backends.llama_common.LLAMA_QUIET_LOAD_LOCK``.  Here four GGUF replicas load at the same moment
    (a barrier), eight times over
    (without the lock this failed 2 runs in 3 with three rounds)."""

    def targets() -> tuple[str, str]:
        return os.readlink("/proc/self/fd/1"), os.readlink("/proc/self/fd/2")

    settings = tiny_settings(tiny_gguf, replicas=3, replica_max=4)
    model = settings.engine.models["tiny"]
    before = targets()
    for _ in range(8):
        backends = [
            GGUFBackend(BackendContext(name="tiny", replica_index=i, replicas=4, model=model, settings=settings, kind="gguf"))
            for i in range(4)
        ]
        barrier = threading.Barrier(len(backends))

        def load(backend: GGUFBackend, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(timeout=LIMIT_S)
            backend.load()

        threads = [threading.Thread(target=load, args=(b,)) for b in backends]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=LIMIT_S)
        for b in backends:
            b.close()
        assert targets() == before, "a parallel load left stdout/stderr on /dev/null"
