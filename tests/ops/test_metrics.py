"""``GET /metrics``: the series exist from the start and follow requests as they run and end."""

from __future__ import annotations

import prometheus_client
import pytest
import trio
from ops_kit import MODELS, Samples
from support.fake_backend import FakeBackendFactory
from support.server import start_pool
from trio.testing import MockClock

import llm_pool.admin.gpu
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Decoding, GenerationRequest, GenerationStats, Job, Message
from llm_pool.pool.observability import REASONS, outcome_reason

# No virtual-time watchdog here: /metrics reads GPUs on a worker thread, and while a thread runs
# the autojump clock leaps to the next timer, which would be the watchdog's.


def make_job(text: str, model: str = "m") -> Job:
    return Job(GenerationRequest(model=model, messages=[Message(role="user", content=text)], decoding=Decoding()))


@pytest.fixture(autouse=True)
def _no_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same answer on every machine: no GPU (tests that want one install their own)."""
    monkeypatch.setattr(llm_pool.admin.gpu, "read_gpus", lambda: ([], "NVML unavailable (test)"))


async def test_every_series_exists_at_zero_before_any_request(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    ops = await start_pool(nursery, control, models={"m": {}, "off": {"enabled": False}})
    reply = await ops.get("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    s = Samples.parse(reply.text)
    for model, state in (("m", "loaded"), ("off", "unloaded")):
        assert s("llm_pool:num_requests_running", model=model, model_name=model) == 0
        assert s("llm_pool:num_requests_waiting", model=model, model_name=model) == 0
        for st in ("unloaded", "loading", "loaded", "unloading", "failed"):
            assert s("llm_pool:model_state", model=model, model_name=model, state=st) == (1 if st == state else 0)
        for reason in REASONS:
            assert s("llm_pool:request_outcomes_total", model=model, model_name=model, reason=reason) == 0
        for hist in ("request_queue_time_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds",
                     "request_inference_time_seconds"):
            assert s(f"llm_pool:{hist}_count", model=model, model_name=model) == 0
        assert s("llm_pool:prompt_tokens_total", model=model, model_name=model) == 0
        assert s("llm_pool:generation_tokens_total", model=model, model_name=model) == 0
        assert s("llm_pool:prompt_tokens_cached_total", model=model, model_name=model) == 0  # issue 16
        # what vLLM's dashboards read, under our prefix and with its model_name label
        assert s("llm_pool:inter_token_latency_seconds_count", model=model, model_name=model) == 0
        for reason in ("stop", "length", "cancelled"):
            assert s("llm_pool:request_success_total", model=model, model_name=model, finished_reason=reason) == 0
        assert s("llm_pool:slot_usage_perc", model=model, model_name=model) == 0
    assert s("llm_pool:loaded_replicas", model="m", model_name="m") == 1
    assert s("llm_pool:loaded_replicas", model="off", model_name="off") == 0
    # labelled by model only, never by replica
    assert all("replica" not in dict(labels) for _, labels in s.values)


async def test_running_waiting_and_outcomes_follow_requests(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    ops = await start_pool(nursery, control, models={"m": {"max_queue": 1}})
    runtime = ops.manager.entries["m"].runtime
    assert runtime is not None
    replies = {}

    async def send(key: str) -> None:
        replies[key] = await ops.ask("hold")

    nursery.start_soon(send, "a")
    await ops.wait_until(lambda: control.held == 1)
    s = await Samples.scrape(ops)
    assert s("llm_pool:num_requests_running", model="m", model_name="m") == 1
    assert s("llm_pool:num_requests_waiting", model="m", model_name="m") == 0

    nursery.start_soon(send, "b")
    await ops.wait_until(lambda: runtime.waiting == 1)
    s = await Samples.scrape(ops)
    assert s("llm_pool:num_requests_running", model="m", model_name="m") == 1
    assert s("llm_pool:num_requests_waiting", model="m", model_name="m") == 1

    full = await ops.ask("hold")  # one running, one waiting, max_queue 1: refused
    assert full.status == 429, full.raw
    s = await Samples.scrape(ops)
    assert s("llm_pool:request_outcomes_total", model="m", model_name="m", reason="rejected_queue_full") == 1
    assert s("llm_pool:request_outcomes_total", model="m", model_name="m", reason="ok") == 0
    assert s("llm_pool:e2e_request_latency_seconds_count", model="m", model_name="m") == 0

    control.release()
    await ops.wait_until(lambda: len(replies) == 2)
    assert [r.status for r in replies.values()] == [200, 200]
    s = await Samples.scrape(ops)
    assert s("llm_pool:num_requests_running", model="m", model_name="m") == 0
    assert s("llm_pool:num_requests_waiting", model="m", model_name="m") == 0
    assert s("llm_pool:request_outcomes_total", model="m", model_name="m", reason="ok") == 2
    assert s("llm_pool:request_outcomes_total", model="m", model_name="m", reason="rejected_queue_full") == 1
    # refused requests are outcomes only: the histograms count the two that ran
    for hist in ("request_queue_time_seconds", "time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_inference_time_seconds"):
        assert s(f"llm_pool:{hist}_count", model="m", model_name="m") == 2, hist
        assert s(f"llm_pool:{hist}_bucket", model="m", model_name="m", le="+Inf") == 2, hist
    assert s("llm_pool:prompt_tokens_total", model="m", model_name="m") == 2  # one word each
    assert s("llm_pool:generation_tokens_total", model="m", model_name="m") == 2  # "held" each


async def test_failures_timeouts_and_cancellations_are_counted_by_reason(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control, models={"m": {"max_queue": 4, "queue_timeout_s": 5}})
    manager = ops.manager

    assert (await ops.ask("fail")).status == 502

    held = make_job("hold")
    manager.submit(held, allow_remote=False)
    await ops.wait_until(lambda: control.held == 1)
    timed_out = await ops.ask("queued behind the held job")  # waits 5 s in the queue
    assert timed_out.status == 503 and timed_out.json["error"]["code"] == "queue_timeout"

    gone_while_queued = make_job("client leaves while queued")
    manager.submit(gone_while_queued, allow_remote=False)
    gone_while_queued.cancel()  # what the handler does when its client disconnects
    held.cancel()  # the running one: it stops at its next token
    await ops.wait_until(lambda: held.ended)

    dropped = make_job("queued when the model unloads")
    blocker = make_job("hold")
    manager.submit(blocker, allow_remote=False)
    await ops.wait_until(lambda: control.held == 1)
    manager.submit(dropped, allow_remote=False)
    async with trio.open_nursery() as inner:
        inner.start_soon(manager.unload, "m")
        await ops.wait_until(lambda: dropped.ended)
        control.release()
    assert (await ops.ask("after unload")).status == 409
    assert (await ops.ask("unknown model", model="nope")).status == 404

    s = await Samples.scrape(ops)

    def outcome(reason: str) -> float:
        return s("llm_pool:request_outcomes_total", model="m", model_name="m", reason=reason)

    assert outcome("backend_error") == 1
    assert outcome("queue_timeout") == 1
    assert outcome("cancelled") == 2  # one queued, one running
    assert outcome("model_unavailable") == 2  # dropped from the queue by the unload, refused after it
    assert outcome("ok") == 1  # the blocker, released during the drain
    assert sum(outcome(r) for r in REASONS) == 7
    # every admitted request has an end-to-end latency; only dispatched ones a queue time
    assert s("llm_pool:e2e_request_latency_seconds_count", model="m", model_name="m") == 6
    assert s("llm_pool:request_queue_time_seconds_count", model="m", model_name="m") == 3
    assert s("llm_pool:time_to_first_token_seconds_count", model="m", model_name="m") == 3  # "partial", "held", "held"
    assert not any(dict(labels).get("model") == "nope" for _, labels in s.values)  # unknown names: no series


async def test_remote_model_without_allow_remote_is_counted(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    models = {"r": {"backend": "openai_compatible", "remote_base_url": "http://127.0.0.1:9/v1", "remote_model": "x"}}
    ops = await start_pool(nursery, control, models=models)
    reply = await ops.ask("hi", model="r")
    assert reply.status == 403
    s = await Samples.scrape(ops)
    assert s("llm_pool:request_outcomes_total", model="r", model_name="r", reason="rejected_remote_disallowed") == 1


async def test_state_and_replica_gauges_follow_admin_calls(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    loaded = trio.Event()
    control.configure("m", load_gate=loaded)
    ops = await start_pool(nursery, control, models={"m": {"replica_max": 3}}, wait=False)
    s = await Samples.scrape(ops)
    assert s("llm_pool:model_state", model="m", model_name="m", state="loading") == 1
    assert s("llm_pool:loaded_replicas", model="m", model_name="m") == 0
    loaded.set()
    await ops.manager.entries["m"].load_done.wait()

    assert (await ops.post("/v1/admin/models/m/replicas", {"replicas": 3})).status == 200
    s = await Samples.scrape(ops)
    assert s("llm_pool:model_state", model="m", model_name="m", state="loaded") == 1
    assert s("llm_pool:loaded_replicas", model="m", model_name="m") == 3

    assert (await ops.post("/v1/admin/models/m/unload")).status == 200
    s = await Samples.scrape(ops)
    assert s("llm_pool:model_state", model="m", model_name="m", state="unloaded") == 1
    assert s("llm_pool:model_state", model="m", model_name="m", state="loaded") == 0
    assert s("llm_pool:loaded_replicas", model="m", model_name="m") == 0


async def test_no_gpu_series_without_gpus(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    s = await Samples.scrape(ops)
    assert not [n for n in s.names() if "gpu" in n], s.text


async def test_gpu_memory_per_device(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus = [
        llm_pool.admin.gpu.GpuInfo(index=0, name="Fake GPU A", used_mib=1024, total_mib=8192, free_mib=7168, used_over_total="x"),
        llm_pool.admin.gpu.GpuInfo(index=1, name="Fake GPU B", used_mib=0, total_mib=4096, free_mib=4096, used_over_total="y"),
    ]
    monkeypatch.setattr(llm_pool.admin.gpu, "read_gpus", lambda: (gpus, None))
    ops = await start_pool(nursery, control, models=MODELS)
    s = await Samples.scrape(ops)
    assert s("llm_pool:gpu_memory_used_bytes", gpu="0", gpu_name="Fake GPU A") == 1024 * 2**20
    assert s("llm_pool:gpu_memory_total_bytes", gpu="0", gpu_name="Fake GPU A") == 8192 * 2**20
    assert s("llm_pool:gpu_memory_used_bytes", gpu="1", gpu_name="Fake GPU B") == 0
    assert s("llm_pool:gpu_memory_total_bytes", gpu="1", gpu_name="Fake GPU B") == 4096 * 2**20


async def test_each_app_has_its_own_registry(autojump_clock: MockClock, nursery: trio.Nursery) -> None:
    first = await start_pool(nursery, FakeBackendFactory.echo(token_delay=0), models=MODELS)
    second = await start_pool(nursery, FakeBackendFactory.echo(token_delay=0), models=MODELS)
    assert (await first.ask("a b c")).status == 200
    assert (await Samples.scrape(first))("llm_pool:request_outcomes_total", model="m", model_name="m", reason="ok") == 1
    assert (await Samples.scrape(second))("llm_pool:request_outcomes_total", model="m", model_name="m", reason="ok") == 0
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not [n for n in global_names if n.startswith("llm_pool")]


async def test_openmetrics_when_the_scraper_asks(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    reply = await ops.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
    assert reply.text.endswith("# EOF\n")
    assert "llm_pool:num_requests_running" in reply.text


async def test_outcome_reasons_of_every_error_code(autojump_clock: MockClock) -> None:
    job = make_job("x")

    def reason(code: str, status: int = 400) -> str:
        return outcome_reason(job, PoolError(status, code, "m"))

    job.stats = GenerationStats(finish_reason="length")
    assert outcome_reason(job, None) == "ok"
    job.stats = GenerationStats(finish_reason="stop")
    assert outcome_reason(job, None) == "ok"
    job.stats = GenerationStats(finish_reason="cancelled")
    assert outcome_reason(job, None) == "cancelled"
    expected = {
        "executor_queue_full": "rejected_queue_full",
        "fairness_key_queue_full": "rejected_queue_full",
        "priority_not_allowed": "invalid_request",
        "queue_timeout": "queue_timeout",
        "request_cancelled": "cancelled",
        "backend_error": "backend_error",
        "upstream_timeout": "upstream_error",
        "upstream_rate_limit": "upstream_error",
        "upstream_server_error": "upstream_error",
        "upstream_connection_error": "upstream_error",
        "model_not_loaded": "model_unavailable",
        "model_loading": "model_unavailable",
        "model_unloading": "model_unavailable",
        "model_failed": "model_unavailable",
        "shutting_down": "shutting_down",
        "remote_execution_disallowed": "rejected_remote_disallowed",
        "budget_exceeded": "rejected_budget",
        "request_cost_exceeds_max": "rejected_budget",
        "cost_ledger_unavailable": "rejected_budget",
        "invalid_request": "invalid_request",
        "something_new": "error",
    }
    for code, want in expected.items():
        assert reason(code) == want, code
    assert set(expected.values()) | {"ok"} == set(REASONS)
