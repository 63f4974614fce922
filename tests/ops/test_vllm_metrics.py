"""What vLLM's dashboards read (issue 19 §2), under our ``llm_pool:`` prefix and with vLLM's
``model_name`` label beside ``model``: inter-token latency, finish reasons, slot usage."""

from __future__ import annotations

import pytest
import trio
from ops_kit import Samples
from support.fake_backend import FakeBackendFactory
from support.server import start_pool
from trio.testing import MockClock


async def test_inter_token_latency_and_finish_reasons(autojump_clock: MockClock, nursery: trio.Nursery) -> None:
    control = FakeBackendFactory.echo()
    pool = await start_pool(nursery, control)
    # the fake reports 1 ms of decoding after the first token: 3 tokens → 0.5 ms a gap, 2 → 1 ms
    assert (await pool.respond({"model": "m", "input": "a b c"})).status == 200
    assert (await pool.respond({"model": "m", "input": "a b c", "decoding": {"max_tokens": 2}})).status == 200
    assert (await pool.respond({"model": "m", "input": "a"})).status == 200  # one token: no gap to observe
    s = await Samples.scrape(pool)
    labels = {"model": "m", "model_name": "m"}
    assert s("llm_pool:request_success_total", **labels, finished_reason="stop") == 2
    assert s("llm_pool:request_success_total", **labels, finished_reason="length") == 1
    assert s("llm_pool:request_success_total", **labels, finished_reason="cancelled") == 0
    assert s("llm_pool:inter_token_latency_seconds_count", **labels) == 2
    assert s("llm_pool:inter_token_latency_seconds_sum", **labels) == pytest.approx(0.0015)
    assert s("llm_pool:inter_token_latency_seconds_bucket", **labels, le="0.001") == 2


async def test_slot_usage_is_busy_slots_over_live_slots(autojump_clock: MockClock, nursery: trio.Nursery) -> None:
    control = FakeBackendFactory.echo()
    pool = await start_pool(nursery, control, models={"m": {"model_path": "m.gguf", "replicas": 2, "replica_max": 2}})
    assert (await Samples.scrape(pool))("llm_pool:slot_usage_perc", model="m", model_name="m") == 0
    # held by an event, not a timer: /metrics reads the GPUs on a worker thread, and the
    # autojump clock would run a timer out meanwhile
    nursery.start_soon(pool.respond, {"model": "m", "input": "hold"})
    await pool.wait_until(lambda: pool.manager.entries["m"].runtime.running == 1)
    assert (await Samples.scrape(pool))("llm_pool:slot_usage_perc", model="m", model_name="m") == 0.5
    control.release()
