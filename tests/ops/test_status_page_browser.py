"""The status page in headless Chromium against a real server: Unload (confirmed), Load and
Resize buttons change the model's state, with the admin token the user types; charts draw from
live traffic; the model's details load it with overrides from its form; the log tail shows a
request made during the test; the playground streams an answer.

Needs Debian's ``chromium`` (``/usr/bin/chromium``) and the ``playwright`` package (its wheel
brings the driver; no browser is downloaded).  Real clock, real sockets on 127.0.0.1.
"""

from __future__ import annotations

import logging
import os

import httpx
import pytest
from browser_kit import CHROMIUM, chromium_page
from support.fake_backend import FakeBackendFactory, expected_text
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
        expect(page.locator("#unload-dialog")).to_be_visible()  # it asks first
        page.locator("#unload-confirm").click()
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


def test_charts_details_log_tail_and_playground(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from playwright.sync_api import expect

    caplog.set_level(logging.INFO, logger="llm_pool")  # inference lines, as log_level = "info" writes them
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    settings = make_settings(
        {"alpha": {"replica_max": 2}, "beta": {}},
        raw={"service": {"host": "127.0.0.1", "port": 0, "admin_token_env": TOKEN_ENV}},
    )
    with (
        server_in_thread(settings, FakeBackendFactory(token_delay=0.01)) as url,
        chromium_page(width=900, height=900) as page,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10) as admin,
    ):
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.locator("#token").fill(TOKEN)
        page.locator("#token").press("Tab")
        alpha = page.locator('tr[data-model="alpha"]')
        expect(alpha.locator(".state")).to_have_text("loaded")

        # live traffic, one request with an id of ours
        for i in range(3):
            reply = admin.post("/v1/responses", json={"model": "alpha", "input": f"one two three {i}"})
            assert reply.status_code == 200, reply.text
        traced = admin.post("/v1/responses", json={"model": "alpha", "input": "traced"}, headers={"X-Request-Id": "browser-tail-1"})
        assert traced.status_code == 200

        # the details: charts drawn from the server's samples
        page.get_by_role("button", name="details of alpha").click()
        expect(page.locator("#detail-title")).to_have_text("alpha")
        expect(page.locator("#detail-title")).to_be_focused()
        for chart in ("tokens", "requests", "ttft", "errors"):
            expect(page.locator(f"#chart-{chart} canvas")).to_have_count(1)
        expect(page.locator("#chart-tokens")).not_to_have_attribute("data-max", "0")
        tokens = page.locator("#chart-tokens").get_attribute("data-max")
        assert tokens is not None and float(tokens) > 0
        expect(page.locator("#chart-errors")).to_have_attribute("data-series", "ended")
        expect(page.locator("#config")).to_contain_text('"load_override": {}')
        expect(page.locator("#replicas tbody tr")).to_have_count(1)
        expect(page.locator("#model-memory .bar")).to_have_count(2)

        # the log tail shows that request's inference line
        line = page.locator('#log-lines li[data-request-id="browser-tail-1"]')
        expect(line).to_contain_text("status 200")
        expect(line).to_contain_text("alpha")

        # an action's error shows in its row
        alpha.get_by_label("replicas for alpha").fill("5")
        alpha.get_by_role("button", name="Resize", exact=True).click()
        expect(alpha.locator(".action-error")).to_contain_text("replica_max")

        # unload asks; Cancel keeps it loaded, a confirmed unload with a drain timeout unloads it
        alpha.get_by_role("button", name="Unload", exact=True).click()
        expect(page.locator("#unload-dialog")).to_be_visible()
        page.locator("#unload-cancel").click()
        expect(page.locator("#unload-dialog")).to_be_hidden()
        assert admin.get("/v1/admin/models/alpha").json()["runtime_state"] == "loaded"
        alpha.get_by_role("button", name="Unload", exact=True).click()
        page.locator("#unload-drain").fill("5")
        page.keyboard.press("Tab")
        page.locator("#unload-confirm").click()
        expect(alpha.locator(".state")).to_have_text("unloaded")

        # the load form: a preset fills its fields, a bad value is refused inline, a good one loads
        page.get_by_role("button", name="q8_0/q8_0").click()
        expect(page.locator("#load-gguf_type_k")).to_have_value("q8_0")
        expect(page.locator("#load-gguf_type_v")).to_have_value("q8_0")
        page.locator("#load-replicas").fill("3")
        page.locator("#load-submit").click()
        expect(page.locator("#load-error")).to_contain_text("replica_max")
        page.locator("#load-replicas").fill("2")
        page.locator("#load-gguf_n_ctx").fill("1024")
        page.locator("#load-submit").click()
        expect(alpha.locator(".state")).to_have_text("loaded")
        expect(page.locator("#load-error")).to_have_text("")
        row = admin.get("/v1/admin/models/alpha").json()
        assert row["load_override"] == {"gguf_n_ctx": 1024, "gguf_type_k": "q8_0", "gguf_type_v": "q8_0"}
        assert row["loaded_replicas"] == 2
        expect(page.locator("#config")).to_contain_text('"gguf_n_ctx": 1024')

        # the playground streams an answer with its metrics
        page.locator("#pg-model").select_option("beta")
        page.locator("#pg-input").fill("hello from the playground")
        page.locator("#pg-max-tokens").fill("3")
        page.locator("#pg-send").click()
        expect(page.locator("#pg-output")).to_have_text(expected_text("hello from the playground", 3))
        expect(page.locator("#pg-metrics")).to_contain_text("3 output tokens")
        expect(page.locator("#pg-metrics")).to_have_attribute("data-status", "incomplete")
        expect(page.locator("#pg-error")).to_have_text("")
        assert errors == []


