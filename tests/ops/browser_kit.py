"""Headless Chromium driven by Playwright's sync API, for the status-page test (its server runs
in a thread of its own: ``support.server.server_in_thread``).  Chromium is Debian's
(``/usr/bin/chromium``), never a browser Playwright downloads.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
def chromium_page(width: int = 1280, height: int = 720) -> Iterator[Any]:
    """A page of a fresh headless Chromium (its own throw-away profile directory)."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=15_000)  # its assertions' own bound (5 s unless set), as the page's

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
