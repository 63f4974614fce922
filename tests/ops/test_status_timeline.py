"""The status page's data: the in-server ring of samples behind its charts
(``pool.observability.Timeline``, ``GET /v1/admin/timeline``) and the ring of recent log lines
behind its live tail (``LogRing``, ``GET /v1/admin/logs``), on trio's autojump clock."""

from __future__ import annotations

import json
import logging

import msgspec
import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.replies import assert_error
from support.server import start_pool
from support.sse import parse_log_sse
from trio.testing import MockClock

import llm_pool.admin.gpu
from llm_pool.admin.rows import TimelineReport
from llm_pool.pool.observability import TIMELINE_WINDOW_S, LogRing, Timeline, percentile

ADMIN_ENV = "LLMPOOL_TEST_TIMELINE_ADMIN_TOKEN"
ADMIN = "timeline-admin-token"


@pytest.fixture(autouse=True)
def _no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same answer on every machine: no GPU."""
    monkeypatch.setattr(llm_pool.admin.gpu, "read_gpus", lambda: ([], "NVML unavailable (test)"))


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    """The ``llm_pool`` loggers at INFO, as ``service.log_level = "info"`` sets them."""
    caplog.set_level(logging.INFO, logger="llm_pool")


def timeline_of(ops: object) -> Timeline:
    timeline: Timeline = ops.app.extensions["llm_pool_timeline"]  # type: ignore[attr-defined]
    return timeline


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([], 0.5) is None


async def test_samples_count_tokens_errors_and_ttft_per_interval(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control, models={"m": {}, "off": {"enabled": False}})
    timeline = timeline_of(ops)
    timeline.sample()  # the interval starts now
    tokens = 0
    for text in ("one two three", "four five", "six"):
        reply = await ops.ask(text)
        assert reply.status == 200, reply.raw
        tokens += reply.json["metrics"]["engine_output_tokens"]
    assert tokens > 0
    refused = await ops.ask("x", model="off")
    assert refused.status == 409
    assert (await ops.ask("x", model="nobody")).status == 404  # never a series of its own
    autojump_clock.jump(5.0)
    sample = timeline.sample()
    assert set(sample.models) == {"m", "off"}
    m = sample.models["m"]
    assert m.requests == 3
    assert m.tokens_per_s == pytest.approx(tokens / 5.0, abs=0.01)
    assert m.ttft_p50_s is not None and m.ttft_p95_s is not None and m.ttft_p50_s <= m.ttft_p95_s
    assert m.errors == {}
    assert sample.models["off"].errors == {"model_not_loaded": 1}
    assert sample.models["off"].tokens_per_s == 0.0

    autojump_clock.jump(5.0)  # a quiet interval: nothing carried over
    quiet = timeline.sample().models["m"]
    assert (quiet.requests, quiet.tokens_per_s, quiet.ttft_p50_s, quiet.errors) == (0, 0.0, None, {})


async def test_running_and_queued_are_read_at_the_sample(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control, models={"m": {"max_queue": 2}})
    runtime = ops.manager.entries["m"].runtime
    assert runtime is not None
    nursery.start_soon(ops.ask, "hold")
    nursery.start_soon(ops.ask, "hold")
    await ops.wait_until(lambda: control.held == 1 and runtime.waiting == 1)
    sample = timeline_of(ops).sample().models["m"]
    assert (sample.running, sample.queued) == (1, 1)
    control.release()
    await ops.wait_until(lambda: runtime.running == 0 and runtime.waiting == 0)
    sample = timeline_of(ops).sample().models["m"]
    assert (sample.running, sample.queued, sample.requests) == (0, 0, 2)


async def test_the_ring_keeps_the_last_fifteen_minutes(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control)
    timeline = timeline_of(ops)
    nursery.start_soon(timeline.run)  # one sample every interval_s, no GPU reader
    await trio.sleep(timeline.interval_s * 200 + 1)
    kept = int(TIMELINE_WINDOW_S / timeline.interval_s)
    assert len(timeline.samples) == kept == 180
    times = [s.t for s in timeline.samples]
    assert times == sorted(times)
    assert times[-1] - times[0] == pytest.approx(timeline.interval_s * (kept - 1))
    assert trio.current_time() - times[0] <= TIMELINE_WINDOW_S


async def test_the_timeline_endpoint_serves_columns_with_the_interval_in_progress(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control, models={"m": {}, "off": {"enabled": False}})
    timeline = timeline_of(ops)
    timeline.sample()
    autojump_clock.jump(5.0)
    timeline.sample()
    autojump_clock.jump(2.0)
    assert (await ops.ask("alpha beta")).status == 200
    assert (await ops.ask("x", model="off")).status == 409
    reply = await ops.get("/v1/admin/timeline")
    assert reply.status == 200, reply.raw
    report = msgspec.json.decode(reply.raw, type=TimelineReport)  # every key declared
    assert (report.interval_s, report.window_s) == (5.0, 900.0)
    assert len(report.t) == 3  # two samples, then the interval in progress
    assert report.t == sorted(report.t) and report.t[1] - report.t[0] == pytest.approx(5.0, abs=0.01)
    m, off = report.models["m"], report.models["off"]
    for series in (m.tokens_per_s, m.running, m.queued, m.ttft_p50_s, m.ttft_p95_s, m.requests):
        assert len(series) == 3
    assert m.requests == [0, 0, 1]
    assert m.tokens_per_s[-1] == pytest.approx(2 / 2.0, abs=0.01)  # 2 tokens over the 2 s so far
    assert off.errors == {"model_not_loaded": [0, 0, 1]}
    assert report.gpus == [] and report.gpu_error == "NVML unavailable (test)"
    assert m.memory_source in ("observed_load_delta", "model_artifact_size", "unavailable")
    assert report.process_rss_mib is not None and report.process_rss_mib > 0


# ------------------------------------------------------------------ the log tail
def record(message: str, **fields: object) -> logging.LogRecord:
    rec = logging.LogRecord("llm_pool.test", logging.INFO, __file__, 1, message, None, None)
    rec.fields = fields  # type: ignore[attr-defined]
    return rec


def test_the_log_ring_is_bounded_and_shows_no_paths() -> None:
    ring = LogRing(capacity=3)
    for i in range(10):
        ring.emit(record(f"line {i}", model="m"))
    assert [line["event"] for _, line in ring.lines] == ["line 7", "line 8", "line 9"]
    assert [seq for seq, _ in ring.since(0)] == [8, 9, 10]
    ring.emit(record("load failed", model="m", error="cannot open /srv/models/secret-name.gguf: no such file", long="x" * 5000))
    _, line = ring.lines[-1]
    assert "/srv/models" not in json.dumps(line) and "secret-name" not in json.dumps(line)
    assert line["error"].startswith("cannot open [path]")
    assert len(line["long"]) < 2100
    assert ring.since(0, model="other") == []
    kept = ring.last
    access = logging.LogRecord("llm_pool.access", logging.INFO, __file__, 1, "access", None, None)
    access.fields = {"path": "/v1/admin/models", "status": 200}  # type: ignore[attr-defined]
    ring.emit(access)  # the status page's own polling
    assert ring.last == kept
    access.fields = {"path": "/v1/responses", "status": 413}  # type: ignore[attr-defined]
    ring.emit(access)
    assert ring.last == kept + 1 and ring.lines[-1][1]["status"] == 413


async def test_the_log_endpoint_needs_the_admin_token(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ADMIN_ENV, ADMIN)
    ops = await start_pool(nursery, control, {"service": {"admin_token_env": ADMIN_ENV}})
    for path in ("/v1/admin/logs", "/v1/admin/timeline"):
        assert_error(await ops.get(path), 401, "unauthorized")
        assert (await ops.get(path, headers={"Authorization": f"Bearer {ADMIN}"})).status == 200


async def test_the_log_endpoint_filters_by_model_and_refuses_bad_queries(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, info_logs: None
) -> None:
    ops = await start_pool(nursery, control, models={"tail-a": {}, "tail-b": {}})
    assert (await ops.ask("for a", model="tail-a")).status == 200
    assert (await ops.ask("for b", model="tail-b")).status == 200
    reply = await ops.get("/v1/admin/logs", query={"model": "tail-a"})
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
    lines = parse_log_sse(reply.raw)
    assert lines and {line["model"] for line in lines} == {"tail-a"}
    inference = [line for line in lines if line["event"] == "inference"]
    assert inference[-1]["status"] == 200 and inference[-1]["metrics"]["engine_output_tokens"] > 0
    assert inference[-1]["request_id"]

    assert len(parse_log_sse((await ops.get("/v1/admin/logs", query={"backlog": "1"})).raw)) <= 1
    assert_error(await ops.get("/v1/admin/logs", query={"model": "nobody"}), 404, "unknown_model")
    assert_error(await ops.get("/v1/admin/logs", query={"backlog": "many"}), 400, "invalid_request", param="backlog")
    assert_error(await ops.get("/v1/admin/logs", query={"backlog": "100000"}), 400, "invalid_request", param="backlog")
    assert_error(await ops.get("/v1/admin/logs", query={"follow": "maybe"}), 400, "invalid_request", param="follow")


async def test_following_the_log_shows_a_line_written_after_it_opened(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, info_logs: None
) -> None:
    ops = await start_pool(nursery, control, models={"tail-f": {}})
    seen: list[dict[str, object]] = []
    got = trio.Event()

    async def follow() -> None:
        conn = ops.client.request("/v1/admin/logs", method="GET", query_string={"model": "tail-f", "backlog": "0", "follow": "true"})
        async with conn:
            await conn.send_complete()
            raw = b""
            while not got.is_set():
                raw += await conn.receive()
                if raw.endswith(b"\n\n"):
                    seen.extend(parse_log_sse(raw))
                    raw = b""
                    if any(line["event"] == "inference" for line in seen):
                        got.set()

    nursery.start_soon(follow)
    await trio.testing.wait_all_tasks_blocked()
    assert (await ops.ask("after the tail opened", model="tail-f")).status == 200
    with trio.fail_after(30):
        await got.wait()
    (line,) = [line for line in seen if line["event"] == "inference"]
    assert line["model"] == "tail-f" and line["status"] == 200


async def test_gpu_memory_is_a_column_per_device_read_now_for_the_last_point(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gpu(used: int) -> llm_pool.admin.gpu.GpuInfo:
        return llm_pool.admin.gpu.GpuInfo(
            index=0, name="NVIDIA H200", used_mib=used, total_mib=143771, free_mib=143771 - used, used_over_total=""
        )

    ops = await start_pool(nursery, control)
    timeline = timeline_of(ops)
    timeline.sample([gpu(1000)])
    autojump_clock.jump(5.0)
    timeline.sample()  # NVML not read this time
    autojump_clock.jump(1.0)
    monkeypatch.setattr(llm_pool.admin.gpu, "read_gpus", lambda: ([gpu(3000)], None))
    report = msgspec.json.decode((await ops.get("/v1/admin/timeline")).raw, type=TimelineReport)
    (only,) = report.gpus
    assert (only.index, only.name, only.total_mib) == (0, "NVIDIA H200", 143771)
    assert only.used_mib == [1000, None, 3000]
    assert report.gpu_error is None
