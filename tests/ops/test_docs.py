"""``GET /docs`` (issue 19 §3): an interactive reference over our own ``/openapi.json``, with
Swagger UI vendored (a pinned release, its licence beside it, the files as published) and nothing
loaded from anywhere but this server."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import trio
from ops_kit import MODELS
from support.fake_backend import FakeBackendFactory
from support.server import start_pool
from trio.testing import MockClock

VENDOR = Path(__file__).parents[2] / "admin" / "static" / "vendor" / "swagger-ui"


async def test_docs_is_swagger_ui_over_our_openapi_document(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    page = await ops.get("/docs")
    assert page.status == 200 and page.headers["Content-Type"] == "text/html; charset=utf-8"
    html = page.text
    assert '<script src="docs/swagger-ui-bundle.js"></script>' in html
    assert '<link rel="stylesheet" href="docs/swagger-ui.css">' in html
    assert 'url: "openapi.json"' in html
    assert re.findall(r'(?:src|href)="([^"]+)"', html) == ["docs/swagger-ui.css", "docs/swagger-ui-bundle.js"]
    assert "//" not in re.sub(r"<!--.*?-->|^\s*//.*$", "", html, flags=re.S | re.M)  # no absolute URL: no CDN
    assert (await ops.get("/openapi.json")).status == 200  # what the page loads


async def test_the_vendored_files_are_served_as_published(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    for name, ctype in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css")):
        r = await ops.get(f"/docs/{name}")
        assert r.status == 200, name
        assert r.headers["Content-Type"].split(";")[0] == ctype
        assert r.headers["Cache-Control"] == "public, max-age=3600"
        assert r.raw == (VENDOR / name).read_bytes()
    assert (await ops.get("/docs/LICENSE")).status == 404  # only the two files are routes


def test_the_vendored_release_is_pinned_with_its_licence_and_checksums() -> None:
    lines = (VENDOR / "VERSION").read_text().splitlines()
    assert lines[0] == "swagger-ui-dist 5.35.0 (Apache-2.0; LICENSE and NOTICE beside this file)"
    assert lines[1] == "source: https://registry.npmjs.org/swagger-ui-dist/-/swagger-ui-dist-5.35.0.tgz"
    sums = dict(reversed(line.split("  ")) for line in lines[4:])
    assert set(sums) == {"swagger-ui-bundle.js", "swagger-ui-bundle.js.LICENSE.txt", "swagger-ui.css", "LICENSE", "NOTICE"}
    for name, digest in sums.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    assert (VENDOR / "LICENSE").read_text().split()[:3] == ["Apache", "License", "Version"]