def test_narrow_screen_keyboard_and_both_shapes_of_load_hints() -> None:
    """On a phone-wide screen nothing overflows sideways; details and the unload dialog work
    from the keyboard; the load form reads the constraint kinds and recommendation shapes old
    and new (``int``/``integer``, ``integer_or_null``; ``<name>_presets`` / ``pair_presets``)."""
    from playwright.sync_api import expect

    settings = make_settings({"alpha": {}}, raw={"service": {"host": "127.0.0.1", "port": 0}})
    with server_in_thread(settings, FakeBackendFactory()) as url, chromium_page(width=360, height=740) as page:
        page.goto(url + "/")
        alpha = page.locator('tr[data-model="alpha"]')
        expect(alpha.locator(".state")).to_have_text("loaded")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

        alpha.get_by_role("button", name="details of alpha").focus()
        page.keyboard.press("Enter")
        expect(page.locator("#detail-title")).to_be_focused()
        expect(page.locator("#chart-tokens canvas")).to_have_count(1)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

        alpha.get_by_role("button", name="Unload", exact=True).focus()
        page.keyboard.press("Enter")
        expect(page.locator("#unload-dialog")).to_be_visible()
        expect(page.locator("#unload-cancel")).to_be_focused()  # the safe choice first
        page.keyboard.press("Escape")
        expect(page.locator("#unload-dialog")).to_be_hidden()
        page.locator('tr[data-model="alpha"]').get_by_role("button", name="Unload", exact=True).click()
        page.locator("#unload-drain").fill("0")
        page.keyboard.press("Enter")  # Enter in a field confirms
        expect(alpha.locator(".state")).to_have_text("unloaded")

        kinds = page.evaluate(
            """() => {
              const f = fieldFor("n", {kind: "integer_or_null", default: null, minimum: 1, maximum: 8});
              const g = fieldFor("m", {kind: "integer", default: 4, minimum: 1});
              const h = fieldFor("s", {kind: "string_or_null", default: null});
              return [f.type, f.min, f.max, valueOf(f), g.type, valueOf(g), valueOf(h)];
            }"""
        )
        assert kinds == ["number", "1", "8", None, "number", 4, None]
        presets = page.evaluate(
            """() => [
              presetsOf({kind: "pair_presets", fields: ["k", "v"], recommended_pairs: [{label: "8/8", k: 8, v: 8}], notes: "n"}),
              presetsOf({kv_cache_presets: [{label: "fp16", k: null, v: null}]}),
              presetsOf({gguf_cache_type_pairs: {kind: "pair_presets", fields: ["k", "v"],
                                                 recommended_pairs: [{label: "q8/q8", k: "q8_0", v: "q8_0"}], notes: "n"}}),
            ].map(list => list.map(p => p.label))"""
        )
        assert presets == [["8/8"], ["fp16"], ["q8/q8"]]
        notes = page.evaluate("""() => notesOf({gguf_cache_type_pairs: {kind: "pair_presets", recommended_pairs: [], notes: "n"}})""")
        assert notes == ["n"]
