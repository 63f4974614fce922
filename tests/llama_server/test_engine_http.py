"""The hot path to an engine child (``backends/engine_http.py``) against a scripted server on a
real loopback socket: what it sends, the ``data:`` payloads whatever the reads cut, error
statuses, every way a connection fails, and that leaving the stream closes the connection (which
is what makes an engine free the slot).  Real clock, bounded by ``fail_after``."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable

import h11
import pytest
import trio

from llm_pool.backends.engine_http import EngineConnectionLost, EngineReply, post_stream

LIMIT_S = 10
Handler = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def read_request(stream: trio.SocketStream) -> bytes:
    """The whole request (head and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


async def serving(nursery: trio.Nursery, handler: Handler, host: str = "127.0.0.1") -> str:
    """A one-connection-at-a-time server running ``handler``; its URL (``host`` as given: an
    address, or ``localhost``, which listens on 127.0.0.1)."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1" if host == "localhost" else host)

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            await handler(stream, await read_request(stream))

    nursery.start_soon(trio.serve_listeners, one, [listener])
    netloc = f"[{host}]" if ":" in host else host
    return f"http://{netloc}:{listener.socket.getsockname()[1]}/completion"


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def chunked(*pieces: bytes) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]


STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


# CRLF and LF endings, a comment, blank separators, a payload split over two chunks, a last line
# without its newline
SSE_BODY = b'data: {"a":1}\r\n\r\n: ping\n\ndata: {"b"' + b':2}\n\nda' + b'ta: [DONE]\n\ndata:{"c":3}'
SSE_WIRE = STREAM_HEAD + b"".join(chunked(SSE_BODY[:20], SSE_BODY[20:33], SSE_BODY[33:]))
SSE_PAYLOADS = [b'{"a":1}', b'{"b":2}', b"[DONE]", b'{"c":3}']


async def test_it_sends_one_authorised_post_and_yields_each_data_payload() -> None:
    seen: list[bytes] = []

    async def handler(stream: trio.SocketStream, request: bytes) -> None:
        seen.append(request)
        await stream.send_all(SSE_WIRE)

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            url = await serving(nursery, handler)
            async with post_stream(url, b'{"prompt":[1,2]}', api_key="k3y") as reply:
                assert reply.status == 200
                payloads = [data async for data in reply]
            nursery.cancel_scope.cancel()
    assert payloads == SSE_PAYLOADS
    head, _, sent_body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /completion HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
    assert headers[b"authorization"] == b"Bearer k3y"
    assert headers[b"content-type"] == b"application/json"
    assert headers[b"connection"] == b"close"
    assert json.loads(sent_body) == {"prompt": [1, 2]}


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
async def test_it_reaches_an_address_or_a_name_and_says_the_request_is_out_before_the_answer(host: str) -> None:
    if host == "::1" and not has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback")
    out = trio.Event()

    async def handler(stream: trio.SocketStream, request: bytes) -> None:
        await out.wait()  # answers only once the caller was told its request is out
        await stream.send_all(SSE_WIRE)

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            url = await serving(nursery, handler, host)
            async with post_stream(url, b"{}", api_key="k", sent=out.set) as reply:
                payloads = [data async for data in reply]
            nursery.cancel_scope.cancel()
    assert payloads == SSE_PAYLOADS


class Reads:
    """A stream whose reads return the wire cut into ``size``-byte pieces."""

    def __init__(self, wire: bytes, size: int) -> None:
        self.pieces = [wire[i : i + size] for i in range(0, len(wire), size)]

    async def receive_some(self, max_bytes: int) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.pieces.pop(0) if self.pieces else b""


async def test_the_payloads_are_the_same_whatever_the_reads_cut() -> None:
    for size in range(1, len(SSE_WIRE) + 1):
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="POST", target="/", headers=[("Host", "e"), ("Content-Length", "0")]))
        conn.send(h11.EndOfMessage())
        reply = EngineReply(conn, Reads(SSE_WIRE, size))  # type: ignore[arg-type]
        await reply._head()
        assert [data async for data in reply] == SSE_PAYLOADS, size


async def test_an_error_status_comes_with_its_body() -> None:
    error = b'{"error":{"code":400,"message":"the prompt is too long"}}'

    async def handler(stream: trio.SocketStream, request: bytes) -> None:
        head = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(error)
        await stream.send_all(head + error)

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            url = await serving(nursery, handler)
            async with post_stream(url, b"{}", api_key="k") as reply:
                assert (reply.status, await reply.read()) == (400, error)
            nursery.cancel_scope.cancel()


async def test_nobody_listening_is_a_lost_connection() -> None:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with trio.fail_after(LIMIT_S), pytest.raises(EngineConnectionLost, match=r"^connecting: "):
        async with post_stream(f"http://127.0.0.1:{port}/completion", b"{}", api_key="k"):
            pass


async def close_at_once(stream: trio.SocketStream, request: bytes) -> None:
    pass


async def answer_garbage(stream: trio.SocketStream, request: bytes) -> None:
    await stream.send_all(b"HELLO THERE\r\n\r\n")


async def cut_mid_body(stream: trio.SocketStream, request: bytes) -> None:
    await stream.send_all(STREAM_HEAD + chunked(b"data: {}\n\n")[0] + b"40\r\ndata: {")


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (close_at_once, r"^the engine closed the connection without answering$"),
        (answer_garbage, r"^the engine's answer is not HTTP/1\.1$"),
        (cut_mid_body, r"^the engine closed the connection mid-answer$"),
    ],
    ids=["closed-without-answer", "not-http", "cut-mid-body"],
)
async def test_a_connection_that_breaks_is_a_lost_connection(handler: Handler, message: str) -> None:
    got: list[bytes] = []
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            url = await serving(nursery, handler)
            with pytest.raises(EngineConnectionLost, match=message):
                async with post_stream(url, b"{}", api_key="k") as reply:
                    async for data in reply:
                        got.append(data)
            nursery.cancel_scope.cancel()
    assert got == ([b"{}"] if handler is cut_mid_body else [])


@pytest.mark.parametrize("how", ["leaving", "cancelled"])
async def test_leaving_the_stream_closes_the_connection(how: str) -> None:
    """What makes an engine abort the sequence: the server sees end-of-file once the caller
    leaves the stream after the first payload, by leaving the block or by being cancelled."""
    closed = trio.Event()

    async def handler(stream: trio.SocketStream, request: bytes) -> None:
        await stream.send_all(STREAM_HEAD + chunked(b"data: {}\n\n")[0])
        while await stream.receive_some(65536):
            pass
        closed.set()

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            url = await serving(nursery, handler)
            with trio.CancelScope() as scope:
                async with post_stream(url, b"{}", api_key="k") as reply:
                    async for data in reply:
                        assert data == b"{}"
                        if how == "cancelled":
                            scope.cancel()
                            await trio.sleep_forever()
                        break
            await closed.wait()
            nursery.cancel_scope.cancel()


async def test_an_engine_that_stops_reading_the_request_is_a_lost_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_pool.backends import engine_http

    monkeypatch.setattr(engine_http, "WRITE_TIMEOUT_S", 0.2)
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}/completion"
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:

            async def never_reads() -> None:
                stream = await listener.accept()
                async with stream:
                    await trio.sleep_forever()

            nursery.start_soon(never_reads)
            # far more than the two socket buffers hold
            with pytest.raises(EngineConnectionLost, match=r"^sending: TooSlowError$"):
                async with post_stream(url, b"x" * (64 << 20), api_key="k"):
                    pass
            nursery.cancel_scope.cancel()
    await listener.aclose()
