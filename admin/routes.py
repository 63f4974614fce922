"""The runtime admin API: inspect, load, unload, resize, reload settings, GPU memory, and the
status page's data (the timeline of samples behind its charts, the tail of recent log lines).

Routes decode and validate, call :class:`pool.manager.PoolManager`, and encode the model's row;
they hold no scheduling logic.  Load overrides are runtime-only: they never touch the settings
files, and none of them names a path, so no admin call can make the server read a file that is
not in the settings.
"""

from __future__ import annotations

import functools
import logging
import time
import types
import typing
from typing import Annotated, Any

import msgspec
import trio
from quart import Response, request

from llm_pool.admin import gpu
from llm_pool.admin.rows import (
    AdminModel,
    AdminModels,
    EndpointRow,
    FairnessRow,
    GpuMemoryReport,
    GpuModelRow,
    GpuRow,
    LoadConstraint,
    PairPresets,
    ReloadResult,
    ReplicaDetail,
    TimelineGpu,
    TimelineModel,
    TimelineReport,
    TuneBest,
    TuneCell,
    TuneLayoutRow,
    TuneStatus,
)
from llm_pool.backends import OverrideError, kind_of
from llm_pool.backends.capabilities import capabilities
from llm_pool.config import ModelSettings, resolve_model_path
from llm_pool.config.validation import describe, read_validation_error
from llm_pool.pool.api import decode_body
from llm_pool.pool.errors import PoolError
from llm_pool.pool.manager import ModelEntry, PoolManager
from llm_pool.pool.observability import LogRing, Sample, Timeline, log_ring, process_rss_mib
from llm_pool.pool.serving import sse_frame
from llm_pool.pool.tuning import (
    DEFAULT_CONCURRENCIES,
    DEFAULT_MAX_S,
    DEFAULT_TOKENS,
    ENGINES,
    Engine,
    TuneJob,
    format_table,
)
from llm_pool.pool.web_io import json_response, sse_response

log = logging.getLogger("llm_pool.admin")

class LoadRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/admin/models/{name}/load``: ``replicas``, ``force``, and the model's own load
    overrides (the fields its backend kind lists, as ``load_constraints`` shows them; never a
    path), validated by converting the model's settings with them applied."""

    replicas: Annotated[int, msgspec.Meta(ge=1)] | msgspec.UnsetType = msgspec.UNSET
    #: Load even if the VRAM estimate exceeds the free GPU memory.
    force: bool = False


class UnloadRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    drain_timeout_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    force: bool = False


class ResizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    replicas: Annotated[int, msgspec.Meta(ge=1)]


