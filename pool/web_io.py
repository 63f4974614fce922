"""What every route module shares: a quart request's JSON body in, quart responses out.

Errors become JSON in both OpenAI's and llm-pool's shape (:meth:`PoolError.body`); a stream is
``text/event-stream`` that no proxy buffers.  The routes themselves live in
:mod:`llm_pool.pool.http` (inference), :mod:`llm_pool.pool.openai_compat`,
:mod:`llm_pool.pool.ops` and :mod:`llm_pool.admin.routes`; they import this module, never each
other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from quart import Response, request

from llm_pool.pool.api import decode_body
from llm_pool.pool.errors import PoolError

_encoder = msgspec.json.Encoder()
JSON = "application/json"
SSE = "text/event-stream; charset=utf-8"


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(payload), status=status, content_type=JSON, headers=headers)


def error_response(error: PoolError) -> Response:
    return json_response(error.body(), error.status, error.headers)


async def read_json(kind: type[Any]) -> Any:
    """The request body decoded into ``kind`` (400/413 as :class:`PoolError`)."""
    body = await request.get_data(cache=False)
    assert isinstance(body, bytes)
    return decode_body(body, kind)


def sse_response(frames: AsyncIterator[bytes]) -> Response:
    return Response(
        frames,
        status=200,
        content_type=SSE,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def wants_openai_items() -> bool:
    """Whether a non-streamed ``/v1/responses`` body carries OpenAI's message items in ``output``.

    llm-pool's contract is ``"output": [{"type": "output_text", "text": ...}]``; the openai SDKs
    read text only from ``{"type": "message", "content": [...]}`` items.  Both cannot live in one
    item, so the OpenAI shape goes to OpenAI's SDKs (they all send ``X-Stainless-Lang``) and to
    any client sending ``X-LLM-Pool-Output: openai``; ``X-LLM-Pool-Output: llm-pool`` forces the
    llm-pool shape.  Every other key is the same in both.
    """
    choice = request.headers.get("X-LLM-Pool-Output", "").lower()
    if choice in ("openai", "llm-pool"):
        return choice == "openai"
    return "X-Stainless-Lang" in request.headers
