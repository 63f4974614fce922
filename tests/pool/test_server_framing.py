"""A request with both ``Content-Length`` and ``Transfer-Encoding: chunked`` is refused with a
400 and the connection closed (RFC 9112 §6.1; issue 13 §5): it used to be accepted and then hang
for more than 15 s.  Over a real socket on 127.0.0.1, port 0, against ``pool.server.serve``; real
clock, bounded by ``trio.fail_after``."""

from __future__ import annotations

import json

import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.server import start_server
from support.settings import make_settings

LIMIT_S = 10
BODY = b'{"model": "m", "input": "hi"}'
CHUNKED = hex(len(BODY))[2:].encode() + b"\r\n" + BODY + b"\r\n0\r\n\r\n"
HEAD = b"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


async def start(nursery: trio.Nursery) -> int:
    settings = make_settings({"m": {}}, {"service": {"host": "127.0.0.1", "port": 0}})
    url = await start_server(nursery, settings, factory=FakeBackendFactory.echo())
    return int(url.rsplit(":", 1)[1])


async def exchange(port: int, request: bytes) -> tuple[bytes, bool]:
    """Send ``request`` on a new connection; what came back before the server closed it (or
    within 2 s), and whether it closed."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data, closed = b"", False
        with trio.move_on_after(2):
            while chunk := await stream.receive_some():
                data += chunk
            closed = True
    return data, closed


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(BODY),
        b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
        b"content-length: 4\r\ntransfer-encoding: chunked\r\n",
    ],
)
async def test_content_length_with_transfer_encoding_is_400_and_closes(nursery: trio.Nursery, framing: bytes) -> None:
    with trio.fail_after(LIMIT_S):
        port = await start(nursery)
        data, closed = await exchange(port, HEAD + framing + b"\r\n" + CHUNKED)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 400"), data
    assert "connection: close" in [line.lower() for line in lines[1:]], lines
    assert "content-type: application/json" in [line.lower() for line in lines[1:]], lines
    message = "the request carries both Content-Length and Transfer-Encoding; send one of them (RFC 9112 §6.1)"
    assert json.loads(body) == {
        "error": {"type": "invalid_request_error", "code": "invalid_request", "message": message, "param": "Transfer-Encoding"},
        "detail": {"code": "invalid_request", "model": None, "message": message},
    }
    assert closed, "the server must close the connection after refusing the request"  # within 2 s


async def test_chunked_alone_is_served(nursery: trio.Nursery) -> None:
    with trio.fail_after(LIMIT_S):
        port = await start(nursery)
        data, _ = await exchange(port, HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + CHUNKED)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data
    assert json.loads(body)["output_text"] == "hi"
