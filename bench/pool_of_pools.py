"""Issue 18: one front pool in front of 1, 2 and 3 llm-pool hosts, against one host direct.

Run: ``.venv/bin/python -m bench.pool_of_pools [--seconds 8] [--clients 8] [--tokens 32]``.
Not a test: nothing here asserts a time.  Prints a table.

* Aggregate tokens/s: ``--clients`` concurrent non-streamed ``/v1/responses`` requests of
  ``--tokens`` tokens each for ``--seconds``, (a) straight to one host, (b) through a front pool
  whose model lists 1, 2 or 3 hosts (``remote_endpoints``, ``remote_upstream = "llm_pool"``,
  ``target_inflight`` per host = the host's).  Each host is ``llm-pool serve`` on its own
  loopback address (127.0.0.2–4) with the tiny generated GGUF (one batched replica, one compute
  thread), pinned to one core (``os.sched_setaffinity``, host i on core i mod cores): with 2
  cores, a third host shares a core, so 3 hosts cannot beat 2 here.
* The front pool's own time per request, at concurrency 1 from its response metrics:
  ``pool_total − backend_inference − engine_queue_wait`` (HTTP, JSON, admission, dispatch,
  hand-off; the upstream call is inside ``backend_inference``), and the latency it adds end to
  end: one request via the front and one direct, alternated, p50 of each.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
KEY_ENV = "LLM_POOL_BENCH_HOSTS_KEY"
PER_HOST = 4


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def toml_value(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join("{" + ", ".join(f"{k} = {json.dumps(x)}" for k, x in e.items()) + "}" for e in v) + "]"
    return json.dumps(v)


def write_config(path: Path, host: str, port: int, model: dict[str, Any]) -> Path:
    lines = ["[service]", f'host = "{host}"', f"port = {port}", 'log_level = "warning"', "access_log = false",
             "[engine.models.tiny]"] + [f"{k} = {toml_value(v)}" for k, v in model.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Server:
    def __init__(self, config: Path, url: str, cpus: set[int] | None = None) -> None:
        self.url = url
        env = {**os.environ, KEY_ENV: "bench"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_pool.pool.cli", "serve", "--config", str(config)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)  # threads started later inherit it

    def wait_loaded(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/v1/models").json()["models"] == ["tiny"]:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.url} did not load in 120 s")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def body(tokens: int, i: int) -> dict[str, Any]:
    return {"model": "tiny", "input": f"bench {i} abc", "allow_remote": True, "decoding": {"max_tokens": tokens}}


async def throughput(url: str, clients: int, tokens: int, seconds: float) -> tuple[float, int]:
    """(tokens/s, requests) of ``clients`` closed-loop clients for ``seconds``."""
    out = [0, 0]
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=clients)) as client:

        async def loop(c: int) -> None:
            i = 0
            while True:
                r = await client.post("/v1/responses", json=body(tokens, c * 100000 + i))
                r.raise_for_status()
                out[0] += r.json()["usage"]["output_tokens"]
                out[1] += 1
                i += 1

        await client.post("/v1/responses", json=body(tokens, -1))  # warm the connection
        t0 = time.perf_counter()
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for c in range(clients):
                    nursery.start_soon(loop, c)
        return out[0] / (time.perf_counter() - t0), out[1]


def overhead(front: str, direct: str, n: int) -> dict[str, float]:
    own, via, straight = [], [], []
    with httpx.Client(base_url=front, timeout=30) as f, httpx.Client(base_url=direct, timeout=30) as d:
        for i in range(n + 5):
            t0 = time.perf_counter()
            r = f.post("/v1/responses", json=body(4, i))
            t1 = time.perf_counter()
            d.post("/v1/responses", json=body(4, i)).raise_for_status()
            t2 = time.perf_counter()
            m = r.json()["metrics"]
            if i >= 5:  # warm-up
                own.append(m["pool_total_wall_ms"] - m["backend_inference_wall_ms"] - m["engine_queue_wait_ms"])
                via.append((t1 - t0) * 1000)
                straight.append((t2 - t1) * 1000)
    p50 = statistics.median
    return {"own_p50": p50(own), "own_p90": statistics.quantiles(own, n=10)[-1], "via_p50": p50(via), "direct_p50": p50(straight)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=200, help="for the overhead")
    args = ap.parse_args()
    from models.tiny_gguf import write_tiny_gguf

    cores = sorted(os.sched_getaffinity(0))
    rows: list[tuple[str, str]] = [("load average at start", " ".join(f"{x:.2f}" for x in os.getloadavg())),
                                   ("cores", str(len(cores)))]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        model = write_tiny_gguf(d / "tiny.gguf")
        host_model = {"model_path": str(model), "backend": "gguf", "prompt_format": "native", "gguf_n_ctx": 512,
                      "gguf_batching": True, "target_inflight": PER_HOST, "n_threads": 1, "max_queue": 512}
        hosts = []
        try:
            for i, address in enumerate(HOSTS):
                port = free_port(address)
                config = write_config(d / f"host{i}.toml", address, port, host_model)
                hosts.append(Server(config, f"http://{address}:{port}", {cores[i % len(cores)]}))
            for h in hosts:
                h.wait_loaded()
            tps, n = trio.run(throughput, hosts[0].url, args.clients, args.tokens, args.seconds)
            base = tps
            rows.append(("one host direct", f"{tps:.0f} tok/s ({n} requests)"))
            for k in (1, 2, 3):
                port = free_port("127.0.0.1")
                front_model = {"backend": "openai_compatible", "remote_model": "tiny", "remote_upstream": "llm_pool",
                               "remote_api_key_env": KEY_ENV, "target_inflight": PER_HOST, "max_queue": 512,
                               "remote_endpoints": [{"base_url": h.url + "/v1"} for h in hosts[:k]]}
                front = Server(write_config(d / f"front{k}.toml", "127.0.0.1", port, front_model), f"http://127.0.0.1:{port}")
                try:
                    front.wait_loaded()
                    tps, n = trio.run(throughput, front.url, args.clients * k, args.tokens, args.seconds)
                    rows.append((f"front pool + {k} host(s), {args.clients * k} clients",
                                 f"{tps:.0f} tok/s ({n} requests), {tps / base:.2f}× one host direct"))
                    if k == 1:
                        o = overhead(front.url, hosts[0].url, args.requests)
                        rows.append(("front pool's own time per request (metrics), concurrency 1",
                                     f"p50 {o['own_p50']:.2f} ms, p90 {o['own_p90']:.2f} ms"))
                        rows.append(("latency of a 4-token request, via the front / direct (p50)",
                                     f"{o['via_p50']:.1f} ms / {o['direct_p50']:.1f} ms (+{o['via_p50'] - o['direct_p50']:.1f} ms)"))
                finally:
                    front.stop()
        finally:
            for h in hosts:
                h.stop()
    rows.append(("load average at end", " ".join(f"{x:.2f}" for x in os.getloadavg())))
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