# -- tuning (issue 21)
class TuneRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/admin/models/{name}/tune``: what ``llm-pool tune`` takes, bounded so that one
    call cannot hold the machine for long (``max_s`` at most 30 minutes)."""

    #: Cores to cut into layouts (default: ``engine.cpu_cores``, else all); more than exist: 400.
    cores: Annotated[int, msgspec.Meta(ge=1, le=4096)] | None = None
    concurrency: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=64)]], msgspec.Meta(min_length=1, max_length=4)] = (
        msgspec.field(default_factory=lambda: list(DEFAULT_CONCURRENCIES))
    )
    engines: Annotated[list[Engine], msgspec.Meta(min_length=1, max_length=3)] = msgspec.field(
        default_factory=lambda: list(ENGINES)
    )
    tokens: Annotated[int, msgspec.Meta(ge=1, le=512)] = DEFAULT_TOKENS
    max_s: Annotated[float, msgspec.Meta(gt=0, le=1800)] = DEFAULT_MAX_S


def tune_status(job: TuneJob) -> TuneStatus:
    """A server-side tune as the admin API shows it."""
    result = job.result
    rows = []
    best = []
    if result is not None:
        for row in result.rows:
            lay = row.layout
            cells = [
                TuneCell(concurrency=c, tokens_per_s=round(cell.tokens_per_s, 1), ttft_p50_ms=round(cell.ttft_p50_s * 1000, 1),
                         requests=cell.requests, zero_token_answers=cell.zero_token_answers)
                for c, cell in sorted(row.cells.items())
            ]  # fmt: skip
            rows.append(TuneLayoutRow(engine=lay.engine, replicas=lay.replicas, threads=lay.threads, slots=lay.slots,
                                      cells=cells, error=row.error, skipped=row.skipped))
        for c in result.concurrencies:
            top = result.best(c)
            if top is not None:
                lay = top.layout
                best.append(TuneBest(concurrency=c, engine=lay.engine, replicas=lay.replicas, threads=lay.threads,
                                     slots=lay.slots, tokens_per_s=round(top.cells[c].tokens_per_s, 1)))
    return TuneStatus(
        model=job.model, state=job.state, error=job.error, cores=result.cores if result else job.cores,
        concurrencies=list(job.concurrencies), tokens=job.tokens, max_s=job.max_s, started_at=job.started_at,
        finished_at=job.finished_at, progress=list(job.progress), rows=rows, best=best,
        report=format_table(result) if result is not None and job.state != "running" else [],
        partial=bool(result and (result.partial or job.state == "cancelled")),
    )  # fmt: skip


def _bad_load(message: str, model: str, param: str | None = None) -> PoolError:
    return PoolError(400, "invalid_load_request", message, model=model, param=param)


def validate_overrides(entry: ModelEntry, raw: dict[str, Any]) -> tuple[dict[str, Any], LoadRequest]:
    """A load body's overrides, checked against the model's backend kind (which fields, which
    rules between them) and its settings Struct (each field's type and bounds), and the body's
    ``replicas``/``force``."""
    name, model = entry.name, entry.settings
    kind = kind_of(model)
    body: LoadRequest = _convert({k: raw[k] for k in ("replicas", "force") if k in raw}, LoadRequest, name)
    given = {k: v for k, v in raw.items() if k not in ("replicas", "force")}
    for key in given:
        if key not in kind.overrides:
            raise _bad_load(f"unsupported load override for {kind.name} backend: {key}", name, f"$.{key}")
    if body.replicas is not msgspec.UNSET and body.replicas > model.replica_max:
        raise _bad_load(
            f"replica count {body.replicas} exceeds replica_max {model.replica_max} for model {name!r}", name, "$.replicas"
        )
    try:
        given = kind.check_overrides(given)
    except OverrideError as e:
        raise _bad_load(str(e), name, f"$.{e.field}") from None
    # each field's type and bounds, then the rules between fields, on the settings as loaded
    loaded = _convert({**msgspec.to_builtins(model), **given}, type(model), name)
    if (problem := loaded.problems()) is not None:
        field, message = problem
        raise _bad_load(f"with these overrides, model {name!r} {message}", name, f"$.{field}")
    return given, body


def _convert(value: dict[str, Any], kind: type[Any], name: str) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as e:
        invalid = read_validation_error(e)
        raise _bad_load(f"invalid load override: {describe(invalid, kind)}", name, invalid.path) from None


# ---------------------------------------------------------------------- rows
def load_constraints(model: ModelSettings) -> dict[str, LoadConstraint]:
    """What the admin's load form may set, read from the model's settings Struct (the same
    annotations that validate the override): ``replicas`` up to ``replica_max``, then each
    override field of its backend kind."""
    out = {
        "replicas": LoadConstraint(kind="integer", minimum=1, maximum=model.replica_max, step=1,
                                   default=model.replicas if isinstance(model.replicas, int) else 1)
    }
    hints = _hints(type(model))
    kind = kind_of(model)
    for key in kind.overrides:
        c = _constraint(hints[key], getattr(model, key))
        notes = dict(kind.load_constraint_notes.get(key, {}))
        if c.default is not None:  # a "default" note is the runtime's own value for null
            notes.pop("default", None)
        out[key] = msgspec.structs.replace(c, **notes)
    return out


@functools.cache
def _hints(struct: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(struct, include_extras=True)


def _constraint(hint: Any, default: Any) -> LoadConstraint:
    """An int range, an enum, or a string pattern, for one annotated settings field (None
    allowed where the field is optional)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    optional = type(None) in options
    (core,) = (o for o in options if o is not type(None))
    if typing.get_origin(core) is typing.Literal:
        values = list(typing.get_args(core))
        if optional:  # a set of strings or null (GGUF cache types)
            return LoadConstraint(kind="string_or_null", allowed_values=values, default=default)
        return LoadConstraint(kind="enum", allowed_values=values, default=default)
    annotated = typing.get_origin(core) is typing.Annotated
    base = typing.get_args(core)[0] if annotated else core
    meta = next((m for m in typing.get_args(core)[1:] if isinstance(m, msgspec.Meta)), msgspec.Meta()) if annotated else msgspec.Meta()
    if base is str:
        return LoadConstraint(kind="string_or_null" if optional else "string", pattern=meta.pattern, default=default)
    return LoadConstraint(
        kind="integer_or_null" if optional else "integer",
        minimum=meta.ge if meta.ge is not None else None if meta.gt is None else meta.gt + 1,
        maximum=meta.le if meta.le is not None else None if meta.lt is None else meta.lt - 1,
        step=meta.multiple_of or 1,
        default=default,
    )


def model_row(manager: PoolManager, entry: ModelEntry) -> AdminModel:
    """One configured model, as ``GET /v1/admin/models`` serves and documents it."""
    kind = kind_of(entry.settings)
    rt = entry.runtime
    m = entry.settings
    loaded = entry.state == "loaded" and rt is not None
    live = [r for r in rt.replicas if r.state in ("serving", "retiring")] if rt else []
    vram, vram_n, vram_src = manager.memory_estimate(entry)
    running = rt.running if rt else 0
    waiting = rt.waiting if rt else 0
    idle_in = None if entry.idle_deadline is None else round(max(0.0, entry.idle_deadline - trio.current_time()), 1)
    return AdminModel(
        name=entry.name,
        resolved_backend=kind.name,
        configured_enabled=m.enabled,
        runtime_state=entry.state,
        is_loaded=loaded,
        replicas=len(live) if loaded else _replicas_shown(entry),
        replica_max=(entry.loaded_settings if loaded and entry.loaded_settings else m).replica_max,
        loaded_replicas=len(live),
        inflight_requests=running + waiting,
        queue_depth=waiting,
        runtime_inflight=running,
        configured_target_inflight=m.target_inflight,
        effective_target_inflight=rt.effective_target_inflight if rt else None,
        last_error=entry.last_error,
        vram_estimate_mib=vram,
        vram_estimate_replica_count=vram_n,
        vram_estimate_source=vram_src,  # type: ignore[arg-type]
        load_constraints=load_constraints(m),
        load_recommendations=msgspec.convert(kind.load_recommendations, dict[str, PairPresets]),
        # the override active now: {} when none is (unloaded, failed, or loaded as configured)
        load_override=dict(entry.override or {}),
        replica_details=[
            ReplicaDetail(name=r.name, state=r.state, active=r.active, capacity=r.capacity, error=r.error,
                          endpoint=_endpoint(m, r.backend))
            for r in (rt.replicas if rt else [])
        ],
        definition=m,
        # fair sharing among fairness keys (pool.fairness): None while the model is not loaded
        fairness=msgspec.convert(rt.queue.row(), FairnessRow) if rt else None,
        replica_restarts=entry.replica_restarts,
        # keep-alive: seconds until the idle timer unloads the model (None: not counting down)
        idle_unload_in_s=idle_in,
        load_on_demand=m.load_on_demand,
        # remote models with prices: today's spend and remaining budget (from the cost ledger)
        remote_cost=_cost(manager, entry),
        capabilities=capabilities(m),
        # tuning (issue 21): where the layout came from (replicas = "auto": the tuning cache)
        replicas_source=entry.replicas_source,
    )


def _replicas_shown(entry: ModelEntry) -> int:
    """An unloaded model's replica count: the configured one, or for ``replicas = "auto"`` the
    last load's (1 before the first)."""
    if isinstance(entry.settings.replicas, int):
        return entry.settings.replicas
    last = entry.loaded_settings.replicas if entry.loaded_settings is not None else 1
    return last if isinstance(last, int) else 1


def _endpoint(model: Any, backend: Any) -> EndpointRow | None:
    """A remote endpoint's health for its replica's row (issue 18), else None."""
    if not getattr(model, "remote_endpoints", None):
        return None
    state = backend.describe().get("endpoint")
    return msgspec.convert(state, EndpointRow) if state is not None else None


def _cost(manager: PoolManager, entry: ModelEntry) -> dict[str, Any] | None:
    summary = kind_of(entry.settings).cost_summary
    if summary is None:
        return None
    return summary(manager.settings, (entry.loaded_settings if entry.runtime else None) or entry.settings, entry.name)


async def _body(kind: type[Any], *, code: str = "invalid_request") -> Any:
    raw = await request.get_data(cache=False)
    assert isinstance(raw, bytes)
    if not raw.strip():
        raw = b"{}"
    return decode_body(raw, kind, code=code)


def _query_flag(name: str) -> bool | None:
    value = request.args.get(name)
    if value is None:
        return None
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise PoolError(400, "invalid_request", f"query parameter {name} must be true or false", param=name)


def _query_float(name: str) -> float | None:
    value = request.args.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise PoolError(400, "invalid_request", f"query parameter {name} must be a number >= 0", param=name)
    return number


async def check_file_bounds(manager: PoolManager, entry: ModelEntry, override: dict[str, Any]) -> None:
    """400 when an override exceeds what the model file allows (``gguf_n_ctx`` above the
    context the model was trained for), read on a worker thread by its backend kind.  A file
    that cannot be read is left to the load to report."""
    bounds_of = kind_of(entry.settings).file_bounds
    if bounds_of is None or not override or not entry.settings.model_path:
        return
    try:
        path = resolve_model_path(manager.settings, entry.settings)
    except FileNotFoundError:
        return
    bounds = await trio.to_thread.run_sync(bounds_of, path)
    for key, (bound, what) in bounds.items():
        if key in override and override[key] > bound:
            raise _bad_load(
                f"{key} {override[key]} exceeds {what.format(model=entry.name, bound=bound)}", entry.name, f"$.{key}"
            )


def _check_gpu_memory(manager: PoolManager, entry: ModelEntry, override: dict[str, Any], replicas: int, gpus: list[gpu.GpuInfo]) -> None:
    model = msgspec.structs.replace(entry.settings, **override)
    if not kind_of(model).uses_gpu(model) or not gpus:
        return
    per_replica, counted, _ = manager.memory_estimate(entry)
    if per_replica is None:
        return
    need = per_replica / (counted or 1) * replicas
    free = sum(g.free_mib for g in gpus)
    if need > free:
        raise PoolError(
            409,
            "insufficient_gpu_memory",
            f"model {entry.name!r} needs about {need:.0f} MiB for {replicas} replica(s) but only {free} MiB "
            "of GPU memory is free; pass force=true to load anyway",
            model=entry.name,
        )


# ------------------------------------------------------------- the status page's charts and tail
def timeline_report(manager: PoolManager, timeline: Timeline, gpus: list[gpu.GpuInfo], gpu_error: str | None) -> TimelineReport:
    """The timeline's samples as columns (what uPlot draws), times in Unix seconds; the last
    one, the interval in progress, with the GPUs as read now."""
    samples, now = timeline.snapshot(gpus)
    offset = time.time() - now
    models = {}
    for name, entry in sorted(manager.entries.items()):
        mine = [s.models.get(name) for s in samples]
        codes = sorted({code for m in mine if m is not None for code in m.errors})
        vram, _, source = manager.memory_estimate(entry)
        models[name] = TimelineModel(
            tokens_per_s=[m.tokens_per_s if m else 0.0 for m in mine],
            running=[m.running if m else 0 for m in mine],
            queued=[m.queued if m else 0 for m in mine],
            ttft_p50_s=[m.ttft_p50_s if m else None for m in mine],
            ttft_p95_s=[m.ttft_p95_s if m else None for m in mine],
            requests=[m.requests if m else 0 for m in mine],
            errors={code: [m.errors.get(code, 0) if m else 0 for m in mine] for code in codes},
            memory_mib=vram,
            memory_source=source,  # type: ignore[arg-type]
        )
    return TimelineReport(
        interval_s=timeline.interval_s,
        window_s=timeline.window_s,
        t=[round(s.t + offset, 3) for s in samples],
        models=models,
        gpus=_gpu_columns(samples),
        gpu_error=gpu_error,
        process_rss_mib=process_rss_mib(),
    )


def _gpu_columns(samples: list[Sample]) -> list[TimelineGpu]:
    seen: dict[int, tuple[str, int]] = {}
    for s in samples:
        for index, name, _, total in s.gpus:
            seen[index] = (name, total)
    out = []
    for index, (name, total) in sorted(seen.items()):
        used = [next((u for i, _, u, _ in s.gpus if i == index), None) for s in samples]
        out.append(TimelineGpu(index=index, name=name, used_mib=used, total_mib=total))
    return out


#: Lines of the log ring a new tail starts with, unless ``backlog`` says otherwise.
LOG_BACKLOG = 100


def _log_events(batch: list[tuple[int, dict[str, Any]]]) -> bytes:
    return b"".join(b"id: %d\n" % seq + sse_frame("log", {"seq": seq, **line}) for seq, line in batch)


async def log_frames(ring: LogRing, after: int, model: str | None, follow: bool) -> Any:
    """``GET /v1/admin/logs``' stream: one ``log`` event per line (``id:`` its number); with
    ``follow``, new lines as they are written and a comment line as a keep-alive when nothing
    was written for a while, until the client leaves; else the lines kept, then the end."""
    if not follow:
        yield _log_events(ring.since(after, model)) or b": no lines\n\n"
        return
    async for batch in ring.follow(after, model):
        yield _log_events(batch) if batch else b": keep-alive\n\n"


def register_admin(app: Any, manager: PoolManager) -> None:
    timeline = Timeline(manager)
    #: ``pool.server.serve`` runs its sampling task
    app.extensions["llm_pool_timeline"] = timeline
    ring = log_ring()

    def row_response(entry: ModelEntry) -> Response:
        return json_response(model_row(manager, entry))

    @app.get("/v1/admin/models")
    async def admin_models() -> Response:
        return json_response(AdminModels(models=[model_row(manager, e) for e in manager.entries.values()]))

    @app.get("/v1/admin/models/<path:name>")
    async def admin_model(name: str) -> Response:
        return row_response(manager.entry(name))

    @app.post("/v1/admin/models/<path:name>/load")
    async def admin_load(name: str) -> Response:
        entry = manager.entry(name)
        override, body = validate_overrides(entry, await _body(dict[str, Any], code="invalid_load_request"))
        replicas = None if body.replicas is msgspec.UNSET else body.replicas
        if entry.state in ("loaded", "loading") and (override or replicas is not None):
            raise _bad_load(
                f"model {name!r} is {entry.state}; overrides and replicas apply to a new load only: unload first",
                name,
            )
        await check_file_bounds(manager, entry, override)
        if entry.state in ("unloaded", "failed") and not body.force:
            gpus, _ = await trio.to_thread.run_sync(gpu.read_gpus)
            _check_gpu_memory(manager, entry, override, replicas or _replicas_shown(entry), gpus)
        log.info("admin load", extra={"fields": {"action": "load", "model": name, "override": override, "replicas": replicas}})
        entry = await manager.load(name, override=override or None, replicas=replicas)
        return row_response(entry)

    @app.post("/v1/admin/models/<path:name>/unload")
    async def admin_unload(name: str) -> Response:
        manager.entry(name)
        body: UnloadRequest = await _body(UnloadRequest)
        drain = _query_float("drain_timeout_s")
        force = _query_flag("force")
        log.info("admin unload", extra={"fields": {"action": "unload", "model": name}})
        entry = await manager.unload(
            name,
            drain_timeout=drain if drain is not None else body.drain_timeout_s,
            force=force if force is not None else body.force,
        )
        return row_response(entry)

    @app.post("/v1/admin/models/<path:name>/replicas")
    async def admin_resize(name: str) -> Response:
        manager.entry(name)
        body: ResizeRequest = await _body(ResizeRequest)
        log.info("admin resize", extra={"fields": {"action": "resize", "model": name, "replicas": body.replicas}})
        return row_response(await manager.resize(name, body.replicas))

    # tuning (issue 21): one background sweep at a time, read and cancelled here
    @app.post("/v1/admin/models/<path:name>/tune")
    async def admin_tune(name: str) -> Response:
        manager.entry(name)
        body: TuneRequest = await _body(TuneRequest)
        job = manager.start_tune(name, cores=body.cores, concurrencies=tuple(body.concurrency),
                                 engines=tuple(body.engines), tokens=body.tokens, max_s=body.max_s)  # fmt: skip
        return json_response(tune_status(job), status=202)

    @app.get("/v1/admin/models/<path:name>/tune")
    async def admin_tune_status(name: str) -> Response:
        return json_response(tune_status(manager.tune_of(name)))

    @app.delete("/v1/admin/models/<path:name>/tune")
    async def admin_tune_cancel(name: str) -> Response:
        job = manager.tune_of(name)
        if job.state == "running":
            log.info("admin tune cancel", extra={"fields": {"action": "tune_cancel", "model": name}})
            job.cancel()
            with trio.CancelScope(shield=True):  # the layout being measured unloads first
                await job.finished.wait()
        return json_response(tune_status(job))

    @app.post("/v1/admin/settings/reload")
    async def admin_reload() -> Response:
        result = await manager.reload_from_files()
        log.info("admin reload", extra={"fields": {"action": "reload", **result}})
        return json_response(msgspec.convert(result, ReloadResult))

    @app.get("/v1/admin/gpu-memory")
    async def admin_gpu_memory() -> Response:
        gpus, error = await trio.to_thread.run_sync(gpu.read_gpus)
        rows = [model_row(manager, entry) for entry in manager.entries.values()]
        return json_response(
            GpuMemoryReport(
                gpus=[GpuRow(index=g.index, name=g.name, used_mib=g.used_mib, total_mib=g.total_mib,
                             used_over_total=g.used_over_total) for g in gpus],
                models=[GpuModelRow(**{f: getattr(row, f) for f in GpuModelRow.__struct_fields__}) for row in rows],
                error=error,
            )
        )

    @app.get("/v1/admin/timeline")
    async def admin_timeline() -> Response:
        gpus, error = await trio.to_thread.run_sync(gpu.read_gpus)
        return json_response(timeline_report(manager, timeline, gpus, error))

    @app.get("/v1/admin/logs")
    async def admin_logs() -> Response:
        model = request.args.get("model") or None
        if model is not None:
            manager.entry(model)  # 404 unknown_model
        raw = request.args.get("backlog", str(LOG_BACKLOG))
        if not raw.isdigit() or int(raw) > ring.lines.maxlen:  # type: ignore[operator]
            raise PoolError(
                400, "invalid_request", f"query parameter backlog must be an integer from 0 to {ring.lines.maxlen}",
                param="backlog",
            )
        follow = bool(_query_flag("follow"))
        after = ring.start_after(int(raw))
        last_seen = request.headers.get("Last-Event-ID", "")  # a reconnecting EventSource
        if last_seen.isdigit():
            after = int(last_seen) if int(last_seen) <= ring.last else after
        if follow:
            ring.check_room()
        frames = log_frames(ring, after, model, follow)
        return sse_response(frames)
