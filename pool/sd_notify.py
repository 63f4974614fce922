"""systemd's service notification protocol (``sd_notify``), spoken directly: no libsystemd, no
new dependency.

Under a ``Type=notify`` unit systemd names a unix datagram socket in ``$NOTIFY_SOCKET`` (a path,
or an abstract-namespace name written with a leading ``@``); the service sends it newline
separated ``KEY=VALUE`` fields:

=================  ========================================================================
``READY=1``        start-up is finished: ``systemctl start`` returns, units ordered after ours
                   start.  We send it once the enabled models have settled (loaded or failed).
``STOPPING=1``     a graceful stop began (the drain), so systemd shows ``deactivating``.
``RELOADING=1``    a settings reload (SIGHUP) began; ``READY=1`` again when it is done.
``WATCHDOG=1``     the event loop is alive; with ``WatchdogSec=`` systemd kills and restarts
                   a service that stops sending it (``$WATCHDOG_USEC`` says how often).
``STATUS=...``     one line for ``systemctl status``.
=================  ========================================================================

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op, so the server never has to ask.
A send that fails (systemd went away, the socket was removed) is logged once and otherwise
ignored: notification is a courtesy to the supervisor, never a reason to stop serving.

This module imports nothing of ours; the server (the entry layer) decides *when* to notify.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

import trio

log = logging.getLogger("llm_pool.sd_notify")

#: The variables systemd sets for us; read once and removed from our environment, so that the
#: engine processes we start (llama-server, vLLM) never take themselves for the service.
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(name: str) -> bytes:
    """The ``sendto`` address of ``$NOTIFY_SOCKET``: ``@name`` is Linux's abstract namespace
    (a leading NUL byte), anything else a filesystem path."""
    raw = os.fsencode(name)
    return b"\0" + raw[1:] if raw.startswith(b"@") else raw


def watchdog_interval_s(environ: Mapping[str, str], pid: int) -> float | None:
    """How often to send ``WATCHDOG=1``: half of ``$WATCHDOG_USEC`` (systemd's own advice, so
    one late ping is never fatal), or None when no watchdog is asked of *this* process
    (unset, not a positive integer, or ``$WATCHDOG_PID`` names another process)."""
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET``; every method is a no-op without one.

    Use :meth:`from_environ`; close with :meth:`aclose` (or ``async with``).
    """

    def __init__(self, address: bytes | None, *, watchdog_s: float | None = None) -> None:
        self.address = address
        #: Seconds between ``WATCHDOG=1`` pings (:meth:`keep_watchdog_alive`); None: no watchdog.
        self.watchdog_s = watchdog_s if address is not None else None
        self._socket: trio.socket.SocketType | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """A notifier for what systemd set in ``environ`` (default ``os.environ``), whose
        :data:`ENV_VARS` it then removes (as ``sd_notify(unset_environment=1)`` would)."""
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET") or None
        watchdog_s = watchdog_interval_s(env, os.getpid())
        for var in ENV_VARS:
            env.pop(var, None)
        return cls(None if name is None else socket_address(name), watchdog_s=watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    async def notify(self, *fields: str) -> None:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram.

        Cancellation: a datagram is sent whole or not at all; a cancelled call sent nothing.
        """
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            await self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            if not self._failed:  # once: a watchdog ping every few seconds must not flood the log
                self._failed = True
                log.warning(
                    "systemd notification failed; carrying on without it",
                    extra={"fields": {"socket": os.fsdecode(self.address.replace(b"\0", b"@", 1)), "error": str(e)}},
                )

    async def ready(self, status: str) -> None:
        await self.notify("READY=1", f"STATUS={status}")

    async def stopping(self, status: str) -> None:
        await self.notify("STOPPING=1", f"STATUS={status}")

    async def reloading(self) -> None:
        """``RELOADING=1`` with the ``MONOTONIC_USEC`` that systemd 253+ requires beside it."""
        await self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    async def keep_watchdog_alive(self) -> None:
        """Send ``WATCHDOG=1`` every :attr:`watchdog_s` until cancelled (returns at once when no
        watchdog is asked for).

        It runs as an ordinary task of the main nursery on purpose: if anything blocks the event
        loop (a synchronous call in async code, a lock held across a C call), the pings stop and
        systemd restarts a server that could no longer answer anyone.
        """
        if self.watchdog_s is None:
            return
        while True:
            await self.notify("WATCHDOG=1")
            await trio.sleep(self.watchdog_s)

    async def aclose(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def __aenter__(self) -> Notifier:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
