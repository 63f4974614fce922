"""Regenerate ``docs/status-page.png``: the status page of a server with two models, one busy,
its details open (charts with a minute of traffic), the log tail and a playground answer.

    .venv/bin/python docs/status_page_screenshot.py

Runs a real server (``pool.server.serve`` on 127.0.0.1) over the tests' fake backend, so it
needs no model files, only what the browser test needs: Debian's ``chromium`` and the
``playwright`` package.  Not run by the test suite.
"""

from __future__ import annotations

import logging
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
    logging.getLogger("llm_pool").setLevel(logging.INFO)  # inference lines for the log tail
    factory = FakeBackendFactory(token_delay=0.1)  # slow enough to be seen running and queued
    stop = threading.Event()
    with server_in_thread(settings, factory) as url, chromium_page(width=1180, height=900) as page:

        def ask(i: int) -> None:
            while not stop.is_set():  # two run (one per replica), the others wait in the queue
                body = {"model": "smollm2-135m", "input": f"request {i}", "decoding": {"max_tokens": 10 + 5 * i}}
                try:
                    httpx.post(url + "/v1/responses", json=body, timeout=60)
                except httpx.HTTPError:
                    pass  # the server stops under it at the end

        for i in range(5):
            threading.Thread(target=ask, args=(i,), daemon=True).start()
        page.goto(url + "/")
        page.locator('tr[data-model="smollm2-135m"] td.running').filter(has_text="2").wait_for()
        page.get_by_role("button", name="details of smollm2-135m").click()
        # four samples of the server's timeline (5 s apart) so the charts have lines
        page.wait_for_function("Number(document.getElementById('chart-tokens').dataset.points) >= 5", timeout=60_000)
        page.locator("#pg-model").select_option("smollm2-135m")
        page.locator("#pg-input").fill("Say hello")
        page.locator("#pg-max-tokens").fill("12")
        page.locator("#pg-send").click()
        page.locator("#pg-metrics[data-status]").wait_for()
        page.locator('#log-lines li[data-event="inference"]').first.wait_for()
        page.locator('tr[data-model="smollm2-135m"] td.queued').filter(has_text="3").wait_for()
        page.evaluate("document.getElementById('detail-title').blur()")
        page.screenshot(path=str(OUT), full_page=True)
        stop.set()
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
