"""R2 unload and resize under load: the R1 server and load, with admin calls in the middle.

* Unload while 256 clients hammer the model: the jobs already on a replica finish with a
  complete 200; the jobs still queued, and requests arriving while it unloads, get 409
  ``model_unloading`` (then ``model_not_loaded``); no job starts once the unload began; nothing
  hangs (every request ends within ``REQUEST_BOUND_S``); after a reload the model serves again.
* Resize 2 → 3 → 1 → 2 under the same load drops nothing: every response is 200 or 429, every
  job a replica started ends in a complete 200, and the admin row follows each step.

Which jobs ran, and when the unload began, is seen from inside: the backend factory wraps the
real GGUF backend's ``generate`` and ``ModelRuntime.stop`` is spied on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from reliability_kit import (
    LoadReport,
    Resources,
    admin_row,
    http_clients,
    open_connections,
    routes_available,
    run_load,
    tiny_settings,
    wait_state,
    wait_threads_back,
)
from support.server import running_server

from llm_pool.backends import BackendContext, create_backend
from llm_pool.pool.jobs import GenerationStats, Job
from llm_pool.pool.scheduler import ModelRuntime

pytestmark = pytest.mark.reliability

LIMIT_S = 120
#: No request may take longer than this, whatever the admin calls did meanwhile.  Under this
#: load a 220-token stream takes up to ~6 s here (one scheduling round per SSE frame).
REQUEST_BOUND_S = 30.0
CONNECTIONS = 256
PER_CLIENT = 16


class Spy:
    """Wraps each real backend's ``generate``: which jobs a replica started, and how they ended."""

    def __init__(self) -> None:
        #: job id → when it was dispatched to a replica (perf_counter)
        self.dispatched: dict[str, float] = {}
        self.finished: dict[str, str] = {}
        self.stops: list[dict[str, Any]] = []

    def factory(self, ctx: BackendContext) -> Any:
        backend: Any = create_backend(ctx)
        generate = backend.generate

        def spy(job: Job) -> GenerationStats:
            assert job.t_dispatched is not None
            self.dispatched[job.id] = job.t_dispatched
            stats: GenerationStats = generate(job)
            self.finished[job.id] = stats.finish_reason
            return stats

        backend.generate = spy
        return backend

    def watch_stop(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = ModelRuntime.stop

        async def stop(runtime: ModelRuntime, **kwargs: Any) -> bool:
            self.stops.append({"at": time.perf_counter(), "queued": runtime.waiting, "running": runtime.running})
            return await original(runtime, **kwargs)

        monkeypatch.setattr(ModelRuntime, "stop", stop)


def check_no_job_dropped(report: LoadReport, spy: Spy) -> None:
    """Every job a replica started ended normally and its client got the whole answer."""
    served = {r.job_id: r for r in report.results if r.status == 200}
    for job_id in spy.dispatched:
        assert spy.finished.get(job_id) in ("stop", "length"), (job_id, spy.finished.get(job_id))
        r = served.get(job_id)
        assert r is not None, f"job {job_id} ran on a replica but its client got no 200"
        assert r.stream_error is None and r.text == r.ask.expected, r


def check_bounded(report: LoadReport) -> None:
    slowest = max(r.seconds for r in report.results)
    print("slowest:", [(round(r.seconds, 2), r.status, r.ask) for r in sorted(report.results, key=lambda r: -r.seconds)[:5]])
    assert slowest < REQUEST_BOUND_S, f"a request took {slowest:.1f}s"


async def test_r2_unload_under_load_then_reload(
    tiny_gguf: Path, long: bool, short_thread_idle: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy()
    spy.watch_stop(monkeypatch)
    phase_s = 3.0 if long else 1.0
    before = Resources.now()
    with trio.fail_after(LIMIT_S):
        async with running_server(tiny_settings(tiny_gguf), factory=spy.factory) as base:
            async with http_clients(base, CONNECTIONS, per_client=PER_CLIENT) as clients, http_clients(base, 1) as (admin,):
                await wait_state(admin, "loaded")
                routes = await routes_available(admin)
                await open_connections(clients, PER_CLIENT)
                stop_load = trio.Event()
                reports: list[LoadReport] = []
                t: dict[str, float] = {}

                async def load() -> None:
                    reports.append(
                        await run_load(
                            clients, requests=0, concurrency=CONNECTIONS, routes=routes, seed=3,
                            long_share=0.5, until=stop_load,
                        )
                    )

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(load)
                    while (await admin_row(admin))["queue_depth"] == 0:  # noqa: ASYNC110 - polling over HTTP
                        await trio.sleep(0.01)
                    await trio.sleep(phase_s)

                    t["unload"] = time.perf_counter()
                    r = await admin.post("/v1/admin/models/tiny/unload")
                    t["unloaded"] = time.perf_counter()
                    assert r.status_code == 200, r.text
                    row = r.json()
                    assert (row["runtime_state"], row["runtime_inflight"], row["queue_depth"]) == ("unloaded", 0, 0)
                    await trio.sleep(phase_s / 2)  # clients now get model_not_loaded

                    t["reload"] = time.perf_counter()
                    r = await admin.post("/v1/admin/models/tiny/load")
                    t["reloaded"] = time.perf_counter()
                    assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
                    await trio.sleep(phase_s)
                    stop_load.set()

                # an answer after the reload, asked once the load stopped: while it ran, its 256
                # clients could hold every queue place (429s) for the whole phase
                r = await admin.post(
                    "/v1/responses", json={"model": "tiny", "input": "after the reload", "decoding": {"max_tokens": 2}}
                )
                assert r.status_code == 200, r.text
                t["answered"] = time.perf_counter()
                probe_id = r.json()["id"]
                report = reports[0]
                print(f"\nR2 unload: {report.summary()}; unload took {t['unloaded'] - t['unload']:.2f}s; stop saw {spy.stops}")
                row = await admin_row(admin)
                assert (row["runtime_inflight"], row["queue_depth"]) == (0, 0), row
        threads = await wait_threads_back(before.threads, within_s=5)

    conflicts = {"model_unloading", "model_not_loaded", "model_loading"}
    problems = report.problems(allowed=lambda r: r.status == 409 and r.code in conflicts)
    assert problems == [], f"{len(problems)} bad responses, e.g. {problems[:5]}"
    check_bounded(report)
    assert spy.finished.pop(probe_id) in ("stop", "length") and spy.dispatched.pop(probe_id) > t["reloaded"]
    check_no_job_dropped(report, spy)

    [stop] = spy.stops
    assert stop["queued"] > 0, "the unload should have found queued jobs"
    unloading = [r for r in report.results if r.code == "model_unloading"]
    assert len(unloading) >= stop["queued"], (len(unloading), stop)
    assert all(at < stop["at"] for at in spy.dispatched.values() if at < t["reload"]), "a job started after the unload began"
    assert any(r.code == "model_not_loaded" for r in report.results)
    assert t["answered"] > t["reloaded"]  # the reloaded model answered (the loop above)
    assert threads <= before.threads and Resources.now().fds <= before.fds


async def test_r2_resize_under_load_drops_nothing(tiny_gguf: Path, long: bool, short_thread_idle: None) -> None:
    spy = Spy()
    phase_s = 2.0 if long else 0.6
    before = Resources.now()
    with trio.fail_after(LIMIT_S):
        async with running_server(tiny_settings(tiny_gguf, replicas=2, replica_max=3), factory=spy.factory) as base:
            async with http_clients(base, CONNECTIONS, per_client=PER_CLIENT) as clients, http_clients(base, 1) as (admin,):
                await wait_state(admin, "loaded")
                routes = await routes_available(admin)
                await open_connections(clients, PER_CLIENT)
                stop_load = trio.Event()
                reports: list[LoadReport] = []
                steps: list[tuple[int, float, list[Any]]] = []

                async def load() -> None:
                    reports.append(
                        await run_load(
                            clients, requests=0, concurrency=CONNECTIONS, routes=routes, seed=4,
                            long_share=0.5, until=stop_load,
                        )
                    )

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(load)
                    await trio.sleep(phase_s)
                    for replicas in (3, 1, 2):
                        t0 = time.perf_counter()
                        r = await admin.post("/v1/admin/models/tiny/replicas", json={"replicas": replicas})
                        assert r.status_code == 200, r.text
                        row = r.json()
                        steps.append((replicas, time.perf_counter() - t0, [d["name"] for d in row["replica_details"]]))
                        assert (row["runtime_state"], row["replicas"], row["loaded_replicas"]) == ("loaded", replicas, replicas)
                        assert [d["state"] for d in row["replica_details"]] == ["serving"] * replicas, row
                        await trio.sleep(phase_s)
                    stop_load.set()

                report = reports[0]
                print(f"\nR2 resize: {report.summary()}; steps (replicas, seconds, names) {steps}")
                row = await admin_row(admin)
                assert (row["runtime_inflight"], row["queue_depth"]) == (0, 0), row
        threads = await wait_threads_back(before.threads, within_s=5)

    problems = report.problems()
    assert problems == [], f"{len(problems)} bad responses, e.g. {problems[:5]}"
    assert {code for status, code in report.statuses() if status != 200} <= {"executor_queue_full"}
    check_bounded(report)
    check_no_job_dropped(report, spy)
    assert len(spy.dispatched) >= 20, "too little was served to prove anything"
    assert threads <= before.threads and Resources.now().fds <= before.fds
