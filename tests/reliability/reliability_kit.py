"""Shared helpers for the reliability suites (R1–R4) (the server: ``support.server.running_server``): the
tiny deterministic GGUF's settings, a closed-loop load generator whose every response is checked
exactly (with the strict SSE reader of ``support.sse``), and the resource figures (trio tasks,
Python and OS threads, file descriptors, RSS) that must come back after a run.

Rules (see STYLE.md): 127.0.0.1 and port 0 only; the real clock wherever real threads or sockets
run (never the autojump clock with them); every wait bounded by ``trio.fail_after``.

This module imports no quart: the suites talk to the server over HTTP (R1–R3) or through the
app's own test client (R4).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from models.tiny_gguf import expected_continuation
from support.replies import error_body
from support.runtime import task_tree
from support.settings import make_settings
from support.sse import parse_chat_sse, parse_responses_sse

from llm_pool.config import Settings

#: Statuses a load test may see from a healthy, loaded model: served, or told to come back.
LOAD_OK = {200, 429}
#: The two inference routes; /v1/chat/completions is skipped by the generator if it is absent.
RESPONSES = "/v1/responses"
CHAT = "/v1/chat/completions"
#: Characters the generated inputs are drawn from: letters and digits exercise both ends of
#: the tiny model's successor table (letters cycle, ``9`` is EOS); the rest map to ``a``.
INPUT_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 ,.!?-XYZ"


# --------------------------------------------------------------------------- settings
def tiny_settings(
    model_path: Path,
    *,
    replicas: int = 2,
    replica_max: int = 3,
    max_queue: int = 16,
    service: dict[str, Any] | None = None,
    **model: Any,
) -> Settings:
    """Settings with one model ``tiny``: the real tiny GGUF, one compute thread per replica."""
    return make_settings(
        {
            "tiny": {
                "model_path": str(model_path),
                "backend": "gguf",
                # the RAW template renders only the user's text: the continuation is
                # exactly ``expected_continuation(input, max_tokens)``
                "prompt_format": "native",
                "gguf_n_ctx": 256,
                "n_threads": 1,
                "replicas": replicas,
                "replica_max": replica_max,
                "max_queue": max_queue,
                **model,
            }
        },
        {"service": {"host": "127.0.0.1", "port": 0, **(service or {})}},
    )


# --------------------------------------------------------------------------- a real server
async def admin_row(client: httpx.AsyncClient, model: str = "tiny") -> dict[str, Any]:
    r = await client.get(f"/v1/admin/models/{model}")
    assert r.status_code == 200, r.text
    row: dict[str, Any] = r.json()
    return row


async def wait_state(client: httpx.AsyncClient, state: str, model: str = "tiny") -> dict[str, Any]:
    """Poll the admin row (10 ms apart) until the model is in ``state``; returns the row."""
    while (row := await admin_row(client, model))["runtime_state"] != state:
        assert row["runtime_state"] in ("loading", "unloading", "loaded", "unloaded", "failed"), row
        await trio.sleep(0.01)
    return row


# --------------------------------------------------------------------------- resources
def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def os_thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS in /proc/self/status")  # pragma: no cover


@dataclass
class Resources:
    """What the process holds at one moment."""

    tasks: list[str]
    threads: int
    os_threads: int
    fds: int
    rss_mib: float

    @classmethod
    def now(cls) -> Resources:
        return cls(task_tree(depth=True), threading.active_count(), os_thread_count(), fd_count(), rss_mib())


async def wait_threads_back(baseline: int, within_s: float, *, os_baseline: int | None = None) -> int:
    """Wait until ``threading.active_count() <= baseline`` (and, with ``os_baseline``, the OS's
    count of the process's threads too); returns the last Python count seen.

    trio parks a finished worker thread in its cache for ``IDLE_TIMEOUT`` before it exits; the
    suites shorten that (fixture ``short_thread_idle``) so a thread still alive after this is a
    thread still running something: a leak.  Python forgets a thread a moment before the OS has
    ended it, so an OS count read right after can be one too many (seen 1 run in ~8)."""
    with trio.move_on_after(within_s):
        while threading.active_count() > baseline or (  # noqa: ASYNC110 - no event for thread exit
            os_baseline is not None and os_thread_count() > os_baseline
        ):
            await trio.sleep(0.02)
    return threading.active_count()


# --------------------------------------------------------------------------- replies
def check_error_body(r: httpx.Response, status: int | set[int], codes: set[str] | None = None) -> str:
    """An error reply: the status, JSON, both error shapes, a message; returns its code."""
    statuses = {status} if isinstance(status, int) else status
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    err = error_body(r)["error"]
    assert err["message"], err
    if codes is not None:
        assert err["code"] in codes, err
    if r.status_code == 429:
        assert int(r.headers["retry-after"]) >= 1, r.headers
    code: str = err["code"]
    return code


def responses_stream_text(raw: bytes) -> tuple[str, list[str], dict[str, Any] | None]:
    """(text of the deltas, event names, the ``error`` event's data or None), checking shape:
    ``response.created`` first; then either ``response.completed`` (or ``response.incomplete``,
    cut by ``max_tokens``) last (exactly once, its ``output_text`` equal to the deltas) or an
    ``error`` event last."""
    events = parse_responses_sse(raw)
    names = [n for n, _ in events]
    assert names[0] == "response.created", names
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    ends = ("response.completed", "response.incomplete")
    if names[-1] == "error":
        assert not set(ends) & set(names) and names.count("error") == 1, names
        return text, names, events[-1][1]
    assert names[-1] in ends and sum(names.count(e) for e in ends) == 1, names
    assert "error" not in names, names
    assert events[-1][1]["output_text"] == text, (events[-1][1], text)
    return text, names, None


def chat_stream_text(raw: bytes) -> tuple[str, str | None, dict[str, Any] | None]:
    """(content of the deltas, finish_reason, the error payload or None) of a chat stream."""
    *chunks, _done = parse_chat_sse(raw)
    text, finish, error = "", None, None
    assert chunks and chunks[0].get("choices", [{}])[0].get("delta", {}).get("role") == "assistant", chunks[:1]
    for i, c in enumerate(chunks):
        if "error" in c:
            assert i == len(chunks) - 1 and finish is None, chunks
            error = c
            continue
        assert c["object"] == "chat.completion.chunk", c
        for choice in c["choices"]:
            assert finish is None, ("a chunk after finish_reason", chunks)
            text += choice["delta"].get("content") or ""
            finish = choice.get("finish_reason") or finish
    if error is None:
        assert finish in ("stop", "length"), chunks
    return text, finish, error


# --------------------------------------------------------------------------- load
@dataclass(frozen=True)
class Ask:
    """One generated request: route, stream or not, input and max_tokens."""

    route: str
    stream: bool
    text: str
    max_tokens: int

    @property
    def expected(self) -> str:
        return expected_continuation(self.text, self.max_tokens)

    @property
    def finish(self) -> str:
        return "length" if len(self.expected) == self.max_tokens else "stop"

    def body(self, model: str = "tiny") -> dict[str, Any]:
        if self.route == RESPONSES:
            return {
                "model": model,
                "input": self.text,
                "stream": self.stream,
                "decoding": {"max_tokens": self.max_tokens, "temperature": 0},
            }
        return {
            "model": model,
            "messages": [{"role": "user", "content": self.text}],
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": self.stream,
        }


def random_ask(rng: random.Random, routes: list[str], max_tokens: int = 8, long_share: float = 0.0) -> Ask:
    """A random request: 1–``max_tokens`` tokens, or with probability ``long_share`` a long
    generation (100–220 tokens, letters only so it runs to its budget) that keeps a replica
    busy long enough for the queue to fill (the tiny model makes ~5,000 tokens/s)."""
    if rng.random() < long_share:
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 24)))
        return Ask(rng.choice(routes), rng.random() < 0.1, text, rng.randint(100, 220))
    text = "".join(rng.choice(INPUT_ALPHABET) for _ in range(rng.randint(1, 24)))
    return Ask(rng.choice(routes), rng.random() < 0.5, text, rng.randint(1, max_tokens))


@dataclass
class Result:
    """How one request ended, as its client saw it."""

    ask: Ask
    status: int | None = None
    code: str | None = None
    #: the inference job's id (``id`` of the response), for 200s
    job_id: str | None = None
    text: str | None = None
    #: for a 200 stream that ended with an error event: that event's code
    stream_error: str | None = None
    started: float = 0.0
    seconds: float = 0.0
    exception: str | None = None


async def send(client: httpx.AsyncClient, ask: Ask, model: str = "tiny") -> Result:
    """Send ``ask`` and read the whole reply, checking its shape exactly; never raises for a
    protocol-level failure (it is recorded in ``exception``): a load test reports every one."""
    res = Result(ask, started=time.perf_counter())
    try:
        if ask.stream:
            async with client.stream("POST", ask.route, json=ask.body(model)) as r:
                raw = await r.aread()
        else:
            r = await client.post(ask.route, json=ask.body(model))
            raw = r.content
        res.status = r.status_code
        if r.status_code != 200:
            res.code = check_error_body(r, r.status_code)
        elif not ask.stream:
            assert r.headers["content-type"] == "application/json", r.headers
            body = json.loads(raw)
            res.job_id = body["id"]
            if ask.route == RESPONSES:
                res.text = body["output_text"]
                item = body["output"][0]  # llm-pool's output_text item, or OpenAI's message item
                assert (item["text"] if item["type"] == "output_text" else item["content"][0]["text"]) == res.text, body
                status = "incomplete" if ask.finish == "length" else "completed"
                assert body["status"] == status, (ask, body["status"])
            else:
                res.text = body["choices"][0]["message"]["content"]
                assert body["choices"][0]["finish_reason"] == ask.finish, (ask, body["choices"])
        else:
            assert r.headers["content-type"] == "text/event-stream; charset=utf-8", r.headers
            if ask.route == RESPONSES:
                res.text, names, error = responses_stream_text(raw)
                res.job_id = parse_responses_sse(raw)[0][1]["id"]
                if error is not None:
                    res.stream_error = str(error["code"])
            else:
                res.text, finish, error = chat_stream_text(raw)
                res.job_id = parse_chat_sse(raw)[0]["id"]
                if error is not None:
                    res.stream_error = str(error["error"]["code"])
                else:
                    assert finish == ask.finish, (ask, finish)
    except Exception as e:  # recorded, asserted on by the suite
        res.exception = f"{type(e).__name__}: {e}"
    res.seconds = time.perf_counter() - res.started
    return res


@dataclass
class LoadReport:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    def statuses(self) -> Counter[Any]:
        return Counter((r.status, r.code) for r in self.results)

    def summary(self) -> str:
        ok = sum(r.status == 200 for r in self.results)
        slowest = max((r.seconds for r in self.results), default=0.0)
        return (
            f"{len(self.results)} requests in {self.seconds:.1f}s ({len(self.results) / max(self.seconds, 1e-9):.0f}/s), "
            f"{ok} served, slowest {slowest:.2f}s, statuses {dict(self.statuses())}"
        )

    def problems(self, allowed: Callable[[Result], bool] | None = None) -> list[str]:
        """Every result that is not a served exact answer or an allowed refusal."""
        out = []
        for r in self.results:
            if r.exception is not None:
                out.append(f"{r.ask}: {r.exception}")
            elif r.status == 200:
                if r.stream_error is not None:
                    if allowed is None or not allowed(r):
                        out.append(f"{r.ask}: stream ended with error {r.stream_error}")
                elif r.text != r.ask.expected:
                    out.append(f"{r.ask}: got {r.text!r}, expected {r.ask.expected!r}")
            elif allowed is not None and allowed(r):
                continue
            elif r.status not in LOAD_OK:
                out.append(f"{r.ask}: {r.status} {r.code}")
        return out


async def run_load(
    client: httpx.AsyncClient | list[httpx.AsyncClient],
    *,
    requests: int,
    concurrency: int,
    routes: list[str],
    seed: int,
    backoff_s: float = 0.02,
    model: str = "tiny",
    max_tokens: int = 8,
    long_share: float = 0.0,
    until: trio.Event | None = None,
) -> LoadReport:
    """``concurrency`` closed-loop clients share ``requests`` requests (or go on until ``until``
    is set, when given).  A client that gets a 429/409 waits a jittered ``backoff_s`` (a real
    client honours Retry-After; a short wait keeps the queue under pressure)."""
    rng = random.Random(seed)
    report = LoadReport()
    left = requests
    t0 = time.perf_counter()

    clients = client if isinstance(client, list) else [client]

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal left
        while (left > 0) if until is None else not until.is_set():
            left -= 1
            res = await send(client, random_ask(rng, routes, max_tokens, long_share), model)
            report.results.append(res)
            if res.status != 200:
                await trio.sleep(backoff_s * (0.5 + rng.random()))

    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(worker, clients[i % len(clients)])
    report.seconds = time.perf_counter() - t0
    return report


@asynccontextmanager
async def http_clients(base_url: str, connections: int, *, per_client: int = 16) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``connections`` keep-alive connections to ``base_url``, spread over several httpx clients
    of ``per_client`` each: httpcore's pool scans every connection for every request, which at
    256 connections in one client costs more CPU than the server it measures.  ``verify=False``:
    plain HTTP to 127.0.0.1, and loading the CA bundle costs ~45 ms per client."""
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits, verify=False)
            )
            for _ in range(max(1, connections // per_client))
        ]
        yield clients


async def open_connections(clients: list[httpx.AsyncClient], per_client: int, *, wave: int = 64) -> None:
    """Open each client's ``per_client`` connections before a burst, at most ``wave`` connects
    at a time: hypercorn listens with a backlog of 100 (see test_r1_connection_burst)."""
    async def fill(client: httpx.AsyncClient) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(per_client):
                nursery.start_soon(client.get, "/v1/models")

    step = max(1, wave // per_client)
    for i in range(0, len(clients), step):
        async with trio.open_nursery() as nursery:
            for client in clients[i : i + step]:
                nursery.start_soon(fill, client)


async def routes_available(client: httpx.AsyncClient) -> list[str]:
    """The inference routes this server has (chat completions may not exist yet)."""
    r = await client.post(CHAT, content=b"{}")
    return [RESPONSES, CHAT] if r.status_code != 404 else [RESPONSES]
