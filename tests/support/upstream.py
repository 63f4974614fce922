"""A real, local, OpenAI-compatible Chat Completions upstream for tests.

The server is a tiny HTTP/1.1 server written directly on ``trio`` + ``h11``
(no hypercorn/quart): it runs inside a trio test on the real clock, binds
``127.0.0.1`` on an ephemeral port, supports keep-alive and chunked
(SSE) streaming, and can be told to misbehave in precise ways - including
closing the TCP connection mid-stream, which a framework cannot easily do.

Usage (pytest-trio)::

    up = FakeUpstream(api_key="sk-test")
    async with trio.open_nursery() as nursery:
        base_url = await nursery.start(serve_upstream, up)  # "http://127.0.0.1:PORT/v1"
        ...                                                   # talk to it
        up.fault, up.fail_times = "500", 2                   # next 2 chat requests fail
        ...
        nursery.cancel_scope.cancel()                        # stops cleanly

or ``async with run_upstream(api_key="sk-test") as up: ... up.base_url ...``.

Everything on :class:`FakeUpstream` may be changed by the test at any time;
each request reads the knobs when it arrives.

Request flow for ``POST /v1/chat/completions``:

1. the request is appended to ``requests`` (even if it is then rejected);
2. ``Authorization: Bearer <api_key>`` is checked (skipped if ``api_key`` is
   None) -> 401 ``invalid_api_key``; this never consumes ``fail_times``;
3. the body must be a JSON object with a ``messages`` list -> else 400;
4. if ``gate`` is set, the request waits for ``gate.wait()``;
5. the fault (if any) is decided: it applies when ``fault`` is not None and
   ``fail_times != 0``; each application decrements a positive ``fail_times``
   (so ``fault="500"; fail_times=2`` means "the next 2 requests fail, then
   normal"); ``-1`` means always;
6. the response is produced.

``POST /v1/completions`` (legacy text completions) runs the same steps with a
``prompt`` (a string) instead of ``messages``, and answers OpenAI's
``text_completion`` shape with ``reply_text`` as ``choices[0].text`` (streams:
one ``text_completion`` chunk per piece, a finish chunk, a usage chunk with
``stream_options.include_usage``, ``[DONE]``).  ``POST /v1/embeddings`` takes
``input`` (a string or a list of strings) and answers one vector of
``embedding_dims`` floats per input, a function of the input's text
(:func:`fake_embedding`), as floats or base64 (``encoding_format``); only
status faults apply to it.

Faults (``fault``):

* ``"400"``, ``"401"``, ``"403"``, ``"429"``, ``"500"`` - and in fact any
  3-digit status string, e.g. ``"502"``/``"503"`` - reply with that status and
  an OpenAI-shaped error body ``{"error": {"message", "type", "param",
  "code"}}``. ``error_message`` overrides the message; the default for 400 is
  ``"Invalid 'max_tokens': too large ..."`` (see ``DEFAULT_400_MESSAGE``).
  ``429``/``503`` carry a ``Retry-After`` header when ``retry_after`` is set
  (whole numbers are sent as integers, e.g. ``"2"``; others as ``"0.5"``).
* ``"slow"`` - ``trio.sleep(slow_s)`` before the response headers; when
  streaming, the headers and first content frame then go out together and
  ``trio.sleep(slow_s)`` precedes every following SSE frame (finish, usage and
  ``[DONE]`` frames included), so k content pieces take about
  ``slow_s * (k + 2)``, or ``slow_s * (k + 3)`` with include_usage.
* ``"garbage"`` - status 200, ``content-type: application/json`` but the body
  is ``garbage_body`` (not JSON). When streaming: 200 ``text/event-stream``
  with one ``data: <garbage_body>`` frame followed by ``data: [DONE]``.
* ``"no_choices"`` - a well-formed completion whose ``choices`` is ``[]``
  (streaming: every chunk has ``choices: []``, then usage/``[DONE]`` as normal).
* ``"non_text"`` - ``message.content`` is ``non_text_content`` (default
  ``None``; when None a ``tool_calls`` entry is added and ``finish_reason`` is
  ``"tool_calls"``). Set ``non_text_content`` to e.g. a list of content parts to
  test list content. Streaming: one delta carrying the same content/tool_calls.
* ``"no_usage"`` - the ``usage`` object is omitted (non-stream) and no usage
  chunk is sent even when ``stream_options.include_usage`` is true.
* ``"disconnect"`` - non-stream: the connection is closed after the request is
  read, without any response. Stream: 200 + headers + the first SSE frame
  (which carries role and the first content piece), then the TCP connection is
  closed without the chunked terminator (the client sees an incomplete body).

Faults apply to ``/v1/chat/completions`` only (a bad key is a 401 everywhere), unless
``fault_models`` is True (then status/slow/garbage/disconnect faults also hit
``GET /v1/models``, e.g. to make health checks fail).

Normal streaming (``"stream": true``) sends ``data: {chat.completion.chunk}``
frames: the first frame's delta is ``{"role": "assistant", "content": piece0}``,
then ``{"content": piece}`` per piece, then a frame with ``delta: {}`` and the
``finish_reason``; if ``stream_options.include_usage`` is true, every chunk has
``"usage": null`` and a last chunk has ``choices: []`` and the usage; then
``data: [DONE]``. Pieces come from ``stream_chunks`` if set, else ``reply_text``
split word by word (leading whitespace kept, ``"".join(pieces) == reply_text``).
``chunk_delay_s`` (default 0) sleeps before every frame after the first, with or
without a fault.

Bookkeeping: ``requests`` (list of ``{"method", "path", "headers", "json"}``,
headers lower-cased, ``json`` None if absent/invalid), ``in_flight`` /
``max_in_flight`` (chat requests being answered now / at most so far;
``await up.wait_in_flight(n)`` waits until at least ``n`` are),
``client_disconnects`` (streamed responses where sending a frame failed because
the client went away; detected only on a failed send, so usually one or two
frames after the client closes).
"""

