"""Operator routes: Prometheus metrics, health probes and the status page (the OpenAPI
document is :mod:`llm_pool.pool.openapi`'s own route).

=============================  ============================================================
``GET /metrics``               Prometheus text (OpenMetrics when the scraper asks for it);
                               see :mod:`pool.observability` for the series
``GET /health/live``           200 ``{"status": "live"}`` while the process serves HTTP
``GET /health/ready``          200 once every model meant to be serving is loaded (enabled, or
                               loaded by an admin, and not unloaded since by an admin or its
                               idle timer); 503 before that and while draining for shutdown;
                               the body lists what is not ready
``GET /health/ready/{model}``  200 when that model is loaded (and the server not draining),
                               else 503; 404 ``unknown_model``
``GET /`` and ``GET /admin``   the status page (``admin/static/index.html``)
``GET /admin/<uPlot file>``    the chart library it loads (vendored: ``admin/static/vendor/uplot``)
=============================  ============================================================

None of these is behind a bearer token (only ``/v1/...`` is): probes and scrapers carry no
credentials, and nothing here changes state or shows a secret.  The status page loads without a
token and sends the admin token its user types to the admin API.

Thin like :mod:`pool.http`: the metrics live in :mod:`pool.observability`, the readiness rule in
:meth:`pool.manager.PoolManager.ready`.  GPU memory is read through NVML on a worker thread at
each scrape (``admin.gpu.read_gpus``; no GPU, no GPU series).
"""

from __future__ import annotations

import importlib.resources
from typing import Any, Literal

import msgspec
import trio
from quart import Response, request

from llm_pool.admin import gpu
from llm_pool.pool.errors import without_paths
from llm_pool.pool.manager import ModelEntry, PoolManager, State
from llm_pool.pool.observability import PoolMetrics
from llm_pool.pool.web_io import json_response

HTML = "text/html; charset=utf-8"
#: Probes and scrapes must never be answered from a cache.
NO_STORE = {"Cache-Control": "no-store"}


class Live(msgspec.Struct, kw_only=True):
    """``GET /health/live``."""

    status: Literal["live"] = "live"


class ModelReadiness(msgspec.Struct, kw_only=True):
    """One model's readiness: ``GET /health/ready/{model}``, and the items of
    :attr:`Readiness.not_ready`."""

    model: str
    #: True when the model is loaded and the server is not draining for shutdown.
    ready: bool
    state: State
    #: ``enabled`` in the settings: whether it is loaded at start.
    enabled: bool
    #: Whether it is meant to be serving now, so ``/health/ready`` waits for it: enabled, or
    #: loaded by an admin, and not unloaded since by an admin or its idle timer.
    wanted: bool
    #: The model's ``last_error`` without filesystem paths (probes carry no token; the admin
    #: API has the whole text).
    last_error: str | None


class Readiness(msgspec.Struct, kw_only=True):
    """``GET /health/ready`` (200 when ``status`` is ``ready``, else 503)."""

    status: Literal["ready", "not_ready"]
    #: True from SIGINT/SIGTERM on: requests are draining, new ones get 503.
    shutting_down: bool
    #: Models meant to be serving now (``wanted``) that are not loaded, in name order.
    not_ready: list[ModelReadiness]


def model_readiness(manager: PoolManager, entry: ModelEntry) -> ModelReadiness:
    return ModelReadiness(
        model=entry.name,
        ready=entry.state == "loaded" and not manager.shutting_down,
        state=entry.state,
        enabled=entry.settings.enabled,
        wanted=entry.wanted,
        last_error=without_paths(entry.last_error) if entry.last_error is not None else None,
    )


def readiness(manager: PoolManager) -> Readiness:
    waiting = [
        model_readiness(manager, e)
        for _, e in sorted(manager.entries.items())
        if e.wanted and e.state != "loaded"
    ]
    return Readiness(
        status="ready" if manager.ready() else "not_ready",
        shutting_down=manager.shutting_down,
        not_ready=waiting,
    )


def status_page_html() -> bytes:
    """The status page, as shipped in the ``admin`` package (``admin/static/index.html``)."""
    return importlib.resources.files("llm_pool.admin").joinpath("static/index.html").read_bytes()


#: uPlot's files the status page loads, served from ``/admin/<name>`` (vendored, pinned:
#: ``admin/static/vendor/uplot/VERSION``), and their types.
STATUS_ASSETS = {"uPlot.iife.min.js": "text/javascript", "uPlot.min.css": "text/css"}


def register_ops(app: Any, manager: PoolManager) -> PoolMetrics:
    """Add the routes of the module docstring to ``app`` (once, from ``create_app``); returns
    the app's metrics (also ``app.extensions["llm_pool_metrics"]``)."""
    metrics = PoolMetrics(manager)
    app.extensions["llm_pool_metrics"] = metrics
    page = status_page_html()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        gpus, _ = await trio.to_thread.run_sync(gpu.read_gpus)
        body, content_type = metrics.render(request.headers.get("Accept"), gpus)
        return Response(body, status=200, content_type=content_type, headers=NO_STORE)

    @app.get("/health/live")
    async def health_live() -> Response:
        return json_response(Live(), headers=NO_STORE)

    @app.get("/health/ready")
    async def health_ready() -> Response:
        body = readiness(manager)
        return json_response(body, 200 if body.status == "ready" else 503, headers=NO_STORE)

    @app.get("/health/ready/<path:model>")
    async def health_ready_model(model: str) -> Response:
        body = model_readiness(manager, manager.entry(model))
        return json_response(body, 200 if body.ready else 503, headers=NO_STORE)

    @app.get("/")
    @app.get("/admin")
    async def status_page() -> Response:
        return Response(page, status=200, content_type=HTML, headers={"Cache-Control": "no-cache"})

    admin_static = importlib.resources.files("llm_pool.admin").joinpath("static/vendor/uplot")
    assets = {name: admin_static.joinpath(name).read_bytes() for name in STATUS_ASSETS}

    def asset_route(name: str) -> None:
        async def asset() -> Response:
            # changes only with a release of llm-pool, as /docs' files
            return Response(assets[name], status=200, content_type=STATUS_ASSETS[name], headers={"Cache-Control": "public, max-age=3600"})

        app.add_url_rule(f"/admin/{name}", f"status_{name}", asset, methods=["GET"])

    for name in STATUS_ASSETS:
        asset_route(name)

    return metrics
