"""The OpenAPI 3.1 document of the whole HTTP API (``GET /openapi.json``).

Schemas are generated from the same msgspec Structs the routes decode and encode
(``msgspec.json.schema_components``), so a field added to a Struct shows up here by itself.  The
operations are listed by hand in :data:`OPERATIONS`, one per route (method and path) of the app;
``tests/ops/test_openapi.py`` walks ``app.url_map`` and fails when a route is missing here or an
operation has no route, so the document stays in sync as routes are added.

The admin routes build their answers as the Structs of :mod:`llm_pool.admin.rows`, so the
documented shape is the served shape.

This module sits at the top of the web layer (it documents every route module); it does no I/O
but serve the document, built once on the first ``GET /openapi.json``, and its interactive
reference at ``GET /docs``: Swagger UI, vendored (``admin/static/vendor/swagger-ui``: a pinned
release with its licence, committed; no CDN, nothing built at install).
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Literal

import msgspec
from quart import Response

from llm_pool.admin.routes import LoadRequest, ResizeRequest, TuneRequest, UnloadRequest
from llm_pool.admin.rows import (
    AdminModel,
    AdminModels,
    GpuMemoryReport,
    LogLine,
    ReloadResult,
    TimelineReport,
    TuneStatus,
)
from llm_pool.pool.api import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ErrorBody,
    ModelCard,
    ModelsList,
    ResponseBody,
    ResponsesRequest,
)
from llm_pool.pool.ops import STATUS_ASSETS, Live, ModelReadiness, Readiness

_RULE_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def openapi_path(werkzeug_rule: str) -> str:
    """``/v1/admin/models/<path:name>/load`` → ``/v1/admin/models/{name}/load``."""
    return _RULE_PARAM.sub(r"{\1}", werkzeug_rule)


# --------------------------------------------------------------------------- operations
JSON = "application/json"
SSE = "text/event-stream"


@dataclass(frozen=True)
class Body:
    """A request or response body: a Struct (or a JSON Schema dict) per content type."""

    description: str
    content: dict[str, Any] = field(default_factory=dict)
    #: For SSE bodies: the Struct each ``data:`` line carries (``x-sse-data``).
    sse_data: Any = None


@dataclass(frozen=True)
class Param:
    name: str
    where: Literal["path", "query"]
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    tag: str
    responses: dict[int, Body]
    request: Any = None
    #: False where an empty body means "all defaults" (admin load and unload).
    body_required: bool = True
    params: tuple[Param, ...] = ()
    #: Which bearer token guards it (only when the settings name one): "api", "admin" or None.
    auth: Literal["api", "admin"] | None = None
    description: str = ""


NAME = Param("name", "path", {"type": "string"}, "A configured model's name (it may contain slashes).")

#: The ``event:`` names of a ``/v1/responses`` stream, in the order they come (``error`` ends a
#: stream that failed after it began); ``pool.http`` writes exactly these.
RESPONSES_STREAM_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.metrics",
    "response.completed",
    "response.incomplete",
    "error",
]


def sse_event_schema(description: str, event: dict[str, Any] | None = None, *, json_data: bool = True) -> dict[str, Any]:
    """The schema of a ``text/event-stream`` body: one Server-Sent Event, as an object of its
    fields (``event``, ``data``; SSE's default event type is ``message``).

    OpenAPI 3.1 says nothing about a stream's items (3.2 adds ``itemSchema``); schemathesis
    reads the ``schema`` of an event stream as the schema of each event and validates every
    event of a streamed answer against it.  The former ``{"type": "string"}`` said nothing
    useful and failed that check for every event (found by R4's schemathesis run)."""
    return {
        "type": "object",
        "description": description,
        "required": ["data"] + (["event"] if event is not None else []),
        "properties": {
            **({"event": event} if event is not None else {}),
            "data": {"type": "string", **({"contentMediaType": JSON} if json_data else {})},
        },
    }


def _errors(*statuses: int) -> dict[int, Body]:
    why = {
        400: "Invalid request (the message names the field; `param` is its JSON path).",
        401: "Missing or wrong bearer token.",
        403: "A remote model without `allow_remote: true`.",
        404: "Unknown model, or no such route.",
        409: "The model's state does not allow it (not loaded, loading, unloading, failed), or a conflict.",
        413: "Body larger than `service.max_body_bytes`.",
        429: "The model's queue is full (`Retry-After`), or a remote rate limit or budget.",
        500: "The runtime refused to load the model.",
        502: "The backend or the remote API failed.",
        503: "Queue timeout, cancelled (unload, shutdown), or shutting down.",
        504: "The remote API timed out.",
    }
    return {s: Body(why[s], {JSON: ErrorBody}) for s in statuses}


def operations() -> list[Operation]:
    """Every documented route, in the document's order."""
    inference_errors = _errors(400, 401, 403, 404, 409, 413, 429, 502, 503, 504)
    admin_row = {200: Body("The model's row after the call.", {JSON: AdminModel})}
    return [
        Operation(
            "post", "/v1/responses", "Generate a response (JSON, or SSE with stream: true)", "inference",
            request=ResponsesRequest,
            responses={
                200: Body(
                    "The response; with `stream: true` Server-Sent Events `event: <type>` / `data: <json>`: "
                    "`response.created`, `response.in_progress`, `response.output_item.added`, "
                    "`response.content_part.added`, `response.output_text.delta` per chunk, "
                    "`response.output_text.done`, `response.content_part.done`, `response.output_item.done`, "
                    "`response.metrics`, `response.completed` (with `output_text`; `response.incomplete` instead when "
                    "`max_tokens` cut the answer); `error` on a failure "
                    "after the stream began.",
                    {
                        JSON: ResponseBody,
                        SSE: sse_event_schema(
                            "One event: `event: <type>`, `data: <JSON object whose type is the event's>`.",
                            {"type": "string", "enum": RESPONSES_STREAM_EVENTS},
                        ),
                    },
                ),
                **inference_errors,
            },
            auth="api",
        ),
        Operation(
            "post", "/v1/chat/completions", "OpenAI Chat Completions (JSON, or SSE with stream: true)", "inference",
            request=ChatCompletionRequest,
            responses={
                200: Body(
                    "A `chat.completion`; with `stream: true` Server-Sent Events `data: <chat.completion.chunk>` "
                    "ending with `data: [DONE]`.",
                    {
                        JSON: ChatCompletion,
                        SSE: sse_event_schema(
                            "One event: `data: <chat.completion.chunk JSON>` (see `x-sse-data`), "
                            "or `data: [DONE]` last; no `event:` line.",
                            json_data=False,
                        ),
                    },
                    sse_data=ChatCompletionChunk,
                ),
                **inference_errors,
            },
            auth="api",
        ),
        # issue 16 §2: legacy completions and embeddings
        Operation(
            "post", "/v1/completions", "OpenAI legacy text completions (JSON, or SSE with stream: true)", "inference",
            request=CompletionRequest,
            responses={
                200: Body(
                    "A `text_completion`; with `stream: true` Server-Sent Events `data: <text_completion chunk>` "
                    "ending with `data: [DONE]`.",
                    {
                        JSON: Completion,
                        SSE: sse_event_schema(
                            "One event: `data: <text_completion JSON>` (see `x-sse-data`), "
                            "or `data: [DONE]` last; no `event:` line.",
                            json_data=False,
                        ),
                    },
                    sse_data=Completion,
                ),
                **inference_errors,
            },
            auth="api",
        ),
        Operation(
            "post", "/v1/embeddings", "OpenAI embeddings (models configured with `embeddings = true`)", "inference",
            request=EmbeddingRequest,
            responses={200: Body("One vector per input, in order.", {JSON: EmbeddingList}), **inference_errors},
            auth="api",
        ),
        Operation(
            "get", "/v1/models", "Loaded models (llm-pool's `models` and OpenAI's `data`)", "inference",
            responses={200: Body("The loaded models, sorted.", {JSON: ModelsList}), **_errors(401)},
            auth="api",
        ),
        Operation(
            "get", "/v1/models/{model_id}", "One loaded model (OpenAI's `models.retrieve`)", "inference",
            params=(Param("model_id", "path", {"type": "string"}, "A loaded model's name (it may contain slashes)."),),
            responses={
                200: Body("The model's OpenAI card.", {JSON: ModelCard}),
                **_errors(401),
                404: Body(
                    "`unknown_model`: no such model; `not_found`: configured but not loaded "
                    "(so not in `GET /v1/models` either).",
                    {JSON: ErrorBody},
                ),
            },
            auth="api",
        ),
        Operation(
            "get", "/v1/admin/models", "Every configured model's row", "admin",
            responses={200: Body("One row per configured model.", {JSON: AdminModels}), **_errors(401)},
            auth="admin",
        ),
        Operation(
            "get", "/v1/admin/models/{name}", "One model's row", "admin", params=(NAME,),
            responses={200: Body("The model's row.", {JSON: AdminModel}), **_errors(401, 404)},
            auth="admin",
        ),
        Operation(
            "post", "/v1/admin/models/{name}/load", "Load a model (optional runtime-only overrides)", "admin",
            params=(NAME,), request=LoadRequest, body_required=False,
            responses={**admin_row, **_errors(400, 401, 404, 409, 500, 503)},
            auth="admin",
            description="Waits until the load ended. 409 `insufficient_gpu_memory` unless `force`.",
        ),
        Operation(
            "post", "/v1/admin/models/{name}/unload", "Unload a model gracefully", "admin",
            params=(
                NAME,
                Param("drain_timeout_s", "query", {"type": "number", "minimum": 0},
                      "Seconds running requests get to finish (overrides the body and the model's setting)."),
                Param("force", "query", {"type": "boolean"}, "Cancel running requests at once."),
            ),
            request=UnloadRequest, body_required=False,
            responses={**admin_row, **_errors(400, 401, 404, 409)},
            auth="admin",
        ),
        Operation(
            "post", "/v1/admin/models/{name}/replicas", "Resize a loaded model within replica_max", "admin",
            params=(NAME,), request=ResizeRequest,
            responses={**admin_row, **_errors(400, 401, 404, 409, 500)},
            auth="admin",
        ),
        # tuning (issue 21)
        Operation(
            "post", "/v1/admin/models/{name}/tune", "Start measuring a GGUF model's replica layouts", "admin",
            params=(NAME,), request=TuneRequest, body_required=False,
            responses={202: Body("The tune, started.", {JSON: TuneStatus}), **_errors(400, 401, 404, 409, 503)},
            auth="admin",
            description="Runs in the background (one tune at a time: 409 `tune_running`), bounded by `max_s`; "
                        "read it with GET, stop it with DELETE. The best layout is recorded for `replicas = \"auto\"`.",
        ),
        Operation(
            "get", "/v1/admin/models/{name}/tune", "The model's last tune: progress, table, best layouts", "admin",
            params=(NAME,),
            responses={200: Body("The tune.", {JSON: TuneStatus}), **_errors(401, 404)},
            auth="admin",
        ),
        Operation(
            "delete", "/v1/admin/models/{name}/tune", "Cancel the model's running tune", "admin",
            params=(NAME,),
            responses={200: Body("The tune, ended.", {JSON: TuneStatus}), **_errors(401, 404)},
            auth="admin",
            description="Returns once the layout being measured was unloaded; nothing is recorded.",
        ),
        Operation(
            "post", "/v1/admin/settings/reload", "Re-read the settings files (never loads or unloads)", "admin",
            responses={200: Body("What changed.", {JSON: ReloadResult}), **_errors(400, 401, 409)},
            auth="admin",
        ),
        Operation(
            "get", "/v1/admin/gpu-memory", "GPU memory (NVML) and each model's VRAM estimate", "admin",
            responses={200: Body("Per GPU and per model.", {JSON: GpuMemoryReport}), **_errors(401)},
            auth="admin",
        ),
        # the status page's charts and log tail (issue 19)
        Operation(
            "get", "/v1/admin/timeline", "The last 15 minutes of per-model samples (the status page's charts)", "admin",
            responses={200: Body("Columns of samples, oldest first.", {JSON: TimelineReport}), **_errors(401)},
            auth="admin",
        ),
        Operation(
            "get", "/v1/admin/logs", "The server's recent log lines, and with follow=true new ones as written", "admin",
            params=(
                Param("model", "query", {"type": "string"}, "Only the lines of this configured model."),
                Param("backlog", "query", {"type": "integer", "minimum": 0, "maximum": 500, "default": 100},
                      "How many of the kept lines come first."),
                Param("follow", "query", {"type": "boolean", "default": False},
                      "Keep the stream open and send new lines as they are written."),
            ),
            responses={
                200: Body(
                    "Server-Sent Events: `id: <seq>`, `event: log`, `data: <the log line's JSON>`; comment lines "
                    "as keep-alives.  A reconnecting client's `Last-Event-ID` resumes after that line.",
                    {SSE: sse_event_schema("One log line.", {"type": "string", "enum": ["log"]})},
                    sse_data=LogLine,
                ),
                **_errors(400, 401, 404, 429),
            },
            auth="admin",
        ),
        Operation(
            "get", "/metrics", "Prometheus metrics", "operations",
            responses={
                200: Body(
                    "Prometheus text exposition (OpenMetrics when the `Accept` header asks for it); "
                    "series in the `llm_pool:` namespace, labelled by model.",
                    {"text/plain": {"type": "string"}, "application/openmetrics-text": {"type": "string"}},
                )
            },
        ),
        Operation(
            "get", "/health/live", "Liveness: the process serves HTTP", "operations",
            responses={200: Body("Always, while the server runs.", {JSON: Live})},
        ),
        Operation(
            "get", "/health/ready", "Readiness: every enabled model is loaded", "operations",
            responses={
                200: Body("Ready.", {JSON: Readiness}),
                503: Body("Not ready: a model is not loaded yet (or failed), or the server is draining.",
                          {JSON: Readiness}),
            },
        ),
        Operation(
            "get", "/health/ready/{model}", "One model's readiness", "operations",
            params=(Param("model", "path", {"type": "string"}, "A configured model's name."),),
            responses={
                200: Body("The model is loaded.", {JSON: ModelReadiness}),
                503: Body("The model is not loaded, or the server is draining.", {JSON: ModelReadiness}),
                **_errors(404),
            },
        ),
        Operation(
            "get", "/openapi.json", "This document", "operations",
            responses={200: Body("OpenAPI 3.1.", {JSON: {"type": "object"}})},
        ),
        Operation(
            "get", "/docs", "This document as an interactive reference (Swagger UI)", "operations",
            responses={200: Body("HTML; loads the two files below and /openapi.json, nothing from elsewhere.",
                                 {"text/html": {"type": "string"}})},
        ),
        *(
            Operation(
                "get", f"/docs/{name}", f"Swagger UI's {name} (vendored, see admin/static/vendor/swagger-ui)", "operations",
                responses={200: Body("The vendored file, unchanged.", {ctype: {"type": "string"}})},
            )
            for name, ctype in DOCS_ASSETS.items()
        ),
        Operation(
            "get", "/", "The status page", "operations",
            responses={200: Body("HTML: models, states, queues, load/unload/resize buttons.", {"text/html": {"type": "string"}})},
        ),
        Operation(
            "get", "/admin", "The status page (same as /)", "operations",
            responses={200: Body("HTML.", {"text/html": {"type": "string"}})},
        ),
        *(
            Operation(
                "get", f"/admin/{name}", f"uPlot's {name} for the status page (vendored, see admin/static/vendor/uplot)",
                "operations",
                responses={200: Body("The vendored file, unchanged.", {ctype: {"type": "string"}})},
            )
            for name, ctype in STATUS_ASSETS.items()
        ),
    ]


def _version() -> str:
    try:
        return metadata.version("llm-pool")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0"


def build_openapi() -> dict[str, Any]:
    """The whole document, as builtins ready for JSON."""
    ops = operations()
    structs: list[Any] = []

    def ref(kind: Any) -> dict[str, Any]:
        if isinstance(kind, dict):
            return kind
        if kind not in structs:
            structs.append(kind)
        return {"$ref": f"#/components/schemas/{kind.__name__}"}

    paths: dict[str, dict[str, Any]] = {}
    for op in ops:
        item: dict[str, Any] = {
            "operationId": _operation_id(op),
            "summary": op.summary,
            "tags": [op.tag],
            "responses": {},
        }
        if op.description:
            item["description"] = op.description
        if op.params:
            item["parameters"] = [
                {"name": p.name, "in": p.where, "required": p.where == "path", "schema": p.schema, "description": p.description}
                for p in op.params
            ]
        if op.request is not None:
            item["requestBody"] = {
                "required": op.body_required,
                "content": {JSON: {"schema": ref(op.request)}},
            }
        for status, body in op.responses.items():
            out: dict[str, Any] = {"description": body.description}
            if body.content:
                out["content"] = {ctype: {"schema": ref(kind)} for ctype, kind in body.content.items()}
                if body.sse_data is not None:
                    out["content"][SSE]["x-sse-data"] = ref(body.sse_data)
            item["responses"][str(status)] = out
        if op.auth is not None:
            # optional: a token is needed only when the settings name one
            item["security"] = [{f"{op.auth}Token": []}, {}]
        paths.setdefault(op.path, {})[op.method] = item

    _, components = msgspec.json.schema_components(structs, ref_template="#/components/schemas/{name}")
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-pool",
            "version": _version(),
            "description": "Many local and remote language models behind one HTTP API. Errors are "
            "`{\"error\": {type, code, message, param}, \"detail\": {code, model, message}}`.",
        },
        "tags": [
            {"name": "inference", "description": "Generation (OpenAI-compatible where it says so)."},
            {"name": "admin", "description": "Load, unload, resize, reload; GPU memory."},
            {"name": "operations", "description": "Metrics, health probes, this document, the status page; no token."},
        ],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "apiToken": {"type": "http", "scheme": "bearer",
                             "description": "The token in the variable named by service.api_token_env (if set)."},
                "adminToken": {"type": "http", "scheme": "bearer",
                               "description": "The token in the variable named by service.admin_token_env (if set)."},
            },
        },
    }


