"""ExLlamaV3 on the GPU: convert a random HF Llama with exllamav3's own converter, then serve it.

Run: ``python -m bench.gpu.exl3_bench HF_DIR WORK_DIR [--bits 4] [--tokens 256]``.  Needs CUDA and
the real exllamav3 (its extension built).  Steps, each timed:

1. ``python -m exllamav3.conversion.convert_model -i HF_DIR -o WORK/exl3 -w WORK/job -b BITS``
   with a small calibration set (the model is random; only the pipeline is under test);
2. the real :class:`PoolManager` loads the EXL3 result with the ``exllamav3`` backend, in-process;
3. aggregate tokens/s at concurrency 1 and 8 (all output tokens / wall from the first submit to
   the last result) and p50 time to first token, greedy, ``--tokens`` per request.

Not a test: nothing here asserts a time.  Prints one table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[2]


def convert(hf: Path, work: Path, bits: float, timeout: float) -> tuple[Path, float]:
    out, job = work / "exl3", work / "job"
    cmd = [sys.executable, "-m", "exllamav3.conversion.convert_model", "-i", str(hf), "-o", str(out), "-w", str(job),
           "-b", str(bits), "-cr", "16", "-cc", "256"]
    print("#", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=timeout)
    # the converter leaves the tokenizer files to the caller's folder: copy what the backend reads
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (hf / name).exists() and not (out / name).exists():
            (out / name).write_bytes((hf / name).read_bytes())
    return out, time.perf_counter() - t0


async def _one(manager: Any, i: int, tokens: int, t0: float) -> tuple[float, int]:
    from llm_pool.pool.jobs import Decoding, Delta, Done, GenerationRequest, Job, Message

    req = GenerationRequest(
        model="exl3",
        messages=[Message(role="user", content=f"Write story number {i} about a dragon.")],
        decoding=Decoding(temperature=0.0, max_tokens=tokens),
    )
    job = Job(req)
    manager.submit(job, allow_remote=False)
    first = None
    async for event in job.events():
        if isinstance(event, Delta) and first is None:
            first = time.perf_counter() - t0
        elif isinstance(event, Done):
            assert event.stats.output_tokens is not None
            return first or 0.0, event.stats.output_tokens
        elif not isinstance(event, Delta):
            raise event.error
    raise RuntimeError("no result")


async def _collect(out: list[tuple[float, int]], manager: Any, i: int, tokens: int, t0: float) -> None:
    out.append(await _one(manager, i, tokens, t0))


async def measure(model_dir: Path, tokens: int, rounds: int) -> dict[int, list[tuple[float, float]]]:
    from llm_pool.config import decode_settings
    from llm_pool.pool.manager import PoolManager

    settings = decode_settings(
        {"engine": {"models": {"exl3": {
            "model_path": str(model_dir), "backend": "exllamav3", "prompt_format": "generic",
            "target_inflight": 8, "exllama_cache_size": 16384,
        }}}},
        source="bench",
    )
    manager = PoolManager(settings)
    results: dict[int, list[tuple[float, float]]] = {1: [], 8: []}
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        t0 = time.perf_counter()
        await manager.load("exl3")
        print(f"# loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        await _one(manager, 0, 16, time.perf_counter())  # warm the kernels
        for _ in range(rounds):
            for c in (1, 8):
                out: list[tuple[float, int]] = []
                t0 = time.perf_counter()
                async with trio.open_nursery() as inner:
                    for i in range(c):
                        inner.start_soon(_collect, out, manager, i, tokens, t0)
                wall = time.perf_counter() - t0
                results[c].append((sum(n for _, n in out) / wall, statistics.median(f for f, _ in out)))
        nursery.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf", type=Path, help="a Hugging Face Llama folder (python -m bench.gpu.models hf ...)")
    parser.add_argument("work", type=Path)
    parser.add_argument("--bits", type=float, default=4.0)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--convert-timeout", type=float, default=240)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir, convert_s = convert(args.hf, args.work, args.bits, args.convert_timeout)
    r = trio.run(measure, model_dir, args.tokens, args.rounds)
    print(f"# llm-pool bench: ExLlamaV3 {args.bits} bpw, random {args.hf.name}, in-process pool manager, greedy, "
          f"{args.tokens} tokens/request, {args.rounds} rounds (best | median)")
    print(f"exllamav3 conversion (convert_model, 16x256 calibration), s  {convert_s:.1f}")
    for c in (1, 8):
        rates = [x for x, _ in r[c]]
        ttft = [t for _, t in r[c]]
        print(f"exllamav3 aggregate tok/s at c={c}  {max(rates):.1f} | {statistics.median(rates):.1f}")
        print(f"exllamav3 p50 TTFT at c={c}, s  {min(ttft):.3f} | {statistics.median(ttft):.3f}")
    print(f"exllamav3 ratio c=8 / c=1 (best)  {max(x for x, _ in r[8]) / max(x for x, _ in r[1]):.2f}")


if __name__ == "__main__":
    main()
