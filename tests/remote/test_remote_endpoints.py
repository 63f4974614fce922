"""One remote model, several endpoints (issue 18): each endpoint a replica, passive ejection,
active probes, one retry elsewhere, panic mode, and the pool-of-pools fields.

Real clock, real sockets: a pool server in front of three fake upstreams on 127.0.0.1; every
wait is a poll of the admin API with a deadline (``trio.fail_after``), never a bare sleep.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from remote_kit import BOUND, KEY, KEY_ENV, MODEL, RemotePool, start_remote_pool, start_upstream
from support.settings import SOURCE, make_settings
from support.sse import parse_responses_sse
from support.upstream import FakeUpstream

from llm_pool.config import SettingsError


def endpoints_model(ups: list[FakeUpstream], **over: Any) -> dict[str, Any]:
    return {
        "backend": "openai_compatible",
        "remote_endpoints": [{"base_url": up.base_url} for up in ups],
        "remote_api_key_env": KEY_ENV,
        "remote_model": "up-model",
        "target_inflight": 2,
        "remote_probe_interval_s": 30.0,  # no probe inside a test unless it asks for one
        "remote_eject_base_s": 0.3,
        **over,
    }


_OPEN: list[RemotePool] = []


@pytest.fixture
async def _close_clients(nursery: trio.Nursery) -> AsyncIterator[None]:
    """Close the test clients before the servers' nursery is cancelled."""
    yield
    while _OPEN:
        await _OPEN.pop().client.aclose()


async def pool_for(nursery: trio.Nursery, tmp_path: Path, ups: list[FakeUpstream], **over: Any) -> RemotePool:
    pool = await start_remote_pool(nursery, ups[0], tmp_path, models={MODEL: endpoints_model(ups, **over)})
    _OPEN.append(pool)
    return pool


async def three_behind_a_pool(nursery: trio.Nursery, tmp_path: Path, **over: Any) -> tuple[RemotePool, list[FakeUpstream]]:
    ups = [await start_upstream(nursery) for _ in range(3)]
    return await pool_for(nursery, tmp_path, ups, **over), ups


async def wait_row(pool: RemotePool, ok: Any) -> dict[str, Any]:
    """Poll the admin row until ``ok(row)``; the caller bounds the wait."""
    while not ok(row := await pool.row()):  # noqa: ASYNC110
        await trio.sleep(0.02)  # polling the server from outside
    return row


def states(row: dict[str, Any]) -> list[str]:
    return [r["endpoint"]["state"] for r in row["replica_details"]]


# ---------------------------------------------------------------------- settings
def decode(**model: Any) -> Any:
    base = {"backend": "openai_compatible", "remote_model": "m", "model_path": None}
    return make_settings(raw={"engine": {"models": {"r": {**base, **model}}}}).engine.models["r"]


