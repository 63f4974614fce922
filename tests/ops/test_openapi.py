"""``GET /openapi.json``: every route of the app is in it and nothing else; it is valid OpenAPI
3.1; and the hand-described admin shapes match what the admin routes really return."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
import trio
from openapi_spec_validator import validate
from ops_kit import MODELS
from support.fake_backend import FakeBackendFactory
from support.server import start_pool
from trio.testing import MockClock

from llm_pool.config.validation import Invalid, read_validation_error
from llm_pool.pool.api import ModelsList, ResponseBody
from llm_pool.pool.openapi import (
    AdminModel,
    AdminModels,
    GpuMemoryReport,
    ReloadResult,
    build_openapi,
    openapi_path,
)
from llm_pool.pool.ops import Live, ModelReadiness, Readiness

#: Methods every rule gets from Werkzeug/Quart by itself; not documented per route.
AUTOMATIC = {"HEAD", "OPTIONS"}


def routes_of(app: object) -> set[tuple[str, str]]:
    out = set()
    for rule in app.url_map.iter_rules():  # type: ignore[attr-defined]
        for method in rule.methods - AUTOMATIC:
            out.add((method.lower(), openapi_path(rule.rule)))
    return out


def documented(doc: dict) -> set[tuple[str, str]]:
    return {(method, path) for path, item in doc["paths"].items() for method in item}


def test_werkzeug_rules_become_openapi_paths() -> None:
    assert openapi_path("/v1/admin/models/<path:name>/load") == "/v1/admin/models/{name}/load"
    assert openapi_path("/health/ready/<path:model>") == "/health/ready/{model}"
    assert openapi_path("/x/<id>") == "/x/{id}"


async def test_every_route_is_documented_and_every_operation_has_a_route(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    ops = await start_pool(nursery, control, models=MODELS)
    reply = await ops.get("/openapi.json")
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
    doc = reply.json
    routes = routes_of(ops.app)
    missing = routes - documented(doc)
    stale = documented(doc) - routes
    assert not missing, f"routes missing from pool/openapi.py OPERATIONS: {sorted(missing)}"
    assert not stale, f"documented operations without a route: {sorted(stale)}"
    # no rule is left out: the app serves no static folder (create_app passes static_folder=None)
    assert "static" not in {r.endpoint for r in ops.app.url_map.iter_rules()}
    assert doc == build_openapi()


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = build_openapi()
    assert doc["openapi"] == "3.1.0"
    validate(doc)
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    # schemas come from the Structs the routes use
    schemas = doc["components"]["schemas"]
    for name in ("ResponsesRequest", "ResponseBody", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk",
                 "ModelsList", "ErrorBody", "LoadRequest", "UnloadRequest", "ResizeRequest", "AdminModel",
                 "Readiness", "ModelReadiness", "Live",
                 # a model's definition: one schema per backend kind, told apart by "backend"
                 "GGUFModel", "CT2Model", "ExLlamaV3Model", "LlamaServerModel", "RemoteModel"):
        assert name in schemas, name
    assert schemas["AdminModel"]["properties"]["definition"]["discriminator"]["propertyName"] == "backend"
    assert schemas["ResponsesRequest"]["additionalProperties"] is False
    responses = doc["paths"]["/v1/responses"]["post"]
    assert responses["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ResponsesRequest"}
    assert set(responses["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert responses["responses"]["429"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert responses["security"] == [{"apiToken": []}, {}]
    assert doc["paths"]["/v1/admin/models"]["get"]["security"] == [{"adminToken": []}, {}]
    assert "security" not in doc["paths"]["/metrics"]["get"]


async def test_documented_shapes_match_real_responses(
    autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, tmp_path: Path
) -> None:
    """The admin rows are dicts; their documented Structs forbid unknown fields, so a key added
    to a row without documenting it fails here."""
    config = tmp_path / "pool.toml"
    config.write_text('[engine]\nbackend = "gguf"\n[engine.models.m]\nmodel_path = "m.gguf"\nreplica_max = 2\n'
                      '[engine.models.spare]\nmodel_path = "spare.gguf"\nenabled = false\n')
    from llm_pool.config import load_settings

    settings = load_settings(config)
    ops = await start_pool(nursery, control, settings=settings)
    ops.manager.config_path = str(config)

    def check(kind: type, body: object) -> None:
        msgspec.convert(body, kind)

    check(AdminModels, (await ops.get("/v1/admin/models")).json)
    check(AdminModel, (await ops.get("/v1/admin/models/m")).json)
    check(AdminModel, (await ops.post("/v1/admin/models/m/replicas", {"replicas": 2})).json)
    check(AdminModel, (await ops.post("/v1/admin/models/spare/load", {})).json)
    check(AdminModel, (await ops.post("/v1/admin/models/spare/unload", {})).json)
    check(GpuMemoryReport, (await ops.get("/v1/admin/gpu-memory")).json)
    check(ReloadResult, (await ops.post("/v1/admin/settings/reload")).json)
    check(ModelsList, (await ops.get("/v1/models")).json)
    check(ResponseBody, (await ops.ask("a b c")).json)
    check(Live, (await ops.get("/health/live")).json)
    check(Readiness, (await ops.get("/health/ready")).json)
    check(ModelReadiness, (await ops.get("/health/ready/m")).json)
    with pytest.raises(msgspec.ValidationError) as info:
        check(AdminModel, {**(await ops.get("/v1/admin/models/m")).json, "surprise": 1})
    assert read_validation_error(info.value) == Invalid("unknown_field", "$.surprise")
