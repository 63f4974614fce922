"""The guard between the pool and one engine process: it makes sure no engine outlives the pool.

Run as a script (``python -I -S engine_guard.py STOP_TIMEOUT_S -- ENGINE ARGV...``), never
imported by the pool: it uses the standard library only, so it starts in ~20 ms.

Why a guard and not ``PR_SET_PDEATHSIG`` on the engine directly: the death signal fires when the
*thread* that forked the child exits, and trio forks from a worker thread of its thread cache,
which exits after a few idle seconds, killing a healthy engine with it.  The guard forks the
engine from its own main thread (which lives exactly as long as the guard), so the engine's
``PR_SET_PDEATHSIG(SIGKILL)`` means "the guard died".  The guard in turn watches the pool through
its stdin: a pipe whose only write end the pool holds.  When the pool ends in any way (a clean
exit, a crash, SIGKILL), the kernel closes that end, the guard reads EOF, and stops the engine
(SIGTERM to the group, SIGKILL after ``STOP_TIMEOUT_S``).

Process group: the pool starts the guard in a new session, so guard and engine share one process
group that the pool can signal as a whole.  A SIGTERM to the guard is passed on to the group once
(the guard's own copy is a no-op): llama-server exits at once, skipping its clean shutdown, when
it receives a second SIGTERM.  Signals are taken by a thread (``set_wakeup_fd``), never handled
in the main thread, which may be in the middle of a write to stderr.

Exit status: the engine's, with a signal death reported as ``128 + signal`` (the shell's rule).
First line on stderr: ``llm-pool-guard: engine pid <pid>``, so the pool can name the engine.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

#: prctl option number (linux/prctl.h); ctypes has no constant for it.
PR_SET_PDEATHSIG = 1
PID_LINE = "llm-pool-guard: engine pid {pid}"


def _say(line: str) -> None:
    """One line on stderr, if anyone still reads it: once the pool is gone, the pipe is broken
    and the guard must go on to stop the engine."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        pass


def _preexec(guard_pid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != guard_pid:  # the guard died before the death signal was armed
        os._exit(1)


def _terminate_group(timeout_s: float, engine_ended: threading.Event) -> None:
    """SIGTERM the group, then SIGKILL it after ``timeout_s`` (the guard's own SIGTERM handler
    does nothing once stopping)."""
    os.killpg(0, signal.SIGTERM)
    if not engine_ended.wait(timeout_s):
        os.killpg(0, signal.SIGKILL)  # the guard dies with its group: nothing is left


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: engine_guard.py STOP_TIMEOUT_S -- ENGINE [ARG...]", file=sys.stderr)
        return 2
    stop_timeout_s = float(argv[0])
    guard_pid = os.getpid()
    stopping = threading.Event()
    stop_lock = threading.Lock()
    engine_ended = threading.Event()

    def stop(reason: str) -> None:
        """Called from the watcher threads only, never from a signal handler."""
        with stop_lock:
            if stopping.is_set():
                return
            stopping.set()
        threading.Thread(target=_terminate_group, args=(stop_timeout_s, engine_ended), daemon=True).start()
        _say(f"llm-pool-guard: {reason}; stopping the engine")  # after: a full stderr pipe blocks here

    # Signals first: a SIGTERM that arrives while the engine starts must still reach it.  Python
    # runs a signal handler in the main thread between two steps of whatever it is doing; a
    # handler that printed could interrupt the main thread's own print to stderr, whose writer
    # is not reentrant (RuntimeError: the guard died without stopping the engine, and the
    # engine's own children outlived the pool).  So the handler does nothing: the interpreter
    # writes the signal's number to a pipe (set_wakeup_fd), and a thread reads it and stops.
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool decides; a terminal's ^C reaches the pool

    def watch_signals() -> None:
        while True:
            if signal.SIGTERM in os.read(wakeup_r, 64):
                stop("SIGTERM")

    try:
        engine = subprocess.Popen(argv[2:], stdin=subprocess.DEVNULL, preexec_fn=lambda: _preexec(guard_pid))
    except OSError as e:
        _say(f"llm-pool-guard: cannot start {argv[2]}: {e.strerror}")
        return 127

    def watch_pool() -> None:
        while os.read(0, 4096):  # the pool never writes; EOF means it is gone
            pass
        stop("the pool went away")

    # the watchers start after the fork (no other thread may hold a lock while the child runs
    # _preexec; a SIGTERM that came before waits in the wakeup pipe) and before our first line
    # (a write to stderr may block)
    threading.Thread(target=watch_signals, daemon=True).start()
    threading.Thread(target=watch_pool, daemon=True).start()
    _say(PID_LINE.format(pid=engine.pid))
    code = engine.wait()
    engine_ended.set()
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    status = main(sys.argv[1:])
    try:
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(status)  # not sys.exit: the watcher thread is blocked in a read of stdin
