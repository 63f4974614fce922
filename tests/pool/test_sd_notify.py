"""systemd's notify protocol (``pool/sd_notify.py``), as systemd would hear it: a real
``llm-pool serve`` subprocess under ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` sends its datagrams
to a unix socket the test bound, the way ``Type=notify`` with ``WatchdogSec=`` runs it
(deploy/systemd/llm-pool.service).  Real clock, real process and socket: every wait is on a
datagram or a log line, bounded by ``trio.fail_after``, never a sleep."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import httpx
import pytest
import trio
from models.tiny_gguf import write_tiny_gguf
from support.server_process import ServerLog, open_serve

from llm_pool.pool.sd_notify import Notifier, socket_address, watchdog_interval_s

LIMIT_S = 60
#: 0.2 s: the server pings every 0.1 s, so a few pings arrive within any test.
WATCHDOG_USEC = 200_000


class Datagrams:
    """What arrived on the notify socket, and a way to wait for one message."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.messages: list[str] = []
        self._changed = trio.Event()

    async def read(self) -> None:
        while True:
            data = await self.sock.recv(4096)
            self.messages.append(data.decode())
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(self, first_line: str, after: int = 0) -> int:
        """The index of the first message from ``after`` on whose first line is ``first_line``."""
        while True:
            for i, message in enumerate(self.messages[after:], after):
                if message.split("\n")[0] == first_line:
                    return i
            changed = self._changed
            await changed.wait()

    def without_pings(self) -> list[str]:
        """The messages, less the watchdog's and the optional 'loading' status (sent only when
        the model had not loaded yet by the time the server served)."""
        return [m for m in self.messages if m != "WATCHDOG=1" and not m.startswith("STATUS=loading ")]


def config_text(model: Path) -> str:
    return f"""
[service]
host = "127.0.0.1"
port = 0
log_level = "info"
shutdown_drain_s = 5

[engine.models.a]
model_path = "{model}"
backend = "gguf"
prompt_format = "generic"
gguf_n_ctx = 64
n_threads = 1

[engine.models.b]
model_path = "{model.parent / 'missing.gguf'}"
backend = "gguf"
prompt_format = "generic"
"""


async def test_ready_after_the_models_settle_watchdog_pings_reload_and_stopping(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp", reason="the gguf backend (llama-cpp-python) is not installed")
    config = tmp_path / "pool.toml"
    config.write_text(config_text(write_tiny_gguf(tmp_path / "tiny.gguf")))
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(tmp_path / "notify"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_POOL_", "WATCHDOG_"))}
    env |= {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    log = ServerLog()
    got = Datagrams(sock)
    with sock, trio.fail_after(LIMIT_S):
        proc = await open_serve(config, env=env)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(log.read, proc)
                nursery.start_soon(got.read)
                ready = await got.wait_for("READY=1")
                url = (await log.wait_for("serving"))["urls"][0]
                async with httpx.AsyncClient(base_url=url) as client:
                    # READY=1 came after the model loaded: its readiness holds at once
                    model_ready = await client.get("/health/ready/a")
                    pool_ready = await client.get("/health/ready")
                # the watchdog keeps pinging after READY=1 (twice: it repeats)
                second_ping = await got.wait_for("WATCHDOG=1", await got.wait_for("WATCHDOG=1", ready) + 1)
                proc.send_signal(signal.SIGHUP)
                reloaded = await got.wait_for("READY=1", await got.wait_for("RELOADING=1", second_ping))
                proc.send_signal(signal.SIGTERM)
                await got.wait_for("STOPPING=1", reloaded)
                assert await proc.wait() == 0
                nursery.cancel_scope.cancel()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert model_ready.status_code == 200
    assert (pool_ready.status_code, [m["model"] for m in pool_ready.json()["not_ready"]]) == (503, ["b"])
    status = "STATUS=serving 1 model(s); 1 failed to load: b (see /health/ready)"
    messages = got.without_pings()
    assert messages[0] == f"READY=1\n{status}"
    assert messages[1].startswith("RELOADING=1\nMONOTONIC_USEC=") and messages[1].split("=")[-1].isdigit()
    assert messages[2:] == [f"READY=1\n{status}", "STOPPING=1\nSTATUS=draining running requests (up to 5 s)"]
    assert messages[0] == got.messages[ready]


async def test_notifier_speaks_to_an_abstract_socket_and_unsets_the_environment() -> None:
    name = f"@llm-pool-test-{os.getpid()}"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(socket_address(name))
    environ = {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()), "HOME": "/x"}
    with sock, trio.fail_after(5):
        async with Notifier.from_environ(environ) as notifier:
            await notifier.ready("serving 0 model(s)")
            assert await sock.recv(4096) == b"READY=1\nSTATUS=serving 0 model(s)"
    assert environ == {"HOME": "/x"}  # the engine processes we start must not inherit them
    assert notifier.watchdog_s == 1.5


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "200000"}, 7) == 0.1
    assert watchdog_interval_s({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "7"}, 7) == 0.1
    assert watchdog_interval_s({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}, 7) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "soon"}, 7) is None
    assert watchdog_interval_s({}, 7) is None
    assert socket_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert socket_address("@abstract") == b"\0abstract"


async def test_without_notify_socket_every_call_is_a_no_op() -> None:
    async with Notifier.from_environ({"WATCHDOG_USEC": "200000"}) as notifier:
        assert not notifier.enabled and notifier.watchdog_s is None
        with trio.fail_after(5):
            await notifier.ready("serving")
            await notifier.keep_watchdog_alive()  # returns at once: no watchdog to keep


async def test_a_vanished_socket_is_logged_once_and_never_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with Notifier(socket_address(str(tmp_path / "gone"))) as notifier:
        with trio.fail_after(5):
            await notifier.notify("WATCHDOG=1")
            await notifier.notify("WATCHDOG=1")
    failures = [r for r in caplog.records if r.name == "llm_pool.sd_notify"]
    assert [r.getMessage() for r in failures] == ["systemd notification failed; carrying on without it"]
