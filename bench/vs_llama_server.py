"""P3: llm-pool against the server users would otherwise run: ``python -m llama_cpp.server``.

Run: ``make bench-deps`` once (a separate venv, ``.venv-bench``, with llama-cpp-python's
``server`` extra — FastAPI is not a dependency of llm-pool), then
``.venv/bin/python -m bench.vs_llama_server``.  Same GGUF (SmolLM2-135M Q4_1), same prompt,
greedy, 128 tokens, streaming; concurrency 1, 4 and 8; one wave of ``concurrency × waves``
requests per cell.  Figures: aggregate tokens/s (all tokens / wall time of the cell), p50
time to first token, and answers with 0 tokens (llama_cpp.server's default
``interrupt_requests=true`` cuts a running stream when another request arrives).

Issue 15 adds llama.cpp's own ``llama-server --parallel 8`` (the binary ``make install`` builds,
``-t``/``-tb`` = all cores) as a peer, and llm-pool's ``llama_server`` backend in front of the
same binary (one replica, ``target_inflight`` 8 = ``--parallel 8``): the pool's own cost over
the engine it supervises.  ``--crash-rounds N`` then times crash recovery: the engine child of a
``llama_server`` replica is SIGKILLed mid-stream N times, and each time the bench measures the
time to the replica's state ``serving`` again and to the first token of a request queued at
the kill (p50 and max).  ``--only native,backend`` runs just those two (no ``.venv-bench``).
``--pool-core`` gives both sides the same split: the engine (llama-server alone, or the pool's
child) on every core but core 0 with one thread per core, the pool and the load generator on
core 0, so the relay's own cost shows apart from the CPU it would take from the engine's threads.

Each server runs alone on the machine while it is measured.  Not a test.  ``make bench-deps`` gives
llama_cpp.server the wheel a user's ``pip install`` builds (OpenMP on, plus the flags that keep it
from crashing here); ``make bench-deps LLAMA_SERVER_OPENMP=OFF`` gives it llm-pool's wheel.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.gguf_pool import ROOT, free_port, smollm2_path, write_config
from llm_pool.pool.workload import PROMPT, SYSTEM, Answer, Cell, drive, requests_for

BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"


def build_of(python: str) -> str:
    """How the llama-cpp-python wheel of ``python`` was built (OpenMP or ggml's thread pool)."""
    if not Path(python).exists():
        return "not installed"
    code = "import llama_cpp; print('OPENMP = 1' in llama_cpp.llama_print_system_info().decode())"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False).stdout.strip()
    return {"True": "OpenMP", "False": "GGML_OPENMP=OFF"}.get(out, "unknown")


