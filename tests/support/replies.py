"""What the pool answers, as the tests read it: the reply of quart's in-memory client
(:class:`Reply`, :class:`StreamReply`), the error body's exact shape (:func:`assert_error`, for a
:class:`Reply` or an ``httpx.Response`` alike), and the wire constants the tests compare with."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from support.sse import parse_responses_sse

ERROR_KEYS = {"type", "code", "message", "param"}
DETAIL_KEYS = {"code", "model", "message"}
METRIC_KEYS = {
    "engine_queue_wait_ms",
    "backend_inference_wall_ms",
    "engine_total_wall_ms",
    "engine_outside_backend_wall_ms",
    "pool_total_wall_ms",
    "engine_tokenize_ms",
    "gpu_time_to_first_token_ms",
    "gpu_generate_total_ms",
    "gpu_decode_after_first_token_ms",
    "engine_prompt_tokens",
    "engine_output_tokens",
    "engine_tokens_per_second",
    "engine_cached_prompt_tokens",  # prompt cache (issue 16)
}
RESP_ID = re.compile(r"^resp_[0-9a-f]{32}$")


@dataclass
class Reply:
    """A whole reply of quart's test client."""

    status: int
    headers: Any
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)

    @property
    def text(self) -> str:
        return self.raw.decode()


@dataclass
class StreamReply:
    """A reply read chunk by chunk (``Pool.stream``)."""

    status: int | None = None
    headers: Any = None
    chunks: list[bytes] = field(default_factory=list)

    @property
    def raw(self) -> bytes:
        return b"".join(self.chunks)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        return parse_responses_sse(self.raw)


def error_body(reply: Any) -> dict[str, Any]:
    """The two-shaped error body of ``reply`` (a :class:`Reply` or an ``httpx.Response``),
    checked: JSON, exactly ``error`` {type, code, message, param} and ``detail`` {code, model,
    message}, the same code and message in both, a type."""
    assert reply.headers["Content-Type"] == "application/json", reply.headers
    body = reply.json if isinstance(reply, Reply) else reply.json()
    assert set(body) == {"error", "detail"}, body
    err, detail = body["error"], body["detail"]
    assert set(err) == ERROR_KEYS and set(detail) == DETAIL_KEYS, body
    assert err["code"] == detail["code"], body
    assert isinstance(err["message"], str) and err["message"] == detail["message"], body
    assert isinstance(err["type"], str) and err["type"], body
    result: dict[str, Any] = body
    return result


def assert_error(
    reply: Any,
    status: int,
    code: str,
    message: str | re.Pattern[str] | None = None,
    *,
    param: Any = ...,
    model: Any = ...,
) -> dict[str, Any]:
    """``reply`` (a :class:`Reply` or an ``httpx.Response``) is ``status`` with the two-shaped
    error body of ``code``; ``message`` is the exact message (or a pattern it must fullmatch).
    Returns the ``error`` object."""
    got = reply.status if isinstance(reply, Reply) else reply.status_code
    assert got == status, (got, reply.raw if isinstance(reply, Reply) else reply.text)
    body = error_body(reply)
    err, detail = body["error"], body["detail"]
    assert err["code"] == code, body
    if isinstance(message, str):
        assert err["message"] == message, body
    elif message is not None:
        assert message.fullmatch(err["message"]), body
    if param is not ...:
        assert err["param"] == param, body
    if model is not ...:
        assert detail["model"] == model, body
    result: dict[str, Any] = err
    return result

