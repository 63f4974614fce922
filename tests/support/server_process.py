"""A real ``llm-pool serve`` subprocess, read through its JSON log lines (stderr).

Such a test runs on the real clock: it waits on the server's own log lines
(:meth:`ServerLog.wait_for`), never on a sleep, and bounds itself with ``trio.fail_after``.
"""

from __future__ import annotations

import json
from typing import Any

import trio


class ServerLog:
    """The subprocess's JSON log lines, and a way to wait for one."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.ended = False
        self._changed = trio.Event()

    async def read(self, proc: trio.Process) -> None:
        assert proc.stderr is not None
        buffer = b""
        async for chunk in proc.stderr:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    self.records.append(json.loads(line))
                except ValueError:  # a library printing: not one of our lines
                    self.records.append({"level": "raw", "event": line.decode(errors="replace")})
            self._changed.set()
            self._changed = trio.Event()
        self.ended = True
        self._changed.set()

    async def wait_for(self, event: str, after: int = 0) -> dict[str, Any]:
        """The first record with ``event`` from index ``after`` on, once it is logged."""
        while True:
            for record in self.records[after:]:
                if record.get("event") == event:
                    return record
            if self.ended:
                raise AssertionError(f"the server's log ended before {event!r}: {self.records[after:]}")
            changed = self._changed
            await changed.wait()
