"""Regenerate ``docs/status-page.png``: the status page of a server with two models, one busy.

    .venv/bin/python docs/status_page_screenshot.py

Runs a real server (``pool.server.serve`` on 127.0.0.1) over the tests' fake backend, so it
needs no model files, only what the browser test needs: Debian's ``chromium`` and the
``playwright`` package.  Not run by the test suite.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "ops")]

from browser_kit import chromium_page  # noqa: E402
from support.fake_backend import FakeBackendFactory  # noqa: E402
from support.server import server_in_thread  # noqa: E402
from support.settings import make_settings  # noqa: E402

OUT = ROOT / "docs" / "status-page.png"


def main() -> None:
    settings = make_settings(
        {
            "smollm2-135m": {"replicas": 2, "replica_max": 4},
            "qwen3-0.6b": {"backend": "ct2", "enabled": False, "replica_max": 2},
        },
        raw={"service": {"host": "127.0.0.1", "port": 0}},
    )
    factory = FakeBackendFactory(token_delay=0.5)  # slow enough to be seen running and queued
    with server_in_thread(settings, factory) as url, chromium_page(width=1180, height=330) as page:

        def ask(i: int) -> None:
            body = {"model": "smollm2-135m", "input": f"request {i}", "decoding": {"max_tokens": 200}}
            try:
                httpx.post(url + "/v1/responses", json=body, timeout=60)
            except httpx.HTTPError:
                pass  # the server stops under it at the end

        for i in range(5):  # two run (one per replica), three wait in the queue
            threading.Thread(target=ask, args=(i,), daemon=True).start()
        page.goto(url + "/")
        page.locator('tr[data-model="smollm2-135m"] td.running').filter(has_text="2").wait_for()
        page.locator('tr[data-model="smollm2-135m"] td.queued').filter(has_text="3").wait_for()
        page.screenshot(path=str(OUT), full_page=True)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