async def _measure(url: str, kind: str, concurrency: int, requests: int, tokens: int, model: str) -> Cell:
    """One cell over HTTP: the workload of :mod:`llm_pool.pool.workload` (the one ``llm-pool
    tune`` drives in-process), each request a stream to ``url``."""
    limits = httpx.Limits(max_connections=concurrency + 2)
    if kind == "pool":
        path = "/v1/responses"
        body: dict[str, Any] = {
            "model": model, "input": PROMPT, "instructions": SYSTEM, "stream": True,
            "decoding": {"temperature": 0, "max_tokens": tokens},
        }
    else:
        path = "/v1/chat/completions"
        body = {
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
            "stream": True, "temperature": 0, "top_k": 1, "max_tokens": tokens,
        }
    # llama-server may close a kept-alive connection right after a stream ends; a request sent
    # on it then fails before reaching the server (≈1 in 3 back to back, measured 2026-12-04)
    # and would count as a 0-token answer: each request to an engine gets a connection of its own
    headers = {} if kind == "pool" else {"Connection": "close"}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as client:

        async def one() -> Answer:
            t0 = time.perf_counter()
            first: float | None = None
            n = 0
            try:
                async with client.stream("POST", path, json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        data = json.loads(line[6:])
                        if kind == "pool":
                            if data.get("type") == "response.output_text.delta" and first is None:
                                first = time.perf_counter() - t0
                            if data.get("type") == "response.metrics":
                                n = data["metrics"]["engine_output_tokens"] or 0
                        elif (data.get("choices") or [{}])[0].get("delta", {}).get("content"):
                            n += 1
                            if first is None:
                                first = time.perf_counter() - t0
            except (httpx.HTTPError, ValueError):
                pass  # a cut stream counts as what it delivered
            return Answer(ttft_s=first if first is not None else time.perf_counter() - t0, tokens=n)

        return await drive(one, concurrency, requests)


def wait_ready(url: str, path: str, proc: subprocess.Popen[bytes], model: str | None) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            r = httpx.get(url + path)
            if r.status_code == 200 and (model is None or model in r.json().get("models", [])):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("server not ready in 120 s")


def run_llama_server(variant: str, threads: int, cells: list[tuple[int, int]], tokens: int) -> dict[tuple[int, int], Cell]:
    if not BENCH_PY.exists():
        raise SystemExit("missing .venv-bench: run `make bench-deps`")
    port = free_port()
    env = dict(os.environ)
    args = [str(BENCH_PY), "-m", "llama_cpp.server", "--model", str(smollm2_path()), "--n_threads", str(threads),
            "--n_ctx", "2048", "--port", str(port), "--host", "127.0.0.1"]
    if variant in ("no-interrupt", "best"):
        args += ["--interrupt_requests", "false"]
    if variant == "best":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, "/v1/models", proc, None)
        trio.run(_measure, url, "llama", 1, 1, 8, "")
        return {(c, n): trio.run(_measure, url, "llama", c, n, tokens, "") for c, n in cells}
    finally:
        proc.terminate()
        proc.wait(30)


def run_native_llama_server(
    threads: int, parallel: int, cells: list[tuple[int, int]], tokens: int, engine_cpus: str | None = None
) -> dict[tuple[int, int], Cell]:
    """llama.cpp's own server, as a user would start it: ``--parallel`` slots, each with the
    2048-token context the pool's replicas get; on ``engine_cpus`` (a taskset list) if given."""
    from llm_pool.backends.llama_server import default_binary

    port = free_port()
    pin = ["taskset", "-c", engine_cpus] if engine_cpus else []
    args = [*pin, str(default_binary()), "--model", str(smollm2_path()), "--host", "127.0.0.1", "--port", str(port),
            "--threads", str(threads), "--threads-batch", str(threads), "--parallel", str(parallel),
            "--ctx-size", str(2048 * parallel), "--no-webui"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, "/health", proc, None)
        trio.run(_measure, url, "llama", 1, 1, 8, "")
        return {(c, n): trio.run(_measure, url, "llama", c, n, tokens, "") for c, n in cells}
    finally:
        proc.terminate()
        proc.wait(30)


async def crash_recovery(rounds: int, threads: int) -> tuple[list[float], list[float]]:
    """SIGKILL a llama_server replica's engine mid-stream ``rounds`` times (in-process
    PoolManager, restart backoff 0); per round, seconds from the kill to the replica
    ``serving`` again, and to the first token of a request queued at the kill."""
    import signal

    from support.runtime import request, running_manager, submit

    from llm_pool.config import decode_settings
    from llm_pool.pool.jobs import Delta

    settings = decode_settings(
        {"engine": {"models": {"smollm2": {
            "model_path": str(smollm2_path()), "backend": "llama_server", "prompt_format": "generic",
            "llama_server_n_ctx": 2048, "n_threads": threads, "restart_backoff_s": 0,
            "restart_max_attempts": rounds + 1}}}},
        source="bench",
    )  # fmt: skip
    to_serving: list[float] = []
    to_token: list[float] = []
    async with running_manager(settings, autoload=True, load=["smollm2"]) as (manager, _):
        runtime = manager.entries["smollm2"].runtime
        assert runtime is not None
        replica = runtime.replicas[0]
        for _ in range(rounds):
            victim = submit(manager, request(PROMPT, "smollm2", max_tokens=2000))
            events = victim.events()
            while not isinstance(await events.receive(), Delta):
                pass
            engine = replica.backend.engine  # type: ignore[attr-defined]
            starts = replica.backend.starts  # type: ignore[attr-defined]
            queued = submit(manager, request("Say hi.", "smollm2", max_tokens=4))
            t0 = time.perf_counter()
            os.kill(engine.engine_pid, signal.SIGKILL)
            async for _event in events:
                pass
            first = queued.events()
            async with trio.open_nursery() as nursery:

                async def watch_state(t0: float = t0, starts: int = starts) -> None:
                    # restarted (one more engine start) and serving: a fast restart that
                    # happened before this task ran is not missed
                    while not (replica.backend.starts > starts and replica.state == "serving"):  # type: ignore[attr-defined]
                        await runtime.wait_changed()
                    to_serving.append(time.perf_counter() - t0)

                nursery.start_soon(watch_state)
                while not isinstance(await first.receive(), Delta):
                    pass
                to_token.append(time.perf_counter() - t0)
            await queued.result()
    return to_serving, to_token


