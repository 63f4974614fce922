"""``fairness_key`` and ``priority`` on the inference routes, and the admin row's ``fairness``
(pool/fairness.py behind the HTTP layer), through quart's in-memory client."""

from __future__ import annotations

from typing import Any

import pytest
from support.fake_backend import FakeBackendFactory
from support.replies import assert_error
from support.server import Pool, start_pool
from trio.testing import MockClock

CHAT = "/v1/chat/completions"


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(
    ("extra", "headers", "message", "param"),
    [
        ({"fairness_key": "  "}, {}, "fairness_key must not be blank", "$.fairness_key"),
        ({"fairness_key": "k" * 129}, {}, "fairness_key is 129 characters long; a fairness key has at most 128", "$.fairness_key"),
        ({"fairness_key": "a\nb"}, {}, "fairness_key contains a character that is not printable", "$.fairness_key"),
        ({}, {"X-Fairness-Key": " "}, "the X-Fairness-Key header must not be blank", None),
    ],
)
async def test_bad_fairness_keys_are_400(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, extra: dict[str, Any], headers: dict[str, str],
    message: str, param: str | None,
) -> None:
    r = await pool.respond({"model": "m", "input": "hi", **extra}, headers=headers)
    assert_error(r, 400, "invalid_request", message, param=param)
    r = await pool.post(CHAT, chat(**extra), headers=headers)
    assert_error(r, 400, "invalid_request", message, param=param)
    assert control.seen == []


@pytest.mark.parametrize(
    ("route", "extra", "headers", "key"),
    [
        ("responses", {"fairness_key": " team-a "}, {"X-Fairness-Key": "h"}, "team-a"),
        ("responses", {}, {"X-Fairness-Key": "h"}, "h"),
        ("responses", {}, {}, None),
        ("chat", {"fairness_key": "b", "user": "u"}, {"X-Fairness-Key": "h"}, "b"),
        ("chat", {"user": "u"}, {"X-Fairness-Key": "h"}, "h"),
        ("chat", {"user": " u1 "}, {}, "u1"),
        ("chat", {"user": ""}, {}, None),
    ],
)
async def test_where_the_key_comes_from(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, route: str, extra: dict[str, Any],
    headers: dict[str, str], key: str | None,
) -> None:
    if route == "responses":
        r = await pool.respond({"model": "m", "input": "hi", "priority": 3, **extra}, headers=headers)
    else:
        r = await pool.post(CHAT, chat(priority=3, **extra), headers=headers)
    assert r.status == 200, r.json
    assert [(g.fairness_key, g.priority) for g in control.seen] == [(key, 3)]
    row = (await pool.get("/v1/admin/models/m")).json
    assert [k["fairness_key"] for k in row["fairness"]["keys"]] == [key]


async def test_negative_priority_needs_a_listed_key(autojump_clock: MockClock, nursery: Any, control: FakeBackendFactory) -> None:
    pool = await start_pool(nursery, control, {"engine": {"fairness": {"negative_priority_keys": ["ops"]}}})
    r = await pool.respond({"model": "m", "input": "hi", "priority": -5, "fairness_key": "dev"})
    assert_error(
        r, 403, "priority_not_allowed",
        "priority -5 is below 0, which only the fairness keys in engine.fairness.negative_priority_keys may ask "
        "for ('dev' is not one of them)",
        param="priority",
    )  # fmt: skip
    r = await pool.respond({"model": "m", "input": "hi", "priority": -5}, headers={"X-Fairness-Key": "ops"})
    assert r.status == 200
    r = await pool.respond({"model": "m", "input": "hi", "priority": -1001, "fairness_key": "ops"})
    assert_error(r, 400, "invalid_request", param="$.priority")


async def test_admin_row_fairness_is_null_while_unloaded(autojump_clock: MockClock, pool: Pool) -> None:
    await pool.post("/v1/admin/models/m/unload")
    row = (await pool.get("/v1/admin/models/m")).json
    assert (row["fairness"], row["replica_restarts"]) == (None, 0)