def test_endpoints_are_the_replicas() -> None:
    m = decode(remote_endpoints=[{"base_url": "http://a:1/v1"}, {"base_url": "http://b:2/v1", "weight": 2}])
    assert (m.replicas, m.replica_max) == (2, 2)
    assert [e.base_url for e in m.endpoints()] == ["http://a:1/v1", "http://b:2/v1"]
    assert decode(remote_base_url="http://a/v1").endpoints()[0].base_url == "http://a/v1"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"remote_base_url": "http://a/v1", "remote_endpoints": [{"base_url": "http://b/v1"}]},
            "remote_endpoints: model 'r' sets both remote_base_url and remote_endpoints; use one of them",
        ),
        (
            {"remote_endpoints": [{"base_url": "http://u:p@b/v1"}]},
            "remote_endpoints[0].base_url: model 'r' 'http://u:p@b/v1' may not carry credentials "
            "(user:password@); put the key in the variable remote_api_key_env names",
        ),
        (
            {"remote_base_url": "https://b/v1?key=x"},
            "remote_base_url: model 'r' 'https://b/v1?key=x' may not carry a query string or fragment "
            "(the pool appends /chat/completions)",
        ),
        (
            {"remote_endpoints": [{"base_url": "b:80/v1"}]},
            "remote_endpoints[0].base_url: model 'r' 'b:80/v1' must start with http:// or https:// and name a host",
        ),
        (
            {"remote_endpoints": [{"base_url": "http://a/v1"}, {"base_url": "http://b/v1"}], "replicas": 1, "replica_max": 2},
            "replicas: model 'r' has 2 remote_endpoints, one replica each: leave replicas and replica_max unset (or set both to 2)",
        ),
        (
            {"remote_endpoints": [{"base_url": "http://a/v1"}], "remote_eject_base_s": 10, "remote_eject_max_s": 5},
            "remote_eject_max_s: model 'r' is below remote_eject_base_s",
        ),
    ],
)
def test_endpoint_settings_are_checked(model: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as e:
        decode(**model)
    assert str(e.value) == f"{SOURCE}: $.engine.models.r.{message}"


# ---------------------------------------------------------------------- serving
async def test_each_endpoint_runs_target_inflight(nursery: trio.Nursery, tmp_path: Path, _close_clients: None) -> None:
    with trio.fail_after(BOUND):
        pool, ups = await three_behind_a_pool(nursery, tmp_path)
        row = await pool.row()
        assert [r["endpoint"]["base_url"] for r in row["replica_details"]] == [up.base_url for up in ups]
        assert states(row) == ["in_rotation"] * 3
        gate = trio.Event()
        for up in ups:
            up.gate = gate
        codes: list[int] = []

        async def one() -> None:
            codes.append((await pool.respond()).status_code)

        async with trio.open_nursery() as clients:
            for _ in range(7):
                clients.start_soon(one)
            for up in ups:  # least-loaded: two on each endpoint, the seventh waits in the queue
                await up.wait_in_flight(2)
            row = await wait_row(pool, lambda r: r["queue_depth"] == 1)
            assert [r["active"] for r in row["replica_details"]] == [2, 2, 2]
            gate.set()
    assert codes == [200] * 7
    assert sorted(len(up.chat_requests) for up in ups) == [2, 2, 3]


async def test_failing_endpoint_is_retried_elsewhere_then_ejected(nursery: trio.Nursery, tmp_path: Path, _close_clients: None) -> None:
    with trio.fail_after(BOUND):
        pool, ups = await three_behind_a_pool(nursery, tmp_path, remote_eject_base_s=60.0)
        ups[1].fault = "500"
        answers = [await pool.respond() for _ in range(9)]
        row = await pool.row()
    assert [r.status_code for r in answers] == [200] * 9, [r.text for r in answers]  # each retried once
    # ejected after remote_eject_after_failures (3) in a row; then it gets no work
    assert len(ups[1].chat_requests) == 3
    assert sum(len(up.chat_requests) for up in ups) == 12
    assert states(row) == ["in_rotation", "ejected", "in_rotation"]
    bad = row["replica_details"][1]["endpoint"]
    assert bad["ejections"] == 1 and 50 < bad["ejected_for_s"] <= 60, bad
    assert bad["last_error"].startswith("3 consecutive failures; last: upstream server error (HTTP 500)"), bad
    assert KEY not in str(row)


async def test_probe_ejects_a_dead_endpoint_and_reinstates_it(nursery: trio.Nursery, tmp_path: Path, _close_clients: None) -> None:
    interval = 0.1
    with trio.fail_after(BOUND):
        pool, ups = await three_behind_a_pool(nursery, tmp_path, remote_probe_interval_s=interval)
        ups[2].fault, ups[2].fault_models = "503", True
        t0 = time.monotonic()
        row = await wait_row(pool, lambda r: states(r)[2] == "ejected")
        ejected_after = time.monotonic() - t0
        assert row["replica_details"][2]["endpoint"]["last_error"].startswith("health probe failed: probe GET "), row
        assert row["replica_details"][2]["endpoint"]["last_probe_ok"] is False
        before = len(ups[2].chat_requests)
        codes = [(await pool.respond()).status_code for _ in range(4)]
        assert codes == [200] * 4
        assert len(ups[2].chat_requests) == before  # ejected: no work for it
        ups[2].fault = None
        t1 = time.monotonic()
        await wait_row(pool, lambda r: states(r)[2] == "in_rotation")
        reinstated_after = time.monotonic() - t1
    print(f"probe ejection after {ejected_after:.2f}s, reinstated after {reinstated_after:.2f}s")
    assert ejected_after < 3 * interval + 0.5  # the first failing probe (slack for a busy machine)
    assert reinstated_after < 0.3 + 3 * interval + 0.5  # remote_eject_base_s, then a passing probe


async def test_pool_of_pools_forwards_the_policy_and_all_ejected_still_serves(
    nursery: trio.Nursery, tmp_path: Path, _close_clients: None
) -> None:
    """An llm-pool upstream is probed at /health/ready/{model} (a fake upstream 404s there: the
    endpoint is ejected) and sent the caller's fairness key and priority; with every endpoint
    ejected the pool still tries them (panic mode)."""
    with trio.fail_after(BOUND):
        up = await start_upstream(nursery)
        pool = await pool_for(nursery, tmp_path, [up], remote_upstream="llm_pool", target_inflight=1)
        row = await pool.row()
        assert states(row) == ["ejected"]
        r = await pool.client.post(
            "/v1/responses",
            json={"model": MODEL, "input": "hi", "allow_remote": True, "priority": 2},
            headers={"X-Fairness-Key": "team-a", "X-Request-Id": "front-1"},
        )
    assert r.status_code == 200, r.text
    probe = up.requests[0]
    assert (probe["method"], probe["path"]) == ("GET", "/health/ready/up-model")
    sent = up.chat_requests[-1]
    assert sent["json"]["fairness_key"] == "team-a" and sent["json"]["priority"] == 2
    assert sent["headers"]["x-request-id"] == "front-1"


async def test_a_plain_upstream_gets_no_pool_fields(nursery: trio.Nursery, tmp_path: Path, _close_clients: None) -> None:
    with trio.fail_after(BOUND):
        pool, ups = await three_behind_a_pool(nursery, tmp_path)
        r = await pool.respond(fairness_key="team-a", priority=1)
    assert r.status_code == 200, r.text
    sent = next(up.chat_requests[-1] for up in ups if up.chat_requests)
    assert "fairness_key" not in sent["json"] and "priority" not in sent["json"]


@pytest.mark.parametrize(
    ("fault", "events"),
    [
        # refused before the upstream did any work: the reservation moves on with the job
        ("500", ["reserved", "settled"]),
        # the connection dropped after the request was sent: that attempt may be billed
        ("disconnect", ["reserved", "failed_after_submit", "reserved", "settled"]),
    ],
)
async def test_a_retry_elsewhere_keeps_the_ledger_exact(
    nursery: trio.Nursery, tmp_path: Path, _close_clients: None, fault: str, events: list[str]
) -> None:
    with trio.fail_after(BOUND):
        pool, ups = await three_behind_a_pool(
            nursery, tmp_path, remote_price_input_per_1m=1.0, remote_price_output_per_1m=2.0,
            remote_cost_ledger_path="ledger.jsonl",
        )
        ups[0].fault, ups[0].fail_times = fault, 1
        r = await pool.respond()  # the first of three idle endpoints: ups[0]
    assert r.status_code == 200, r.text
    assert len(ups[0].chat_requests) == 1 and len(ups[1].chat_requests) == 1
    ledger = pool.ledger()
    assert [e["event"] for e in ledger] == events
    assert {e["request_id"] for e in ledger} == {r.json()["id"]}
    assert ledger[-1]["cost"] == pytest.approx((10 * 1.0 + 3 * 2.0) / 1e6)


async def test_resizing_keeps_one_replica_per_endpoint(nursery: trio.Nursery, tmp_path: Path, _close_clients: None) -> None:
    with trio.fail_after(BOUND):
        pool, ups = await three_behind_a_pool(nursery, tmp_path)
        urls = [up.base_url for up in ups]
        r = await pool.client.post(f"/v1/admin/models/{MODEL}/replicas", json={"replicas": 2})
        assert r.status_code == 200, r.text
        assert [d["endpoint"]["base_url"] for d in r.json()["replica_details"]] == urls[:2]
        r = await pool.client.post(f"/v1/admin/models/{MODEL}/replicas", json={"replicas": 3})
        assert r.status_code == 200, r.text
        # the new replica (#4) takes the endpoint no live replica serves
        assert [(d["name"], d["endpoint"]["base_url"]) for d in r.json()["replica_details"]] == [
            (f"{MODEL}#1", urls[0]), (f"{MODEL}#2", urls[1]), (f"{MODEL}#4", urls[2])
        ]


async def test_a_stream_that_began_is_never_retried(nursery: trio.Nursery, tmp_path: Path, _close_clients: None) -> None:
    """Text already reached the client: a lost stream ends with an error event, never a second
    answer from another endpoint."""
    with trio.fail_after(BOUND):
        pool, ups = await three_behind_a_pool(nursery, tmp_path)
        ups[0].fault, ups[0].fail_times = "disconnect", 1  # the first frame, then the connection drops
        r = await pool.respond(stream=True)
    events = parse_responses_sse(r.content)
    kinds = [name for name, _ in events]
    assert "response.output_text.delta" in kinds and kinds[-1] == "error", kinds
    assert ups[0].base_url in events[-1][1]["message"], events[-1]
    assert [len(up.chat_requests) for up in ups] == [1, 0, 0]