def pin_engines(pool_pid: int, cpus: str) -> int:
    """Move every process below the pool (guards, engines: all their threads) to ``cpus``;
    how many were moved."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    below, todo = [], list(children.get(pool_pid, []))
    while todo:
        pid = todo.pop()
        below.append(pid)
        todo += children.get(pid, [])
    for pid in below:
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True, check=False)
    return len(below)


def run_pool(
    model_fields: dict[str, Any], cells: list[tuple[int, int]], tokens: int, on_ready: Any = None,
    engine: dict[str, Any] | None = None, pool_cpus: str | None = None, engine_cpus: str | None = None,
) -> dict[tuple[int, int], Cell]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        # a model's fields belong to its backend: gguf_n_ctx only where the backend is gguf
        context = {} if model_fields.get("backend", "gguf") != "gguf" else {"gguf_n_ctx": 2048}
        fields = {"model_path": str(smollm2_path()), "prompt_format": "generic", "max_queue": 1024, **context, **model_fields}
        config = write_config(Path(tmp), {"smollm2": fields}, port, engine)
        pin = ["taskset", "-c", pool_cpus] if pool_cpus else []
        proc = subprocess.Popen([*pin, sys.executable, "-m", "llm_pool.pool.cli", "serve", "--config", str(config)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, "/v1/models", proc, "smollm2")
            if engine_cpus and not pin_engines(proc.pid, engine_cpus):
                raise SystemExit("--pool-core: no engine process found below the pool")
            if on_ready is not None:
                on_ready(url)
            trio.run(_measure, url, "pool", 1, 1, 8, "smollm2")
            return {(c, n): trio.run(_measure, url, "pool", c, n, tokens, "smollm2") for c, n in cells}
        finally:
            proc.terminate()
            proc.wait(30)


def median_cell(cells: list[Cell]) -> Cell:
    """One cell from several rounds of it: the median tokens/s and TTFT p50, answers summed."""
    return Cell(
        tokens_per_s=statistics.median(c.tokens_per_s for c in cells),
        ttft_p50_s=statistics.median(c.ttft_p50_s for c in cells),
        zero_token_answers=sum(c.zero_token_answers for c in cells),
        requests=sum(c.requests for c in cells),
        wall_s=sum(c.wall_s for c in cells),
    )


def best_by_mean_share(results: dict[Any, dict[tuple[int, int], Cell]], cells: list[tuple[int, int]]) -> Any:
    """The configuration to serve every concurrency with: the highest mean of its tokens/s as a
    share of each concurrency's best (the rule ``llm-pool tune`` records its choice by)."""
    tops = {k: max(r[k].tokens_per_s for r in results.values()) for k in cells}
    return max(results, key=lambda name: sum(results[name][k].tokens_per_s / tops[k] for k in cells) / len(cells))


