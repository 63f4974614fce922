"""The hot path to an engine child: one streamed ``POST`` per job, h11 over a trio socket.

A job's generation is one HTTP request to the engine we started (``llama-server``'s
``/completion``, ``vllm serve``'s ``/v1/completions``) whose answer is an event stream with one
event per generated token.  httpx reads each of those events through six layers (client,
transport, connection pool, connection, byte streams, a ``fail_after`` per read); on a
2-core box that was about a third of the pool's CPU per relayed token, taken from the engine's
own threads (bench/RESULTS.md, issue 15).  Here the same protocol work is done by the library
httpx itself uses underneath (``h11``), directly: connect, send the request, read the head, then
hand over each ``data:`` payload as it arrives.

One connection per request, closed at the end: closing it is what makes the engine abort the
sequence and free its slot (a client gone, a stop string hit), and llama-server may close a
kept-alive connection right after a stream ends, which a reused one would only find out after
sending.  Everything else to the engine (health, ``/props``, tokenize, embeddings) stays on
httpx: it is not per token.

Errors: a connection that cannot be made (5 s), breaks, speaks broken HTTP, or whose engine
stops reading the request (:data:`WRITE_TIMEOUT_S`, as httpx's write timeout did) raises
:class:`EngineConnectionLost`; the backend decides whether that was a crash.  Waiting for the
answer has no limit: under load an engine may take long to its first token, and a client that
gives up, or an unload, cancels the job.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import h11
import trio

#: Bytes asked of the socket per read.
READ_BYTES = 65536
#: How long sending a request may take (a body with images is up to ~27 MB of JSON).
WRITE_TIMEOUT_S = 30.0
#: Longest error body read (an engine's error JSON is small).
MAX_BODY_BYTES = 1 << 20


class EngineConnectionLost(Exception):
    """The connection to the engine could not be made or broke; ``str()`` names the step."""


class EngineReply:
    """The engine's answer: :attr:`status`, then :meth:`read` (a whole body), or iterate it
    (``async for data in reply``) for an event stream's ``data:`` payloads, as bytes, in order
    (blank separators and ``:`` comments skipped).  An iterator object, not an async generator:
    a caller that stops at a stop string leaves nothing to finalize."""

    def __init__(self, conn: h11.Connection, stream: trio.SocketStream) -> None:
        self.status = 0
        self._conn = conn
        self._stream = stream
        self._lines: deque[bytes] = deque()
        self._rest = b""
        self._ended = False
        self._eof = False

    async def _event(self) -> h11.Event:
        """The next protocol event, reading from the socket as needed."""
        while True:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError:
                if self._eof:
                    raise EngineConnectionLost(
                        f"the engine closed the connection {'mid-answer' if self.status else 'without answering'}"
                    ) from None
                raise EngineConnectionLost("the engine's answer is not HTTP/1.1") from None
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                data = await self._stream.receive_some(READ_BYTES)
            except (OSError, trio.BrokenResourceError) as e:
                raise EngineConnectionLost(f"reading: {type(e).__name__}") from None
            self._eof = not data
            self._conn.receive_data(data)

    async def _head(self) -> None:
        while True:
            event = await self._event()
            if isinstance(event, h11.Response):
                self.status = event.status_code
                return
            if isinstance(event, h11.ConnectionClosed):  # pragma: no cover - h11 raises instead
                raise EngineConnectionLost("the engine closed the connection without answering")
            # an InformationalResponse (100 Continue) is skipped

    async def _piece(self) -> bytes | None:
        """The next piece of the body; None at its end."""
        while True:
            event = await self._event()
            if isinstance(event, h11.Data):
                return bytes(event.data)
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return None

    async def read(self) -> bytes:
        """The whole body (at most :data:`MAX_BODY_BYTES`)."""
        out = bytearray()
        while len(out) < MAX_BODY_BYTES and (piece := await self._piece()) is not None:
            out += piece
        return bytes(out[:MAX_BODY_BYTES])

    def __aiter__(self) -> EngineReply:
        return self

    async def __anext__(self) -> bytes:
        while True:
            while self._lines:
                line = self._lines.popleft()
                if line.startswith(b"data:"):
                    return line[5:].strip()
            if self._ended:
                raise StopAsyncIteration
            piece = await self._piece()
            if piece is None:  # a last line without its newline still counts
                self._ended = True
                self._lines.append(self._rest)
                self._rest = b""
            elif b"\n" not in piece:
                self._rest += piece
            else:
                *lines, self._rest = (self._rest + piece).split(b"\n")
                self._lines.extend(lines)


async def _connect(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to ``host:port``.  An engine listens on one address we know, usually an
    IP literal: that is one socket and one ``connect`` (trio's ``open_tcp_stream`` races the
    addresses a name resolves to in a nursery of its own: ≈0.5 ms more of the event loop, on
    the way to a first token); a host name still goes through it."""
    try:
        family = trio.socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else trio.socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@asynccontextmanager
async def post_stream(
    url: str, body: bytes, *, api_key: str, connect_timeout_s: float = 5.0, sent: Callable[[], None] | None = None
) -> AsyncIterator[EngineReply]:
    """``POST`` ``body`` (JSON) to ``url`` (``http://host:port/path``) and yield the reply once
    its head arrived; ``sent()`` is called as soon as the request is out (``Job.hand_over``).
    The connection is closed on exit, also when cancelled."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    try:
        with trio.fail_after(connect_timeout_s):
            stream = await _connect(host, port)
    except (OSError, trio.TooSlowError) as e:
        raise EngineConnectionLost(f"connecting: {type(e).__name__}") from None
    try:
        conn = h11.Connection(h11.CLIENT)
        head = h11.Request(
            method="POST",
            target=parts.path or "/",
            headers=[
                ("Host", parts.netloc),
                ("Authorization", f"Bearer {api_key}"),
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ],
        )
        out = conn.send(head) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())  # type: ignore[operator]
        try:
            with trio.fail_after(WRITE_TIMEOUT_S):  # an engine that stops reading is lost, not waited on
                await stream.send_all(out)
        except (OSError, trio.BrokenResourceError, trio.TooSlowError) as e:
            raise EngineConnectionLost(f"sending: {type(e).__name__}") from None
        if sent is not None:
            sent()
        reply = EngineReply(conn, stream)
        await reply._head()
        yield reply
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
