"""A synthetic workload: ``requests`` generations at a fixed concurrency, and what they measured.

One place for the load generator that ``llm-pool tune`` (:mod:`llm_pool.pool.tuning`, jobs
submitted in-process) and the benchmarks (``bench/``, requests over HTTP) both drive: each gives
:func:`drive` a coroutine that runs one request and reports its :class:`Answer`; :func:`drive`
keeps ``concurrency`` of them running until ``requests`` were made, and sums them up in a
:class:`Cell` (aggregate tokens/s over the wall time, p50 time to first token).

The prompt is fixed (the figures in bench/RESULTS.md were made with it): a short system prompt
and a request for a long story, greedy, so every request decodes its whole ``max_tokens``.

This module imports trio only: no HTTP client, no backend.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

PROMPT = "Write a long story about a dragon who learns to read."
SYSTEM = "You are a helpful assistant. Return only the response."


@dataclass(frozen=True)
class Answer:
    """One request as its client saw it: seconds to its first token (or to its end, when it
    gave none) and the tokens it delivered."""

    ttft_s: float
    tokens: int


@dataclass(frozen=True)
class Cell:
    """One concurrency's figures."""

    tokens_per_s: float
    ttft_p50_s: float
    zero_token_answers: int
    requests: int
    wall_s: float


def requests_for(concurrency: int, waves: int = 1) -> int:
    """How many requests one cell makes: ``concurrency × waves``, at least 2 (one request alone
    is too noisy a figure)."""
    return max(concurrency * waves, 2)


async def drive(one: Callable[[], Awaitable[Answer]], concurrency: int, requests: int) -> Cell:
    """Run ``requests`` calls of ``one``, ``concurrency`` at a time; their :class:`Cell`.

    Cancellation: cancelling the caller cancels every request still running (each ``one`` must
    clean up after itself, as a job or an HTTP stream does).
    """
    answers: list[Answer] = []
    sem = trio.Semaphore(concurrency)

    async def run_one() -> None:
        async with sem:
            answers.append(await one())

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(requests):
            nursery.start_soon(run_one)
    wall = time.perf_counter() - t0
    return Cell(
        tokens_per_s=sum(a.tokens for a in answers) / wall if wall > 0 else 0.0,
        ttft_p50_s=statistics.median(a.ttft_s for a in answers),
        zero_token_answers=sum(1 for a in answers if a.tokens == 0),
        requests=len(answers),
        wall_s=wall,
    )