def tuned_comparison(cells: list[tuple[int, int]], tokens: int, cores: int, parallels: tuple[int, ...] = (1, 2, 4, 8)) -> None:
    """Issue 21, side by side in one run: llama-server's best single process (every
    ``--threads`` 1..cores × ``--parallel`` in ``parallels``, the one with the best mean share over the
    concurrencies; also its best per concurrency), and the pool's tuned layout: ``llm-pool
    tune`` run here (in-process, recorded in a temporary cache), then ``llm-pool serve`` with
    ``replicas = "auto"`` reading that record, measured over HTTP like the engine."""
    import logging

    from llm_pool.config import decode_settings
    from llm_pool.pool import tuning

    logging.basicConfig(level=logging.ERROR)  # the engines' own lines would drown the progress

    concurrencies = tuple(c for c, _ in cells)
    native: dict[tuple[int, int], dict[tuple[int, int], Cell]] = {}
    for threads in range(1, cores + 1):
        for parallel in parallels:
            print(f"... llama-server --threads {threads} --parallel {parallel}", file=sys.stderr, flush=True)
            native[(threads, parallel)] = run_native_llama_server(threads, parallel, cells, tokens)
            print("    " + "; ".join(f"c={k[0]} {v.tokens_per_s:.1f} tok/s, TTFT p50 {v.ttft_p50_s * 1000:.0f} ms"
                                     for k, v in native[(threads, parallel)].items()), file=sys.stderr, flush=True)
    single = best_by_mean_share(native, cells)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LLM_POOL_TUNE_CACHE_DIR"] = cache  # the serve child inherits it
        settings = decode_settings({"engine": {"cpu_cores": cores, "models": {"smollm2": {
            "model_path": str(smollm2_path()), "prompt_format": "generic", "gguf_n_ctx": 2048}}}}, source="bench")  # fmt: skip
        t0 = time.perf_counter()
        result = trio.run(functools.partial(
            tuning.sweep, settings, "smollm2", cores=cores, concurrencies=concurrencies, tokens=tokens,
            progress=lambda line: print(line, file=sys.stderr, flush=True)))  # fmt: skip
        tune_s = time.perf_counter() - t0
        overall = result.recommended(None)
        assert overall is not None, "the tune measured nothing"
        family = tuning.FAMILY[overall.layout.engine]  # the family of the best layout overall...
        best = result.recommended(family)  # ...whose own record replicas = "auto" loads
        assert best is not None
        fields: dict[str, Any] = {"backend": family, "replicas": "auto"}
        if family == "llama_server":
            fields["llama_server_n_ctx"] = 2048
        pooled, source = run_pool_auto(fields, cells, tokens, cores)
    print("\n".join(tuning.format_table(result)))
    print(f"# tune took {tune_s:.0f} s; {os.cpu_count()} cores on the machine, {cores} given to each side")
    print(f"# the pool's tuned layout: {best.layout.label} (replicas = \"auto\", backend \"{family}\": replicas_source {source})")
    t, p = single
    print(f"# llama-server's best single process: --threads {t} --parallel {p} (best mean share over c)")
    print("| c | llm-pool tuned: tok/s, TTFT p50 ms | llama-server best single: tok/s, TTFT p50 ms | ratio | "
          "llama-server best at this c |")
    print("| --- | --- | --- | --- | --- |")
    for k in cells:
        ours, theirs = pooled[k], native[single][k]
        top = max(native, key=lambda n: native[n][k].tokens_per_s)
        print(f"| {k[0]} | {ours.tokens_per_s:.1f}, {ours.ttft_p50_s * 1000:.0f} | {theirs.tokens_per_s:.1f}, "
              f"{theirs.ttft_p50_s * 1000:.0f} | {ours.tokens_per_s / theirs.tokens_per_s:.2f}x | "
              f"-t {top[0]} --parallel {top[1]}: {native[top][k].tokens_per_s:.1f}, {native[top][k].ttft_p50_s * 1000:.0f} ms |")


