"""``python -m bench``: every benchmark, one after the other (see bench/RESULTS.md)."""

from __future__ import annotations

import runpy
import sys

MODULES = ["bench.gguf_pool", "bench.gguf_batching", "bench.ct2_batching", "bench.vs_llama_server", "bench.p5_cancel_memory", "bench.fairness",
           "bench.pool_of_pools"]

if __name__ == "__main__":
    for name in MODULES:
        print(f"\n## {name}\n", flush=True)
        sys.argv = [name]
        try:
            runpy.run_module(name, run_name="__main__")
        except ModuleNotFoundError as e:
            print(f"(skipped: {e})")
        except SystemExit as e:
            if e.code not in (0, None):
                print(f"(skipped: {e})")
