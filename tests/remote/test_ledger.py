"""The cost ledger: exact contents after a mixed run, replay at load (today's spend, stale
reservations abandoned, a crash's torn line), path validation, per-request maximum, and the
reservation released when a job never leaves the queue."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from remote_kit import BOUND, StartPool
from support.sse import parse_responses_sse
from support.upstream import FakeUpstream

from llm_pool.backends.ledger import estimate_prompt_tokens, money
from llm_pool.pool.jobs import ImagePart, Message

PRICED: dict[str, Any] = {
    "remote_price_input_per_1m": 1000.0,  # 0.001 per prompt token
    "remote_price_output_per_1m": 2000.0,  # 0.002 per output token
    "remote_cost_ledger_path": "ledger.jsonl",  # relative to the settings' directory
    "remote_budget_daily": 10.0,
    "remote_budget_request_max": 1.0,
}
#: "sys!" → ceil(4/4)+4 = 5 tokens, "hello world!" → ceil(12/4)+4 = 7: 12 prompt tokens; with
#: max_tokens 8 the reservation is 12 × 0.001 + 8 × 0.002 = 0.028.
ASK = {"instructions": "sys!", "input": "hello world!", "decoding": {"max_tokens": 8}}
AMOUNT = 0.028
#: the fake upstream's usage: 10 prompt + 3 output tokens = 0.016
USED = 0.016


def test_prompt_estimate_and_money() -> None:
    messages = [Message(role="system", content="sys!"), Message(role="user", content="hello world!")]
    assert estimate_prompt_tokens(messages) == 12
    assert estimate_prompt_tokens([Message(role="user", content="")]) == 4
    assert estimate_prompt_tokens([Message(role="user", content="abcde")]) == 6
    low, high = (ImagePart(url="data:image/png;base64,iVBORw0KGgo=", detail=d) for d in ("low", "auto"))
    assert estimate_prompt_tokens([Message(role="user", content="abcde", parts=["abcde", low, high])]) == 6 + 85 + 765
    assert [money(x) for x in (0.028, 1.0, 0.0, 1e-9, 0.1 + 0.2)] == ["0.028", "1", "0", "0", "0.3"]


def renumber(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Request ids → #1, #2... in order of first appearance (error responses carry no id)."""
    ids: dict[str, str] = {}
    return [{**e, "request_id": ids.setdefault(e["request_id"], f"#{len(ids) + 1}")} for e in events]


async def ask_stream(pool: Any) -> list[tuple[str, dict[str, Any]]]:
    async with pool.client.stream(
        "POST", "/v1/responses", json={"model": "r", "allow_remote": True, "stream": True, **ASK}
    ) as s:
        return parse_responses_sse(await s.aread())