def _operation_id(op: Operation) -> str:
    words = re.sub(r"[{}]", "", op.path).strip("/").replace(".", "_").replace("-", "_").split("/")
    return op.method + "_" + ("_".join(w for w in words if w) or "root")


#: Swagger UI's files that ``/docs`` loads, served from ``/docs/<name>``, and their types.
DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css"}
#: The vendored files change only with a release of llm-pool; an hour of caching spares a
#: reload of /docs 1.9 MB, and an upgrade is seen within the hour.
DOCS_CACHE = {"Cache-Control": "public, max-age=3600"}


def _static(name: str) -> bytes:
    return importlib.resources.files("llm_pool.admin").joinpath("static", name).read_bytes()


def register_openapi(app: Any) -> None:
    """Serve :func:`build_openapi` at ``GET /openapi.json`` (built once, on the first call), and
    ``GET /docs`` with its assets (read once, here)."""
    cache: list[bytes] = []
    page = _static("docs.html")
    assets = {name: _static(f"vendor/swagger-ui/{name}") for name in DOCS_ASSETS}

    @app.get("/docs")
    async def api_reference() -> Response:
        return Response(page, status=200, content_type="text/html; charset=utf-8", headers={"Cache-Control": "no-cache"})

    def asset_route(name: str) -> None:
        async def asset() -> Response:
            return Response(assets[name], status=200, content_type=DOCS_ASSETS[name], headers=DOCS_CACHE)

        app.add_url_rule(f"/docs/{name}", f"docs_{name}", asset, methods=["GET"])

    for name in DOCS_ASSETS:
        asset_route(name)

    @app.get("/openapi.json")
    async def openapi_document() -> Response:
        if not cache:
            cache.append(msgspec.json.encode(build_openapi()))
        return Response(cache[0], status=200, content_type="application/json")
