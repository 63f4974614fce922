"""Budgets under concurrency: many requests at once against a small daily budget never overspend,
and the excess is refused before the queue with 429 ``budget_exceeded`` and the numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from remote_kit import BOUND, StartPool
from support.upstream import FakeUpstream

from llm_pool.backends.ledger import CostLedger
from llm_pool.pool.errors import PoolError

BUDGET = 0.1
SETTINGS: dict[str, Any] = {
    "remote_price_input_per_1m": 1000.0,
    "remote_price_output_per_1m": 2000.0,
    "remote_cost_ledger_path": "ledger.jsonl",
    "remote_budget_daily": BUDGET,
}
ASK = {"instructions": "sys!", "input": "hello world!", "decoding": {"max_tokens": 8}}  # reserves 0.028


def committed_after_each_line(events: list[dict[str, Any]]) -> list[float]:
    """Spent (closing events' costs) + still reserved, after each ledger line."""
    open_: dict[str, float] = {}
    spent = 0.0
    out = []
    for e in events:
        if e["event"] == "reserved":
            open_[e["request_id"]] = e["amount"]
        else:
            open_.pop(e["request_id"], None)
            spent += e["cost"]
        out.append(spent + sum(open_.values()))
    return out


@pytest.mark.parametrize("replicas", [1, 2])
async def test_twenty_at_once_never_overspend(start: StartPool, up: FakeUpstream, replicas: int) -> None:
    up.gate = trio.Event()  # hold every upstream call until all 20 were admitted or refused
    replies: list[Any] = []
    seventeen_replies = trio.Event()
    with trio.fail_after(BOUND):
        pool = await start(**SETTINGS, replicas=replicas, replica_max=2, target_inflight=4)

        async def ask() -> None:
            replies.append(await pool.respond(ASK))
            if len(replies) >= 17:
                seventeen_replies.set()

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(ask)
            await seventeen_replies.wait()  # the refused ones; none is answered while the gate is shut
            await up.wait_in_flight(3)
            assert up.in_flight == 3 and len(replies) == 17  # 3 × 0.028 fit in 0.1; the 4th does not
            row = await pool.row()
            assert row["remote_cost"]["reserved_now"] == pytest.approx(0.084)
            assert row["remote_cost"]["remaining_today"] == pytest.approx(0.016)
            up.gate.set()
        row = await pool.row()
    refused = [r for r in replies if r.status_code == 429]
    assert sorted(r.status_code for r in replies) == [200] * 3 + [429] * 17
    for r in refused:
        assert r.json()["error"]["code"] == "budget_exceeded"
        assert r.json()["error"]["message"] == (
            "model 'r' is over its daily budget: this request may cost up to 0.028 USD but only 0.016 USD of the "
            "0.1 USD daily budget remains (spent today 0, reserved by running requests 0.084); the budget resets "
            "at 00:00 UTC"
        )
    assert len(up.chat_requests) == 3
    events = pool.ledger()
    assert [e["event"] for e in events].count("reserved") == 3
    assert [e["event"] for e in events].count("settled") == 3
    assert max(committed_after_each_line(events)) <= BUDGET + 1e-12
    cost = row["remote_cost"]  # 3 settled at 0.016 (10 prompt + 3 output tokens)
    assert (cost["spent_today"], cost["reserved_now"], cost["remaining_today"]) == (
        pytest.approx(0.048),
        0.0,
        pytest.approx(0.052),
    )


def test_two_ledger_objects_on_one_file_see_each_other(tmp_path: Path) -> None:
    """Decisions are made from the file under its lock, so even separate objects (another
    process) sharing the file cannot overspend together."""
    path = tmp_path / "l.jsonl"
    a, b = CostLedger(path), CostLedger(path)
    kw: dict[str, Any] = {"currency": "USD", "budget_daily": 1.0, "stale_after_s": 60.0, "details": {}}
    a.reserve("m", "1", 0.6, **kw)
    with pytest.raises(PoolError, match=r"only 0\.4 USD of the 1 USD daily budget remains"):
        b.reserve("m", "2", 0.6, **kw)
    b.reserve("other-model", "3", 0.6, **kw)  # budgets are per model
    assert a.close("released", "m", "1", currency="USD", cost=0.0)
    b.reserve("m", "2", 0.6, **kw)
    assert not b.close("released", "m", "1", currency="USD", cost=0.0)  # already closed: nothing written
    assert [line.count('"event"') for line in path.read_text().splitlines()] == [1] * 4
