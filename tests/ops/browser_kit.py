"""A real llm-pool server in a background thread, and headless Chromium driven by Playwright.

The server is :func:`pool.server.serve` (hypercorn on 127.0.0.1, port 0) over the async fake
backend of ``tests/fakes/backend.py``, on trio's real clock in its own thread, so the browser can
be driven from the test's thread with Playwright's sync API.  Chromium is Debian's
(``/usr/bin/chromium``), never a browser Playwright downloads.
"""

from __future__ import annotations

import functools
import os
import queue
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from llm_pool.config import Settings
from llm_pool.pool.server import serve

CHROMIUM = os.environ.get("LLM_POOL_CHROMIUM", "/usr/bin/chromium")
#: Headless, and nothing that reaches outside this machine.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]


@contextmanager
def server_in_thread(settings: Settings, backend_factory: Any, *, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``settings`` in a background thread; yield the base URL; stop the server at exit."""
    started: queue.Queue[Any] = queue.Queue()
    handles: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            handles["token"] = trio.lowlevel.current_trio_token()
            handles["scope"] = nursery.cancel_scope
            url = await nursery.start(
                functools.partial(serve, settings, backend_factory=backend_factory, handle_signals=False)
            )
            started.put(url)

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            started.put(e)

    thread = threading.Thread(target=run, name="llm-pool test server", daemon=True)
    thread.start()
    got = started.get(timeout=start_timeout_s)
    if isinstance(got, BaseException):
        raise got
    try:
        yield got
    finally:
        trio.from_thread.run_sync(handles["scope"].cancel, trio_token=handles["token"])
        thread.join(timeout=30)
        assert not thread.is_alive(), "the test server did not stop"


@contextmanager
def chromium_page(width: int = 1280, height: int = 720) -> Iterator[Any]:
    """A page of a fresh headless Chromium (its own throw-away profile directory)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p, tempfile.TemporaryDirectory(prefix="llm-pool-chromium-") as profile:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": width, "height": height},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(15_000)
            yield page
        finally:
            context.close()
