"""The upstream API key never leaves the process: not in a response, an admin row, an error
message or a log line, even when the upstream echoes it back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
from remote_kit import BOUND, KEY, KEY_ENV, StartPool, formatted_logs, remote_model, start_remote_pool
from support.sse import parse_responses_sse
from support.upstream import FakeUpstream


async def test_the_key_never_appears_in_responses_or_logs(
    start: StartPool, up: FakeUpstream, caplog: pytest.LogCaptureFixture, nursery: trio.Nursery, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = f"Incorrect API key provided: {KEY}"
    with trio.fail_after(BOUND):
        pool = await start(
            remote_max_retries=1,
            remote_price_input_per_1m=1.0,
            remote_price_output_per_1m=1.0,
            remote_cost_ledger_path="ledger.jsonl",
            remote_budget_daily=5.0,
        )
        ok = await pool.respond()
        assert ok.status_code == 200
        cases: list[tuple[str, dict[str, Any]]] = [
            ("401", {"error_message": echo}),
            ("403", {"error_message": echo}),
            ("400", {"error_message": echo}),
            ("500", {"error_message": echo}),
            ("429", {"error_message": echo, "retry_after": 0.01}),
            ("garbage", {"garbage_body": f"<html>{KEY}</html>".encode()}),
            ("disconnect", {}),
        ]
        for fault, knobs in cases:
            up.fault = fault
            for k, v in knobs.items():
                setattr(up, k, v)
            r = await pool.respond()
            assert r.status_code >= 400, (fault, r.text)
            async with pool.client.stream(
                "POST", "/v1/responses", json={"model": "r", "input": "x", "allow_remote": True, "stream": True}
            ) as s:
                raw = await s.aread()
            pool.seen.append(raw)
            assert parse_responses_sse(raw)[-1][0] == "error", raw
        quoted = [body for body in pool.seen if b"[redacted]" in body]
        assert quoted, "the upstream's echo of the key should have been quoted, redacted"
        await pool.client.get("/v1/admin/models")
        # a load failure that quotes the upstream (health check) too
        up.fault, up.fault_models, up.error_message = "400", True, echo
        models = {"h": remote_model(up.base_url or "", remote_health_check="models_endpoint")}
        other = await start_remote_pool(nursery, up, tmp_path, models=models)
        try:
            row = await other.row("h")
            assert row["runtime_state"] == "failed"
            assert "[redacted]" in row["last_error"]
            r = await other.client.post("/v1/admin/models/h/load", json={})
            other.seen.append(r.content)
            r = await other.client.get("/v1/admin/models")
            other.seen.append(r.content)
        finally:
            await other.client.aclose()
    for body in pool.seen + other.seen:
        assert KEY.encode() not in body
    lines = formatted_logs(caplog.records)
    assert any(KEY_ENV in line for line in lines)  # the logs did talk about the failures
    for line in lines:
        assert KEY not in line, line
    assert KEY not in (tmp_path / "ledger.jsonl").read_text()