async def test_ledger_contents_after_a_mixed_run(start: StartPool, up: FakeUpstream) -> None:
    with trio.fail_after(BOUND):
        pool = await start(**PRICED)
        ok = await pool.respond(ASK)  # 1 settled
        assert ok.status_code == 200 and ok.json()["metrics"]["request_cost"] == USED
        up.fault, up.fail_times = "500", 1  # 2 refused: failed before submit, nothing spent
        assert (await pool.respond(ASK)).status_code == 502
        up.fault, up.fail_times = "garbage", 1  # 3 answered unreadably: charged the reservation
        assert (await pool.respond(ASK)).status_code == 502
        up.fault, up.fail_times = "no_choices", 1  # 4 unusable answer with usage: charged the usage
        assert (await pool.respond(ASK)).status_code == 502
        events = await ask_stream(pool)  # 5 stream with usage: settled
        assert events[-2][1]["metrics"]["request_cost"] == USED
        up.fault, up.fail_times = "no_usage", 1  # 6 stream without usage: fails closed
        events = await ask_stream(pool)
        assert events[-1][0] == "response.completed"
        assert events[-2][1]["metrics"]["request_cost"] == AMOUNT
        up.fault, up.fail_times = "disconnect", 1  # 7 stream lost mid-way: charged the reservation
        events = await ask_stream(pool)
        assert events[-1][0] == "error"
        too_big = await pool.respond({**ASK, "decoding": {"max_tokens": 1000}})  # no ledger line
        row = await pool.row()
    assert too_big.status_code == 400
    assert too_big.json()["error"] == {
        "type": "invalid_request_error",
        "code": "request_cost_exceeds_max",
        "message": "this request may cost up to 2.012 USD (about 12 prompt tokens at 1000 USD/1M + max_tokens 1000 "
        "at 2000 USD/1M), more than model 'r''s remote_budget_request_max of 1 USD; lower decoding.max_tokens",
        "param": "$.decoding.max_tokens",
    }
    ledger = pool.ledger()
    assert ledger[1]["request_id"] == ok.json()["id"]
    common = {"model": "r", "currency": "USD"}
    reserved = {"event": "reserved", **common, "amount": AMOUNT, "estimated_prompt_tokens": 12, "max_tokens": 8}
    usage = {"prompt_tokens": 10, "output_tokens": 3}
    assert renumber(ledger) == [
        {**reserved, "request_id": "#1"},
        {"event": "settled", **common, "request_id": "#1", "cost": USED, **usage},
        {**reserved, "request_id": "#2"},
        {"event": "failed_before_submit", **common, "request_id": "#2", "cost": 0.0, "error": "upstream_server_error"},
        {**reserved, "request_id": "#3"},
        {
            "event": "failed_after_submit",
            **common,
            "request_id": "#3",
            "cost": AMOUNT,
            "error": "upstream_response_parse_failure",
        },
        {**reserved, "request_id": "#4"},
        {
            "event": "failed_after_submit",
            **common,
            "request_id": "#4",
            "cost": USED,
            "error": "upstream_response_parse_failure",
            **usage,
        },
        {**reserved, "request_id": "#5"},
        {"event": "settled", **common, "request_id": "#5", "cost": USED, **usage},
        {**reserved, "request_id": "#6"},
        {
            "event": "failed_usage_unknown",
            **common,
            "request_id": "#6",
            "cost": AMOUNT,
            "reason": "the upstream reported no usage",
        },
        {**reserved, "request_id": "#7"},
        {
            "event": "failed_after_submit",
            **common,
            "request_id": "#7",
            "cost": AMOUNT,
            "error": "upstream_connection_error",
        },
    ]
    spent = 3 * USED + 3 * AMOUNT  # 0.132
    cost = row["remote_cost"]
    assert cost == {
        "currency": "USD",
        "price_input_per_1m": 1000.0,
        "price_output_per_1m": 2000.0,
        "budget_daily": 10.0,
        "budget_request_max": 1.0,
        "ledger_path": str(pool.base_dir / "ledger.jsonl"),
        "day": datetime.now(UTC).strftime("%Y-%m-%d"),
        "spent_today": pytest.approx(spent, abs=1e-9),
        "reserved_now": 0.0,
        "remaining_today": pytest.approx(10.0 - spent, abs=1e-9),
    }


def line(ts: float, event: str, rid: str, model: str = "r", **fields: Any) -> str:
    stamp = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps({"ts": stamp, "event": event, "model": model, "request_id": rid, "currency": "USD", **fields})


async def test_replay_at_load(start: StartPool, up: FakeUpstream, tmp_path: Path) -> None:
    now = time.time()
    day = 86400.0
    path = tmp_path / "ledger.jsonl"
    path.write_text(
        "\n".join(
            [
                line(now - day - 60, "reserved", "old", amount=5.0),
                line(now - day - 50, "settled", "old", cost=5.0),  # yesterday: does not count today
                line(now - 7200, "reserved", "crashed", amount=0.5),  # open and stale: abandoned
                line(now - 30, "reserved", "running", amount=0.25),  # open, fresh: still reserved
                line(now - 20, "reserved", "done", amount=0.2),
                line(now - 10, "settled", "done", cost=0.1),
                line(now - 10, "settled", "x", model="other", cost=3.0),  # another model's spend
            ]
        )
        + '\n{"ts": "2026-'  # a crash while writing: the torn line is ignored
    )
    with trio.fail_after(BOUND):
        pool = await start(**{**PRICED, "remote_budget_daily": 1.0, "remote_reservation_stale_after_s": 3600})
        row = await pool.row()
    assert row["runtime_state"] == "loaded", row
    cost = row["remote_cost"]
    assert cost["spent_today"] == pytest.approx(0.1)
    assert cost["reserved_now"] == pytest.approx(0.25)
    assert cost["remaining_today"] == pytest.approx(0.65)
    lines = path.read_text().split("\n")
    assert lines[-3] == '{"ts": "2026-'  # never completed: the next event starts a new line
    abandoned = json.loads(lines[-2])
    assert lines[-1] == ""
    del abandoned["ts"]
    assert abandoned == {
        "event": "abandoned",
        "model": "r",
        "request_id": "crashed",
        "currency": "USD",
        "cost": 0.0,
        "reason": "no outcome recorded within 3600s (the process that reserved it stopped)",
    }


