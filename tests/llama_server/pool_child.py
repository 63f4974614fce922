"""A stand-in pool for the SIGKILL test: starts one engine through EngineProcess, prints
``guard=<pid> engine=<pid>`` once the guard named the engine, then waits to be killed.

Usage: ``python pool_child.py ENGINE [ARG...]``.
"""

from __future__ import annotations

import os
import sys

import trio

from llm_pool.backends.engine_process import EngineProcess


async def main(argv: list[str]) -> None:
    named = trio.Event()
    engine = EngineProcess(
        argv, env=dict(os.environ), model="m", replica="m#1", stop_timeout_s=5.0,
        on_line=lambda line: named.set() if engine.engine_pid is not None else None,
    )
    await engine.start()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(engine.run_io)
        await named.wait()
        print(f"guard={engine.pid} engine={engine.engine_pid}", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    trio.run(main, sys.argv[1:])
