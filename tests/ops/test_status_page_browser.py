"""The status page in headless Chromium against a real server: Unload, Load and Resize buttons
change the model's state, with the admin token the user types.

Needs Debian's ``chromium`` (``/usr/bin/chromium``) and the ``playwright`` package (its wheel
brings the driver; no browser is downloaded).  Real clock, real sockets on 127.0.0.1.
"""

from __future__ import annotations

import os

import httpx
import pytest
from browser_kit import CHROMIUM, chromium_page
from support.fake_backend import FakeBackendFactory
from support.server import server_in_thread
from support.settings import make_settings

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed (pip install playwright)")
pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"
)

TOKEN_ENV = "LLM_POOL_BROWSER_TEST_ADMIN_TOKEN"
TOKEN = "browser-test-token"


def test_unload_load_and_resize_from_the_status_page(monkeypatch: pytest.MonkeyPatch) -> None:
    from playwright.sync_api import expect

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    settings = make_settings(
        {"alpha": {"replica_max": 2}, "beta": {}},
        raw={"service": {"host": "127.0.0.1", "port": 0, "admin_token_env": TOKEN_ENV}},
    )
    with (
        server_in_thread(settings, FakeBackendFactory(token_delay=0.01)) as url,
        chromium_page() as page,
        # closed on every path: a client leaked by a failure here warned in the next test
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as admin,
    ):

        def state_of(model: str) -> str:
            return str(admin.get(f"/v1/admin/models/{model}").json()["runtime_state"])

        page.goto(url + "/")
        expect(page.locator("#message")).to_contain_text("type the admin token above")  # 401 without it
        expect(page.locator("#ready")).to_have_text("Ready.")

        page.locator("#token").fill(TOKEN)
        page.locator("#token").press("Tab")  # "change" fires: the page refreshes with the token
        alpha = page.locator('tr[data-model="alpha"]')
        beta = page.locator('tr[data-model="beta"]')
        expect(alpha.locator(".state")).to_have_text("loaded")
        expect(beta.locator(".state")).to_have_text("loaded")
        expect(page.locator("#message")).to_have_text("")

        alpha.get_by_role("button", name="Unload", exact=True).click()
        expect(alpha.locator(".state")).to_have_text("unloaded")
        expect(beta.locator(".state")).to_have_text("loaded")
        assert state_of("alpha") == "unloaded"
        expect(alpha.get_by_role("button", name="Unload", exact=True)).to_be_disabled()
        # unloaded by an admin: nobody wants it serving, so the server stays ready
        expect(page.locator("#ready")).to_have_text("Ready.")

        alpha.get_by_role("button", name="Load", exact=True).click()
        expect(alpha.locator(".state")).to_have_text("loaded")
        assert state_of("alpha") == "loaded"
        expect(page.locator("#ready")).to_have_text("Ready.")

        alpha.get_by_label("replicas for alpha").fill("2")
        page.wait_for_timeout(2500)  # a refresh re-renders the row: the typed count must survive it
        expect(alpha.get_by_label("replicas for alpha")).to_have_value("2")
        alpha.get_by_role("button", name="Resize", exact=True).click()
        expect(alpha.locator("td.replicas")).to_have_text("2 / 2")
        assert admin.get("/v1/admin/models/alpha").json()["loaded_replicas"] == 2
