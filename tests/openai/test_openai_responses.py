"""OpenAI's shapes on ``/v1/responses`` (issue 7): the Responses stream events between
llm-pool's own, the response object the SDK parses, and ``incomplete`` at max_tokens.
llm-pool's own contract for the route stays pinned in ``tests/http/test_responses.py``."""

from __future__ import annotations

from typing import Any

from support.replies import METRIC_KEYS
from support.server import Pool
from trio.testing import MockClock

#: What an OpenAI SDK sends, and so gets OpenAI's output items in non-streamed bodies.
SDK = {"X-Stainless-Lang": "python"}


def response(rid: str, created_at: int, status: str, text: str | None, usage: tuple[int, int] | None) -> dict[str, Any]:
    """The response object as OpenAI's SDK reads it (``metrics`` compared separately)."""
    mid = "msg_" + rid[len("resp_") :]
    output = [] if text is None else [message(mid, status, text)]
    return {
        "id": rid,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": "m",
        "output": output,
        "output_text": text or "",
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "usage": None
        if usage is None
        else {"input_tokens": usage[0], "output_tokens": usage[1], "total_tokens": sum(usage)},
    }


def message(mid: str, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": []}]
    return {"id": mid, "type": "message", "status": status, "role": "assistant", "content": content}


async def test_stream_has_openais_events_between_llm_pools(autojump_clock: MockClock, pool: Pool) -> None:
    s = await pool.stream({"model": "m", "input": "one two", "stream": True})
    events = s.events()
    rid = events[0][1]["id"]
    mid = "msg_" + rid[len("resp_") :]
    created_at = events[0][1]["response"]["created_at"]
    assert isinstance(created_at, int)
    at = {"id": rid, "item_id": mid, "output_index": 0, "content_index": 0}
    part = {"type": "output_text", "text": "one two", "annotations": []}
    completed = events[-1][1]
    final_metrics = completed["response"].pop("metrics")
    assert final_metrics == events[-2][1]["metrics"] and METRIC_KEYS <= set(final_metrics)
    in_progress = {**response(rid, created_at, "in_progress", None, None), "metrics": None}
    assert [(e, {k: v for k, v in d.items() if k not in ("type", "sequence_number")}) for e, d in events] == [
        ("response.created", {"id": rid, "model": "m", "object": "response", "response": in_progress}),
        ("response.in_progress", {"id": rid, "response": in_progress}),
        ("response.output_item.added", {"id": rid, "output_index": 0, "item": message(mid, "in_progress", None)}),
        ("response.content_part.added", {**at, "part": {"type": "output_text", "text": "", "annotations": []}}),
        ("response.output_text.delta", {**at, "delta": "one", "logprobs": []}),
        ("response.output_text.delta", {**at, "delta": " two", "logprobs": []}),
        ("response.output_text.done", {**at, "text": "one two", "logprobs": []}),
        ("response.content_part.done", {**at, "part": part}),
        ("response.output_item.done", {"id": rid, "output_index": 0, "item": message(mid, "completed", "one two")}),
        ("response.metrics", {"id": rid, "metrics": final_metrics}),
        (
            "response.completed",
            {
                "id": rid,
                "output_text": "one two",
                "response": response(rid, created_at, "completed", "one two", (2, 2)),
            },
        ),
    ]


async def test_cut_at_max_tokens_is_incomplete(autojump_clock: MockClock, pool: Pool) -> None:
    r = await pool.respond({"model": "m", "input": "one two three", "decoding": {"max_tokens": 2}}, headers=SDK)
    b = r.json
    assert b.pop("metrics")["engine_output_tokens"] == 2
    assert b == response(b["id"], b["created_at"], "incomplete", "one two", (3, 2))

    s = await pool.stream({"model": "m", "input": "one two three", "stream": True, "decoding": {"max_tokens": 2}})
    events = s.events()
    assert events[-1][0] == "response.incomplete"  # as OpenAI's stream ends when cut
    assert events[-1][1]["output_text"] == "one two"  # llm-pool's field, as on response.completed
    final = events[-1][1]["response"]
    assert (final["status"], final["incomplete_details"], final["output_text"]) == (
        "incomplete",
        {"reason": "max_output_tokens"},
        "one two",
    )
    assert events[-3][1]["item"]["status"] == "incomplete"  # response.output_item.done


async def test_failure_after_start_is_an_error_event_in_openais_shape(autojump_clock: MockClock, pool: Pool) -> None:
    events = (await pool.stream({"model": "m", "input": "fail", "stream": True})).events()
    assert events[-1] == (
        "error",
        {
            "type": "error",
            "sequence_number": len(events) - 1,
            "code": "backend_error",
            "message": "model 'm' failed: RuntimeError: fake backend exploded",
            "param": None,
        },
    )