def run_pool_auto(
    model_fields: dict[str, Any], cells: list[tuple[int, int]], tokens: int, cores: int
) -> tuple[dict[tuple[int, int], Cell], str]:
    """:func:`run_pool` for a ``replicas = "auto"`` model; also its admin row's ``replicas_source``."""
    sources: list[str] = []

    def check(url: str) -> None:
        sources.append(httpx.get(url + "/v1/admin/models/smollm2").json()["replicas_source"])

    measured = run_pool(model_fields, cells, tokens, on_ready=check, engine={"cpu_cores": cores})
    return measured, (sources[0] if sources else "unknown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--waves", type=int, default=1)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--only", default="", help="comma list of configurations to run (default: all)")
    parser.add_argument("--crash-rounds", type=int, default=0, help="time crash recovery over this many SIGKILLs")
    parser.add_argument("--tuned", action="store_true",
                        help="issue 21: llama-server's best single process vs the pool's tuned layout (replicas = auto)")
    parser.add_argument("--cores", type=int, default=0, help="--tuned: the cores both sides get (default: all)")
    parser.add_argument("--parallel", default="1,2,4,8", help="--tuned: llama-server's --parallel values to try")
    parser.add_argument("--pool-core", action="store_true",
                        help="core 0 for the pool and the load generator, the other cores for the engine (both sides)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the configurations this many times, alternating; each cell is the median")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    cells = [(c, requests_for(c, args.waves)) for c in map(int, args.concurrency.split(","))]
    if args.tuned:
        tuned_comparison(cells, args.tokens, args.cores or cores, tuple(int(p) for p in args.parallel.split(",")))
        return
    # --pool-core: the engine (native, or the pool's child) on cores 1.., the pool and this
    # process's load generator on core 0, so that the relay takes no time from the engine's threads
    engine_threads, pool_cpus, engine_cpus = cores, None, None
    if args.pool_core:
        if cores < 2:
            raise SystemExit("--pool-core needs at least 2 cores")
        engine_threads, pool_cpus, engine_cpus = cores - 1, "0", f"1-{cores - 1}"
        os.sched_setaffinity(0, {0})
    configs: dict[str, Any] = {
        "llama_cpp.server default": lambda: run_llama_server("default", cores, cells, args.tokens),
        "llama_cpp.server interrupt_requests=false": lambda: run_llama_server("no-interrupt", cores, cells, args.tokens),
        "llama_cpp.server best (no-interrupt, OMP_WAIT_POLICY=ACTIVE)": lambda: run_llama_server("best", cores, cells, args.tokens),
        "llm-pool 1 replica x all threads": lambda: run_pool({"replicas": 1, "n_threads": cores}, cells, args.tokens),
        f"llm-pool {cores} replicas x 1 thread": lambda: run_pool({"replicas": cores, "replica_max": cores, "n_threads": 1}, cells, args.tokens),
        "llm-pool 1 batched replica (gguf_batching, target_inflight 8)": lambda: run_pool(
            {"replicas": 1, "n_threads": cores, "gguf_batching": True, "target_inflight": 8}, cells, args.tokens),
        f"llama-server --parallel 8 -t {engine_threads} (native)": lambda: run_native_llama_server(
            engine_threads, 8, cells, args.tokens, engine_cpus=engine_cpus),
        "llm-pool llama_server backend (1 replica, target_inflight 8)": lambda: run_pool(
            {"backend": "llama_server", "replicas": 1, "n_threads": engine_threads, "target_inflight": 8,
             "llama_server_n_ctx": 2048}, cells, args.tokens, pool_cpus=pool_cpus, engine_cpus=engine_cpus),
    }
    only = [o.strip() for o in args.only.split(",") if o.strip()]
    runs: dict[str, list[dict[tuple[int, int], Cell]]] = {}
    for r in range(args.rounds):  # rounds alternate the configurations: drift hits each alike
        for name, fn in configs.items():
            if (only and not any(o in name for o in only)) or (r and name not in runs):
                continue
            print(f"... {name}" + (f" (round {r + 1} of {args.rounds})" if args.rounds > 1 else ""), file=sys.stderr, flush=True)
            try:
                measured = fn()
            except Exception as e:  # a configuration the build does not support: say so, go on
                print(f"    skipped: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            runs.setdefault(name, []).append(measured)
            print(f"    {name}: " + "; ".join(f"c={k[0]} {v.tokens_per_s:.1f} tok/s, TTFT p50 {v.ttft_p50_s:.3f} s"
                                              for k, v in measured.items()), file=sys.stderr, flush=True)
    results = {name: {k: median_cell([m[k] for m in measured]) for k in measured[0]} for name, measured in runs.items()}
    if args.rounds > 1:
        print(f"# each cell: the median of {args.rounds} rounds (tok/s and TTFT p50 each), configurations alternating")
    if args.pool_core:
        print(f"# --pool-core: engines on cores {engine_cpus} ({engine_threads} threads), the pool and the load generator on core 0")
    print(f"# P3: llm-pool vs llama_cpp.server — SmolLM2-135M Q4_1, {args.tokens} tokens, greedy, streaming, {cores} cores")
    print(f"# llama.cpp builds: llm-pool {build_of(sys.executable)}, llama_cpp.server {build_of(str(BENCH_PY))}")
    print("| configuration | " + " | ".join(f"c={c}: tok/s, TTFT p50 s, 0-token" for c, _ in cells) + " |")
    print("| --- | " + " | ".join("---" for _ in cells) + " |")
    for name, res in results.items():
        row = [f"{res[k].tokens_per_s:.1f}, {res[k].ttft_p50_s:.2f}, {res[k].zero_token_answers}/{res[k].requests}" for k in cells]
        print(f"| {name} | " + " | ".join(row) + " |")
    native = next((res for name, res in results.items() if name.startswith("llama-server --parallel")), None)
    fronted = results.get("llm-pool llama_server backend (1 replica, target_inflight 8)")
    if native and fronted:
        for k in cells:
            print(f"- llm-pool llama_server backend / native llama-server at c={k[0]}: "
                  f"{fronted[k].tokens_per_s / native[k].tokens_per_s:.3f}x tok/s, "
                  f"TTFT p50 {fronted[k].ttft_p50_s * 1000:.1f} vs {native[k].ttft_p50_s * 1000:.1f} ms "
                  f"({(fronted[k].ttft_p50_s / native[k].ttft_p50_s - 1) * 100:+.0f} %)")
    c8 = next((k for k in cells if k[0] == 8), None)
    if native and c8:
        pools = {n: r for n, r in results.items() if n.startswith("llm-pool")}
        if pools:
            best = max(pools, key=lambda n: pools[n][c8].tokens_per_s)
            print(f"- best llm-pool at c=8: {best}, {pools[best][c8].tokens_per_s:.1f} tok/s = "
                  f"{pools[best][c8].tokens_per_s / native[c8].tokens_per_s:.2f}x native llama-server")
    if args.crash_rounds:
        serving_s, token_s = trio.run(crash_recovery, args.crash_rounds, cores)
        print(f"- crash recovery over {args.crash_rounds} SIGKILLs: to serving p50 {statistics.median(serving_s):.3f} s "
              f"(max {max(serving_s):.3f}), to a queued request's first token p50 {statistics.median(token_s):.3f} s "
              f"(max {max(token_s):.3f})")
    base = results.get("llama_cpp.server default")
    best = results.get("llama_cpp.server best (no-interrupt, OMP_WAIT_POLICY=ACTIVE)")
    if c8:
        for name, res in results.items():
            if name.startswith("llm-pool"):
                parts = []
                if base:
                    parts.append(f"{res[c8].tokens_per_s / base[c8].tokens_per_s:.2f}x default")
                if best:
                    parts.append(f"{res[c8].tokens_per_s / best[c8].tokens_per_s:.2f}x best")
                print(f"- {name}, aggregate at c=8: " + ", ".join(parts))


if __name__ == "__main__":
    main()