from __future__ import annotations

import base64
import json
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

__all__ = [
    "DEFAULT_400_MESSAGE",
    "FAULTS",
    "FakeUpstream",
    "run_upstream",
    "serve_upstream",
    "split_words",
]

DEFAULT_400_MESSAGE = "Invalid 'max_tokens': too large. This model supports at most 4096 completion tokens."

FAULTS = frozenset(
    {
        "400",
        "401",
        "403",
        "429",
        "500",
        "slow",
        "garbage",
        "no_choices",
        "non_text",
        "no_usage",
        "disconnect",
    }
)

_MAX_RECV = 65536
_BODY_FAULTS = frozenset({"slow", "no_choices", "non_text", "no_usage"})
_STREAM_FAULTS = frozenset({"garbage", "disconnect"})

# status -> (type, param, code, default message)
_ERRORS: dict[int, tuple[str, str | None, str | None, str]] = {
    400: (
        "invalid_request_error",
        "max_tokens",
        "integer_above_max_value",
        DEFAULT_400_MESSAGE,
    ),
    401: (
        "invalid_request_error",
        None,
        "invalid_api_key",
        "Incorrect API key provided. You can find your API key in your account settings.",
    ),
    403: (
        "permission_error",
        None,
        "forbidden",
        "You are not allowed to access this model with this API key.",
    ),
    404: ("invalid_request_error", None, "not_found", "Not found."),
    405: ("invalid_request_error", None, "method_not_allowed", "Method not allowed."),
    429: (
        "requests",
        None,
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again later.",
    ),
    500: (
        "server_error",
        None,
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
}


def split_words(text: str) -> list[str]:
    """Split ``text`` word by word, keeping whitespace, so ``"".join(result) == text``.

    ``"Hello from upstream."`` -> ``["Hello", " from", " upstream."]``.
    """
    pieces = re.findall(r"\s*\S+", text)
    rest = text[len("".join(pieces)) :]
    if rest:
        if pieces:
            pieces[-1] += rest
        else:
            pieces = [rest]
    return pieces


@dataclass
class FakeUpstream:
    """State and knobs of a fake upstream; mutate freely from the test."""

    api_key: str | None = "sk-test-upstream"  # expected bearer token; None = no auth
    fault: str | None = None
    retry_after: float | None = None  # Retry-After header for 429/503 faults
    fail_times: int = -1  # apply `fault` to the next N chat requests; -1 = always
    slow_s: float = 5.0  # for fault "slow" (see module docstring)
    requests: list[dict[str, Any]] = field(default_factory=list)
    reply_text: str = "Hello from upstream."
    stream_chunks: list[str] | None = None  # None = split reply_text word by word
    prompt_tokens: int = 10
    completion_tokens: int = 3
    model: str = (
        "fake-model"  # used when the request has no "model"; listed by /v1/models
    )
    models: list[str] | None = None  # /v1/models ids; None = [model]
    finish_reason: str = "stop"
    error_message: str | None = None  # overrides the message of status faults
    garbage_body: bytes = b"<html><body>Bad Gateway</body></html> not json {"
    non_text_content: Any = None  # message.content for fault "non_text"
    chunk_delay_s: float = 0.0  # delay before each SSE frame after the first
    fault_models: bool = (
        False  # also apply status/slow/garbage/disconnect to /v1/models
    )
    gate: trio.Event | None = None  # if set, chat requests wait on it before answering
    embedding_dims: int = 4  # length of every /v1/embeddings vector
    # bookkeeping (read by tests)
    base_url: str | None = None  # set by serve_upstream once listening
    port: int | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    client_disconnects: int = 0
    # set and replaced on every change of in_flight (see wait_in_flight)
    _in_flight_changed: trio.Event = field(default_factory=trio.Event, repr=False, compare=False)

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    @property
    def last_request(self) -> dict[str, Any]:
        return self.requests[-1]

    def _add_in_flight(self, delta: int) -> None:
        self.in_flight += delta
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._in_flight_changed.set()
        self._in_flight_changed = trio.Event()

    async def wait_in_flight(self, n: int) -> None:
        """Wait until at least ``n`` chat requests are being answered at once.

        Call it from the trio run that serves this upstream.
        """
        while self.in_flight < n:
            await self._in_flight_changed.wait()

    def take_fault(self) -> str | None:
        """Decide (and consume) the fault for one request."""
        if self.fault is None or self.fail_times == 0:
            return None
        if self.fault not in FAULTS and not (
            len(self.fault) == 3 and self.fault.isdigit()
        ):
            raise ValueError(f"FakeUpstream: unknown fault {self.fault!r}")
        if self.fail_times > 0:
            self.fail_times -= 1
        return self.fault


def fake_embedding(text: str, dims: int) -> list[float]:
    """The fake upstream's vector for ``text``: ``dims`` floats that depend on every byte."""
    data = text.encode("utf-8")
    return [float(sum(b * (i + 1) ** k for i, b in enumerate(data)) % 1000) / 1000.0 for k in range(dims)]


class _Abort(Exception):
    """Close the connection abruptly (fault \"disconnect\")."""


class _Conn:
    """One HTTP/1.1 connection (possibly several keep-alive requests)."""

    def __init__(self, up: FakeUpstream, stream: trio.SocketStream) -> None:
        self.up = up
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER)

    # -- low level -------------------------------------------------------
    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await self.stream.receive_some(_MAX_RECV)
                self.h11.receive_data(data)  # b"" = EOF
                continue
            return event

    async def _send(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            await self.stream.send_all(data)

    async def _read_request(self) -> tuple[h11.Request, bytes] | None:
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed
        body = bytearray()
        while True:
            ev = await self._next_event()
            if isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                return event, bytes(body)
            else:
                return None

    async def send_bytes(
        self,
        status: int,
        body: bytes,
        content_type: str,
        extra: Sequence[tuple[str, str]] = (),
    ) -> None:
        headers = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            ("x-request-id", f"req_{uuid.uuid4().hex[:16]}"),
            *extra,
        ]
        await self._send(h11.Response(status_code=status, headers=headers))
        await self._send(h11.Data(data=body))
        await self._send(h11.EndOfMessage())

    async def send_json(
        self, status: int, obj: Any, extra: Sequence[tuple[str, str]] = ()
    ) -> None:
        await self.send_bytes(
            status, json.dumps(obj).encode(), "application/json", extra
        )

    async def send_error(self, status: int, message: str | None = None) -> None:
        type_, param, code, default = _ERRORS.get(
            status,
            (
                "server_error" if status >= 500 else "invalid_request_error",
                None,
                None,
                f"HTTP {status}",
            ),
        )
        extra: list[tuple[str, str]] = []
        ra = self.up.retry_after
        if status in (429, 503) and ra is not None:
            extra.append(
                (
                    "retry-after",
                    str(int(ra)) if float(ra).is_integer() else repr(float(ra)),
                )
            )
        body = {
            "error": {
                "message": message or default,
                "type": type_,
                "param": param,
                "code": code,
            }
        }
        await self.send_json(status, body, extra)

    # -- main loop -------------------------------------------------------
    async def serve(self) -> None:
        try:
            while True:
                req = await self._read_request()
                if req is None:
                    return
                keep = await self._dispatch(*req)
                if not keep:
                    return
                if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
                    self.h11.start_next_cycle()
                else:
                    return
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
            _Abort,
        ):
            return

    async def _dispatch(self, request: h11.Request, body: bytes) -> bool:
        """Answer one request; returns False to close the connection."""
        up = self.up
        method = request.method.decode("ascii", "replace").upper()
        target = request.target.decode("latin-1")
        path = target.split("?", 1)[0]
        headers: dict[str, str] = {}
        for name, value in request.headers:
            k = name.decode("latin-1").lower()
            v = value.decode("latin-1")
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        payload: Any = None
        json_ok = True
        if body:
            try:
                payload = json.loads(body)
            except ValueError:
                json_ok = False
        up.requests.append(
            {"method": method, "path": path, "headers": headers, "json": payload}
        )

        if (
            up.api_key is not None
            and headers.get("authorization") != f"Bearer {up.api_key}"
        ):
            await self.send_error(401)
            return True

        route = path.rstrip("/")
        if route == "/v1/models":
            if method != "GET":
                await self.send_error(405)
                return True
            fault = up.take_fault() if up.fault_models else None
            if fault == "slow":
                await trio.sleep(up.slow_s)
            elif fault is not None and fault not in (
                "no_choices",
                "non_text",
                "no_usage",
            ):
                return await self._simple_fault(fault)
            ids = up.models if up.models is not None else [up.model]
            created = int(time.time())
            await self.send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": m,
                            "object": "model",
                            "created": created,
                            "owned_by": "fake-upstream",
                        }
                        for m in ids
                    ],
                },
            )
            return True
        if route not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            await self.send_error(404, f"Unknown request URL: {method} {path}.")
            return True
        if method != "POST":
            await self.send_error(405)
            return True
        if not json_ok or not isinstance(payload, dict):
            await self.send_error(
                400, "We could not parse the JSON body of your request."
            )
            return True
        if route == "/v1/embeddings":
            return await self._embeddings(payload)
        legacy = route == "/v1/completions"
        if legacy and not isinstance(payload.get("prompt"), str):
            await self.send_error(400, "Missing required parameter: 'prompt'.")
            return True
        if not legacy and not isinstance(payload.get("messages"), list):
            await self.send_error(400, "Missing required parameter: 'messages'.")
            return True

        up._add_in_flight(1)
        try:
            if up.gate is not None:
                await up.gate.wait()
            fault = up.take_fault()
            stream = bool(payload.get("stream"))
            # status codes, non-stream disconnect and non-stream garbage end here;
            # slow / body-shape faults and streamed garbage/disconnect go on below.
            if (
                fault is not None
                and fault not in _BODY_FAULTS
                and not (stream and fault in _STREAM_FAULTS)
            ):
                return await self._simple_fault(fault)
            if fault == "slow":
                await trio.sleep(up.slow_s)
            if stream:
                await self._stream(payload, fault, legacy=legacy)
            else:
                out = self._completion(payload, fault)
                await self.send_json(200, self._as_text_completion(out) if legacy else out)
            return True
        finally:
            up._add_in_flight(-1)

    async def _embeddings(self, payload: dict[str, Any]) -> bool:
        up = self.up
        given = payload.get("input")
        inputs = [given] if isinstance(given, str) else given
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            await self.send_error(400, "'input' must be a string or an array of strings.")
            return True
        fault = up.take_fault()
        if fault is not None and len(fault) == 3 and fault.isdigit():
            return await self._simple_fault(fault)
        b64 = payload.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(inputs):
            vector = fake_embedding(text, up.embedding_dims)
            value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if b64 else vector
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(t.split()) for t in inputs)
        await self.send_json(
            200,
            {
                "object": "list",
                "data": data,
                "model": payload.get("model") or up.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )
        return True

    @staticmethod
    def _as_text_completion(out: dict[str, Any]) -> dict[str, Any]:
        """A chat completion body in the legacy ``text_completion`` shape."""
        choices = [
            {"text": c["message"].get("content") or "", "index": c["index"], "logprobs": None,
             "finish_reason": c["finish_reason"]}
            for c in out["choices"]
        ]  # fmt: skip
        return {**out, "id": "cmpl-" + out["id"].split("-", 1)[1], "object": "text_completion", "choices": choices}

    async def _simple_fault(self, fault: str) -> bool:
        """Status / slow / garbage / disconnect faults; returns keep-alive."""
        up = self.up
        if fault == "disconnect":
            return False  # close without a response
        if fault == "garbage":
            await self.send_bytes(200, up.garbage_body, "application/json")
            return True
        if len(fault) == 3 and fault.isdigit():
            await self.send_error(int(fault), up.error_message)
            return True
        raise ValueError(f"FakeUpstream: unknown fault {fault!r}")

    # -- bodies ----------------------------------------------------------
    def _message(self, fault: str | None) -> tuple[dict[str, Any], str]:
        up = self.up
        if fault == "non_text":
            msg: dict[str, Any] = {"role": "assistant", "content": up.non_text_content}
            if up.non_text_content is None:
                msg["tool_calls"] = [
                    {
                        "id": "call_fake0",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city": "Paris"}',
                        },
                    }
                ]
                return msg, "tool_calls"
            return msg, up.finish_reason
        return {"role": "assistant", "content": up.reply_text}, up.finish_reason

    def _usage(self) -> dict[str, int]:
        up = self.up
        return {
            "prompt_tokens": up.prompt_tokens,
            "completion_tokens": up.completion_tokens,
            "total_tokens": up.prompt_tokens + up.completion_tokens,
        }

    def _completion(self, payload: dict[str, Any], fault: str | None) -> dict[str, Any]:
        message, finish = self._message(fault)
        out: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": payload.get("model") or self.up.model,
            "choices": []
            if fault == "no_choices"
            else [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
        }
        if fault != "no_usage":
            out["usage"] = self._usage()
        return out

    async def _stream(self, payload: dict[str, Any], fault: str | None, *, legacy: bool = False) -> None:
        up = self.up
        await self._send(
            h11.Response(
                status_code=200,
                headers=[
                    ("content-type", "text/event-stream; charset=utf-8"),
                    ("cache-control", "no-cache"),
                    ("x-request-id", f"req_{uuid.uuid4().hex[:16]}"),
                ],
            )
        )
        if fault == "garbage":
            await self._frame(
                b"data: " + up.garbage_body + b"\n\n", first=True, fault=fault
            )
            await self._frame(b"data: [DONE]\n\n", fault=fault)
            await self._send(h11.EndOfMessage())
            return

        opts = payload.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        base: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": payload.get("model") or up.model,
        }

        if legacy:
            base["object"] = "text_completion"
            base["id"] = "cmpl-" + base["id"].split("-", 1)[1]

        def chunk(delta: dict[str, Any] | None, finish: str | None = None) -> bytes:
            obj = dict(base)
            if fault == "no_choices" or delta is None:
                obj["choices"] = []
            elif legacy:
                text = delta.get("content")
                obj["choices"] = [
                    {"text": text if isinstance(text, str) else "", "index": 0, "logprobs": None,
                     "finish_reason": finish}
                ]  # fmt: skip
            else:
                obj["choices"] = [
                    {
                        "index": 0,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ]
            if include_usage:
                obj["usage"] = None
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        if fault == "non_text":
            message, finish = self._message(fault)
            deltas = [message]
        else:
            pieces = (
                up.stream_chunks
                if up.stream_chunks is not None
                else split_words(up.reply_text)
            )
            if not pieces:
                pieces = [""]
            deltas = [{"role": "assistant", "content": pieces[0]}]
            deltas += [{"content": p} for p in pieces[1:]]
            finish = up.finish_reason

        for i, delta in enumerate(deltas):
            await self._frame(chunk(delta), first=i == 0, fault=fault)
            if i == 0 and fault == "disconnect":
                raise _Abort  # close abruptly: no terminating chunk
        await self._frame(chunk({}, finish), fault=fault)
        if include_usage and fault != "no_usage":
            obj = dict(base, choices=[], usage=self._usage())
            await self._frame(
                b"data: " + json.dumps(obj).encode() + b"\n\n", fault=fault
            )
        await self._frame(b"data: [DONE]\n\n", fault=fault)
        await self._send(h11.EndOfMessage())

    async def _frame(
        self, data: bytes, *, first: bool = False, fault: str | None
    ) -> None:
        up = self.up
        if not first:
            if up.chunk_delay_s > 0:
                await trio.sleep(up.chunk_delay_s)
            if fault == "slow":
                await trio.sleep(up.slow_s)
        try:
            await self._send(h11.Data(data=data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            up.client_disconnects += 1
            raise


async def serve_upstream(
    upstream: FakeUpstream,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``upstream`` on 127.0.0.1:<ephemeral> until cancelled.

    ``task_status.started(base_url)`` with ``base_url == "http://127.0.0.1:PORT/v1"``
    (also stored on ``upstream.base_url`` / ``upstream.port``). Cancelling the
    enclosing scope closes the listener and every connection.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handler(stream: trio.SocketStream) -> None:
        await _Conn(upstream, stream).serve()

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        upstream.port = port
        upstream.base_url = f"http://127.0.0.1:{port}/v1"
        task_status.started(upstream.base_url)


@asynccontextmanager
async def run_upstream(
    upstream: FakeUpstream | None = None, **knobs: Any
) -> AsyncIterator[FakeUpstream]:
    """``async with run_upstream(api_key="k") as up:`` - serves for the block's duration."""
    up = upstream if upstream is not None else FakeUpstream()
    for k, v in knobs.items():
        if not hasattr(up, k):
            raise TypeError(f"FakeUpstream has no knob {k!r}")
        setattr(up, k, v)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_upstream, up)
        try:
            yield up
        finally:
            nursery.cancel_scope.cancel()
