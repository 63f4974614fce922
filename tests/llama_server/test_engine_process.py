"""The supervised engine process, with stand-in engines (``sleep``, ``sh``): no llama-server needed.

Real clock, real processes; every test bounded by ``trio.fail_after``.  A process's end is
awaited through a pidfd (readable once it exited), never by polling or sleeping.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from llama_server_kit import gone, wait_gone

from llm_pool.backends.engine_process import EngineProcess, describe_exit, engine_env

LIMIT_S = 20
HERE = Path(__file__).parent


def engine(argv: list[str], **kw: object) -> EngineProcess:
    return EngineProcess(argv, env=dict(os.environ), model="m", replica="m#1", stop_timeout_s=5.0, **kw)  # type: ignore[arg-type]


async def test_output_lines_reach_our_logs_tagged_and_the_tail_names_a_death(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="llm_pool.engine")
    script = 'echo plain line; echo \'{"type":"log","level":"error","msg":"bad thing"}\' ; echo to stderr >&2; exit 3'
    e = engine(["sh", "-c", script])
    with trio.fail_after(LIMIT_S):
        await e.start()
        await e.run_io()
    assert e.returncode == 3 and describe_exit(e.returncode) == "exit code 3"
    records = {r.getMessage(): r for r in caplog.records if r.name == "llm_pool.engine"}
    assert records["plain line"].levelno == logging.DEBUG
    assert records["bad thing"].levelno == logging.ERROR  # llama.cpp's JSON level is kept
    assert records["to stderr"].fields["stream"] == "stderr"  # type: ignore[attr-defined]
    assert {k: records["plain line"].fields[k] for k in ("model", "replica", "pid")} == {  # type: ignore[attr-defined]
        "model": "m", "replica": "m#1", "pid": e.pid}
    assert records["engine process died"].levelno == logging.ERROR
    # two pipes: their lines interleave in any order
    assert sorted(e.tail().split(" | ")) == ["bad thing", "plain line", "to stderr"]


async def test_a_signal_death_is_named() -> None:
    e = engine(["sh", "-c", "kill -KILL $$"])
    with trio.fail_after(LIMIT_S):
        await e.start()
        await e.run_io()
    assert describe_exit(e.returncode) == "killed by SIGKILL"


async def test_stop_terminates_the_group_and_reaps_it() -> None:
    # the engine starts a grandchild; the group signal ends both
    e = engine(["sh", "-c", "sleep 600 & echo started $!; wait"])
    started = trio.Event()
    said: set[str] = set()

    def on_line(line: str) -> None:  # two pipes: the guard's pid line may come after "started"
        said.update({"started"} if line.startswith("started") else set())
        said.update({"pid"} if e.engine_pid is not None else set())
        if said == {"started", "pid"}:
            started.set()

    e.on_line = on_line
    with trio.fail_after(LIMIT_S):
        await e.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(e.run_io)
            await started.wait()
            nursery.cancel_scope.cancel()
        grandchild = int(e.tail(1).split()[1])
        engine_pid = e.engine_pid
        assert engine_pid is not None
        await e.stop()
        # SIGTERM sufficed (sh may die of it, or exit once its waited-for child did)
        assert e.exited.is_set() and describe_exit(e.returncode) != "killed by SIGKILL"
        await wait_gone(grandchild)
        assert gone(engine_pid) and gone(e.pid)  # type: ignore[arg-type]


async def test_an_engine_that_ignores_sigterm_is_killed_after_stop_timeout() -> None:
    e = EngineProcess(
        ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"],
        env=dict(os.environ), model="m", replica="m#1", stop_timeout_s=0.5,
    )
    ready = trio.Event()
    e.on_line = lambda line: ready.set() if line == "ready" else None
    with trio.fail_after(LIMIT_S):
        await e.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(e.run_io)
            await ready.wait()
            nursery.cancel_scope.cancel()
        t0 = trio.current_time()
        await e.stop()
        assert 0.5 <= trio.current_time() - t0 < 5, (e.returncode, e.tail(8))
        assert describe_exit(e.returncode) == "killed by SIGKILL"


async def test_a_stop_is_done_even_when_cancelled() -> None:
    e = engine(["sleep", "600"])
    with trio.fail_after(LIMIT_S):
        await e.start()
        with trio.CancelScope() as scope:
            scope.cancel()
            await e.stop()
        assert e.exited.is_set()


async def test_a_missing_binary_exits_127_with_the_reason() -> None:
    e = engine(["/nonexistent/llama-server"])
    with trio.fail_after(LIMIT_S):
        await e.start()
        await e.run_io()
    assert e.returncode == 127
    assert e.tail() == "llm-pool-guard: cannot start /nonexistent/llama-server: No such file or directory"


def test_environment_prepends_the_library_path_and_adds_the_config_env() -> None:
    env = engine_env({"LD_LIBRARY_PATH": "/usr/lib", "A": "1"}, library_path="/opt/cuda/lib", extra={"B": "2"})
    assert env == {"LD_LIBRARY_PATH": "/opt/cuda/lib:/usr/lib", "A": "1", "B": "2"}
    assert engine_env({}, library_path="/x", extra={})["LD_LIBRARY_PATH"] == "/x"


async def test_a_sigkilled_pool_leaves_no_engine_behind() -> None:
    """The real thing: a pool process (pool_child.py) SIGKILLed while its engine runs."""
    with trio.fail_after(LIMIT_S):
        pool = await trio.lowlevel.open_process(
            [sys.executable, str(HERE / "pool_child.py"), "sleep", "600"], stdout=subprocess.PIPE
        )
        assert pool.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await pool.stdout.receive_some(1024)
        fields = dict(kv.split("=") for kv in line.decode().split())
        guard, child = int(fields["guard"]), int(fields["engine"])
        assert not gone(guard) and not gone(child)
        pool.send_signal(signal.SIGKILL)
        await pool.wait()
        await wait_gone(child)
        await wait_gone(guard)


async def test_a_sigterm_while_the_guard_writes_to_stderr_still_stops_the_whole_group() -> None:
    """Regression (the flake of test_stop_terminates_the_group_and_reaps_it under load): the
    SIGTERM reached the guard while its main thread was inside a print to stderr; the old
    handler printed too, the stderr writer refused the reentrant call, the guard died, and the
    engine's own child outlived everything.  Here the guard's stderr pipe is full before it
    starts, so its first line blocks: the SIGTERM lands inside that write every time."""
    from llm_pool.backends.engine_process import GUARD

    def drain(fd: int) -> None:
        while os.read(fd, 65536):
            pass

    err_r, err_w = os.pipe()
    os.set_blocking(err_w, False)
    try:
        while True:
            os.write(err_w, b"x" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(err_w, True)
    guard = await trio.lowlevel.open_process(
        [sys.executable, "-I", "-S", str(GUARD), "10.0", "--", "sh", "-c", "sleep 600 & echo $!; wait"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err_w, start_new_session=True,
    )
    os.close(err_w)
    grandchild = None
    try:
        with trio.fail_after(LIMIT_S):
            assert guard.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await guard.stdout.receive_some(1024)
            grandchild = int(line)
            guard.send_signal(signal.SIGTERM)  # its main thread is blocked writing its pid line
            await wait_gone(grandchild)  # the group got the SIGTERM while stderr was still full
            async with trio.open_nursery() as nursery:  # now let its writes through
                nursery.start_soon(trio.to_thread.run_sync, drain, err_r)
                assert await guard.wait() == 128 + signal.SIGTERM  # sh's status: killed by SIGTERM
    finally:
        for pid in (grandchild, guard.pid):
            if pid is not None and not gone(pid):
                os.kill(pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            for stream in (guard.stdin, guard.stdout):
                assert stream is not None
                await stream.aclose()
            await guard.wait()
        os.close(err_r)