async def test_budget_exceeded_message_has_the_numbers(start: StartPool, up: FakeUpstream, tmp_path: Path) -> None:
    now = time.time()
    (tmp_path / "ledger.jsonl").write_text(line(now - 5, "settled", "earlier", cost=0.08) + "\n")
    with trio.fail_after(BOUND):
        pool = await start(**{**PRICED, "remote_budget_daily": 0.1})
        r = await pool.respond(ASK)
    assert r.status_code == 429
    assert r.json()["error"] == {
        "type": "rate_limit_error",
        "code": "budget_exceeded",
        "message": "model 'r' is over its daily budget: this request may cost up to 0.028 USD but only 0.02 USD "
        "of the 0.1 USD daily budget remains (spent today 0.08, reserved by running requests 0); "
        "the budget resets at 00:00 UTC",
        "param": None,
    }
    assert up.requests == []
    assert len(pool.ledger()) == 1


async def test_queued_job_that_never_runs_releases_its_reservation(start: StartPool, up: FakeUpstream) -> None:
    up.gate = trio.Event()
    with trio.fail_after(BOUND):
        pool = await start(**PRICED, target_inflight=1, queue_timeout_s=0.2)
        async with trio.open_nursery() as nursery:
            first: list[Any] = []

            async def ask() -> None:
                first.append(await pool.respond(ASK))

            nursery.start_soon(ask)
            await up.wait_in_flight(1)
            second = await pool.respond(ASK)  # waits in the queue behind the first
            assert second.status_code == 503 and second.json()["error"]["code"] == "queue_timeout", second.text
            up.gate.set()
    assert first[0].status_code == 200
    assert [(e["event"], e.get("reason")) for e in renumber(pool.ledger())] == [
        ("reserved", None),
        ("reserved", None),
        ("released", "ended before it left the queue"),
        ("settled", None),
    ]


@pytest.mark.parametrize(
    ("over", "error"),
    [
        (
            {"remote_cost_ledger_path": "nowhere/ledger.jsonl"},
            "remote_cost_ledger_path 'nowhere/ledger.jsonl': directory {dir}/nowhere does not exist",
        ),
        ({"remote_cost_ledger_path": "."}, "remote_cost_ledger_path '.': {dir} is not a regular file"),
        (
            {"remote_price_input_per_1m": None},
            "remote_price_input_per_1m and remote_price_output_per_1m must be set together",
        ),
        (
            {"remote_price_input_per_1m": None, "remote_price_output_per_1m": None},
            "remote_budget_daily needs remote_price_input_per_1m and remote_price_output_per_1m",
        ),
        (
            {"remote_cost_ledger_path": None},
            "remote_budget_daily needs remote_cost_ledger_path (today's spend must survive a restart)",
        ),
    ],
)
async def test_cost_settings_are_checked_at_load(
    start: StartPool, up: FakeUpstream, tmp_path: Path, over: dict[str, Any], error: str
) -> None:
    settings = {k: v for k, v in {**PRICED, **over}.items() if v is not None}
    with trio.fail_after(BOUND):
        pool = await start(**settings)
        row = await pool.row()
    assert row["runtime_state"] == "failed"
    assert row["last_error"] == error.format(dir=tmp_path)
    assert not (tmp_path / "nowhere").exists()  # never created
