"""The upstream's echo of the API key is redacted wherever it falls against the 300-character
quote limit (issue 13 §4): redaction happens before the cut, and a partial key the upstream left
at the end of its own text is redacted too.  Every 502 body (JSON and SSE, both inference routes)
and every log line is checked for any start of the key."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
from remote_kit import KEY, StartPool, formatted_logs
from support.upstream import FakeUpstream

from llm_pool.backends.openai_compatible import QUOTE_MAX, upstream_message

#: The shortest start of the key that counts as a leak ("sk-" alone is every key's prefix).
LEAK = KEY[:4]
OFFSETS = range(250, 321)


def test_the_key_is_redacted_at_every_offset_around_the_cut() -> None:
    for offset in OFFSETS:
        text = upstream_message(("x" * offset + KEY + " is not valid").encode(), KEY)
        assert LEAK not in text, (offset, text)
        assert len(text) <= QUOTE_MAX, (offset, len(text))
        if offset + len(KEY) < QUOTE_MAX:  # the whole key fits: it is named as redacted
            assert "[redacted]" in text, (offset, text)


def test_a_partial_key_at_the_end_of_the_upstreams_text_is_redacted() -> None:
    for n in range(len(LEAK), len(KEY)):
        for tail in ("", "...", "…"):
            text = upstream_message(("bad key: " + KEY[:n] + tail).encode(), KEY)
            assert text == "bad key: [redacted]" + tail, (n, text)
    # shorter than LEAK: ordinary text, left alone
    assert upstream_message(b"ends with sk-", KEY) == "ends with sk-"


async def _bodies(pool: Any) -> list[bytes]:
    """One answer per route and mode: /v1/responses and /v1/chat/completions, JSON and SSE."""
    out = []
    r = await pool.client.post("/v1/responses", json={"model": "r", "input": "x", "allow_remote": True})
    assert r.status_code == 502, r.text
    out.append(r.content)
    chat = {"model": "r", "messages": [{"role": "user", "content": "x"}], "allow_remote": True}
    r = await pool.client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 502, r.text
    out.append(r.content)
    for path, body in (
        ("/v1/responses", {"model": "r", "input": "x", "allow_remote": True, "stream": True}),
        ("/v1/chat/completions", {**chat, "stream": True}),
    ):
        async with pool.client.stream("POST", path, json=body) as s:
            raw = await s.aread()
        assert b"upstream_" in raw, raw
        out.append(raw)
    return out


@pytest.mark.parametrize("fault", ["400", "garbage"])
async def test_an_upstream_echoing_the_key_at_every_offset_never_leaks_it(
    start: StartPool, up: FakeUpstream, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    caplog.set_level(logging.DEBUG)
    pool = await start(remote_max_retries=0)
    up.fault, up.fail_times = fault, -1
    seen: list[bytes] = []
    with trio.fail_after(60):
        for offset in OFFSETS:
            echo = "x" * offset + KEY + " is not a valid key"
            up.error_message = echo
            up.garbage_body = echo.encode()
            seen += await _bodies(pool)
    assert len(seen) == 4 * len(OFFSETS)
    leaks = [body for body in seen if LEAK.encode() in body]
    assert not leaks, leaks[:2]
    assert any(b"[redacted]" in body for body in seen)
    lines = formatted_logs(caplog.records)
    assert any("upstream call failed" in line for line in lines)
    assert not [line for line in lines if LEAK in line]
