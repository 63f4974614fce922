"""Bearer tokens (issue 3 "Security"): inference and admin tokens are separate, named by
environment variables; a non-loopback bind without an admin token refuses to start."""

from __future__ import annotations

import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.replies import assert_error
from support.server import Pool, start_pool
from support.settings import make_settings
from trio.testing import MockClock

from llm_pool.config import Settings
from llm_pool.pool.http import create_app
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.server import check_security, is_loopback

API, ADMIN = "api-secret-1", "admin-secret-2"
SERVICE = {"api_token_env": "LLMPOOL_TEST_API_TOKEN", "admin_token_env": "LLMPOOL_TEST_ADMIN_TOKEN"}
MESSAGE = "missing or wrong bearer token (Authorization: Bearer <token>)"


@pytest.fixture
async def guarded(nursery: trio.Nursery, control: FakeBackendFactory, monkeypatch: pytest.MonkeyPatch) -> Pool:
    monkeypatch.setenv("LLMPOOL_TEST_API_TOKEN", API)
    monkeypatch.setenv("LLMPOOL_TEST_ADMIN_TOKEN", ADMIN)
    return await start_pool(nursery, control, {"service": SERVICE})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_401(reply) -> None:  # type: ignore[no-untyped-def]
    err = assert_error(reply, 401, "unauthorized", MESSAGE, param=None, model=None)
    assert err["type"] == "authentication_error"
    assert reply.headers["WWW-Authenticate"] == "Bearer"


BAD_HEADERS = [
    {},
    {"Authorization": ""},
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {API}x"},
    {"Authorization": f"Bearer {API[:-1]}"},
    {"Authorization": f"Basic {API}"},
    {"Authorization": API},
]


@pytest.mark.parametrize("headers", BAD_HEADERS)
async def test_inference_routes_need_the_api_token(autojump_clock: MockClock, guarded: Pool, control: FakeBackendFactory, headers: dict[str, str]) -> None:
    assert_401(await guarded.respond({"model": "m", "input": "x"}, headers=headers))
    assert_401(await guarded.get("/v1/models", headers=headers))
    assert not control.seen


async def test_inference_with_the_api_token(autojump_clock: MockClock, guarded: Pool) -> None:
    r = await guarded.respond({"model": "m", "input": "x"}, headers=bearer(API))
    assert r.status == 200
    assert (await guarded.get("/v1/models", headers=bearer(API))).json["models"] == ["m"]
    # the scheme is case-insensitive (RFC 9110); the token is not
    assert (await guarded.get("/v1/models", headers={"Authorization": f"bearer {API}"})).status == 200
    assert_401(await guarded.get("/v1/models", headers=bearer(API.upper())))


async def test_tokens_are_separate(autojump_clock: MockClock, guarded: Pool) -> None:
    assert_401(await guarded.respond({"model": "m", "input": "x"}, headers=bearer(ADMIN)))
    assert_401(await guarded.get("/v1/admin/models", headers=bearer(API)))
    assert_401(await guarded.post("/v1/admin/models/m/unload", headers=bearer(API)))
    assert (await guarded.get("/v1/admin/models", headers=bearer(ADMIN))).status == 200
    assert guarded.manager.entries["m"].state == "loaded"  # the refused unload did nothing


@pytest.mark.parametrize("headers", BAD_HEADERS)
async def test_admin_routes_need_the_admin_token(autojump_clock: MockClock, guarded: Pool, headers: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/v1/admin/models"),
        ("GET", "/v1/admin/models/m"),
        ("POST", "/v1/admin/models/m/load"),
        ("POST", "/v1/admin/models/m/unload"),
        ("POST", "/v1/admin/models/m/replicas"),
        ("POST", "/v1/admin/settings/reload"),
        ("GET", "/v1/admin/gpu-memory"),
        ("GET", "/v1/admin/nope"),  # no route discovery without the token either
    ]:
        assert_401(await guarded.request(method, path, headers=headers))
    assert guarded.manager.entries["m"].state == "loaded"


async def test_only_an_admin_token_leaves_inference_open(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPOOL_TEST_ADMIN_TOKEN", ADMIN)
    pool = await start_pool(nursery, control, {"service": {"admin_token_env": "LLMPOOL_TEST_ADMIN_TOKEN"}})
    assert (await pool.respond({"model": "m", "input": "x"})).status == 200
    assert_401(await pool.get("/v1/admin/models"))


async def test_only_an_api_token_leaves_admin_open_on_loopback(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMPOOL_TEST_API_TOKEN", API)
    pool = await start_pool(nursery, control, {"service": {"api_token_env": "LLMPOOL_TEST_API_TOKEN"}})
    assert_401(await pool.respond({"model": "m", "input": "x"}))
    assert (await pool.get("/v1/admin/models")).status == 200


async def test_unknown_routes_outside_v1_need_no_token(autojump_clock: MockClock, guarded: Pool) -> None:
    # "/" is the status page now; any path without a route will do
    assert_error(await guarded.get("/no-such-page"), 404, "not_found", "no route for GET /no-such-page")


def test_a_named_but_unset_token_variable_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMPOOL_TEST_ADMIN_TOKEN", raising=False)
    settings = make_settings(raw={"service": {"admin_token_env": "LLMPOOL_TEST_ADMIN_TOKEN"}})
    with pytest.raises(RuntimeError) as info:
        create_app(PoolManager(settings), settings)
    assert str(info.value) == "environment variable LLMPOOL_TEST_ADMIN_TOKEN (named by the settings) is empty or unset"


def service(**kw: object) -> Settings:
    return make_settings(raw={"service": kw})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org", "[::]"])
def test_non_loopback_bind_without_admin_token_refuses_to_start(host: str) -> None:
    with pytest.raises(SystemExit) as info:
        check_security(service(host=host))
    assert str(info.value.code) == (
        f"refusing to bind {host}: the admin API would be reachable without a token; "
        "set service.admin_token_env to the name of an environment variable holding one (or bind 127.0.0.1)"
    )
    check_security(service(host=host, admin_token_env="LLMPOOL_TEST_ADMIN_TOKEN"))  # fine with a token


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_binds_need_no_admin_token(host: str) -> None:
    assert is_loopback(host)
    check_security(service(host=host))
