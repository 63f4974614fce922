"""The runtime admin API: inspect, load, unload, resize, reload settings, GPU memory.

Routes decode and validate, call :class:`pool.manager.PoolManager`, and encode the model's row;
they hold no scheduling logic.  Load overrides are runtime-only: they never touch the settings
files, and none of them names a path, so no admin call can make the server read a file that is
not in the settings.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, get_args

import msgspec
import trio
from quart import Response, request

from llm_pool.admin import gpu
from llm_pool.backends.gguf import KV_CACHE_TYPES
from llm_pool.config import ModelSettings, resolve_model_path
from llm_pool.config.settings import VllmKvCacheDtype, check_vllm_speculative
from llm_pool.pool.api import decode_body
from llm_pool.pool.errors import PoolError
from llm_pool.pool.manager import ModelEntry, PoolManager
from llm_pool.pool.web_io import json_response

log = logging.getLogger("llm_pool.admin")

EXLLAMA_CACHE_QUANTS = ("8", "8,4")
#: Override fields each backend accepts (``replicas`` is accepted by all).
OVERRIDES_BY_BACKEND: dict[str, tuple[str, ...]] = {
    "gguf": ("gguf_n_ctx", "gguf_flash_attn", "gguf_type_k", "gguf_type_v"),
    "exllamav3": (
        "exllama_cache_size",
        "exllama_cache_k_bits",
        "exllama_cache_v_bits",
        "exllama_cache_quant",
        "exllama_max_rq_tokens",
    ),
    "ct2": (),
    "llama_server": (),
    "openai_compatible": (),
    "vllm_serve": (
        "vllm_max_model_len",
        "vllm_kv_cache_dtype",
        "vllm_kv_cache_memory_bytes",
        "vllm_speculative_method",
        "vllm_speculative_model",
        "vllm_num_speculative_tokens",
    ),
}


class LoadRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    replicas: Annotated[int, msgspec.Meta(ge=1)] | msgspec.UnsetType = msgspec.UNSET
    gguf_n_ctx: Annotated[int, msgspec.Meta(ge=1)] | msgspec.UnsetType = msgspec.UNSET
    gguf_flash_attn: str | msgspec.UnsetType = msgspec.UNSET
    gguf_type_k: str | None | msgspec.UnsetType = msgspec.UNSET
    gguf_type_v: str | None | msgspec.UnsetType = msgspec.UNSET
    exllama_cache_size: int | msgspec.UnsetType = msgspec.UNSET
    exllama_cache_k_bits: int | None | msgspec.UnsetType = msgspec.UNSET
    exllama_cache_v_bits: int | None | msgspec.UnsetType = msgspec.UNSET
    exllama_cache_quant: str | msgspec.UnsetType = msgspec.UNSET
    exllama_max_rq_tokens: Annotated[int, msgspec.Meta(ge=1)] | msgspec.UnsetType = msgspec.UNSET
    vllm_max_model_len: Annotated[int, msgspec.Meta(ge=1)] | None | msgspec.UnsetType = msgspec.UNSET
    vllm_kv_cache_dtype: str | msgspec.UnsetType = msgspec.UNSET
    vllm_kv_cache_memory_bytes: Annotated[int, msgspec.Meta(ge=1)] | None | msgspec.UnsetType = msgspec.UNSET
    vllm_speculative_method: str | None | msgspec.UnsetType = msgspec.UNSET
    vllm_speculative_model: str | None | msgspec.UnsetType = msgspec.UNSET
    vllm_num_speculative_tokens: Annotated[int, msgspec.Meta(ge=1)] | None | msgspec.UnsetType = msgspec.UNSET
    #: Load even if the VRAM estimate exceeds the free GPU memory.
    force: bool = False


class UnloadRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    drain_timeout_s: Annotated[float, msgspec.Meta(ge=0)] | None = None
    force: bool = False


class ResizeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    replicas: Annotated[int, msgspec.Meta(ge=1)]


#: llama.cpp takes n_ctx as a uint32: anything larger wraps around (4294967296 loaded as 0).
N_CTX_MAX = 2**32 - 1


def _bad_load(message: str, model: str, param: str | None = None) -> PoolError:
    return PoolError(400, "invalid_load_request", message, model=model, param=param)


def validate_overrides(entry: ModelEntry, backend: str, body: LoadRequest) -> tuple[dict[str, Any], int | None]:
    """The ModelSettings overrides a load request asks for, and its replica count."""
    name = entry.name
    given = {f: v for f in body.__struct_fields__ if f != "force" and (v := getattr(body, f)) is not msgspec.UNSET}
    replicas = given.pop("replicas", None)
    accepted = OVERRIDES_BY_BACKEND.get(backend, ())
    for key in given:
        if key not in accepted:
            raise _bad_load(f"unsupported load override for {backend} backend: {key}", name, key)
    if replicas is not None and replicas > entry.settings.replica_max:
        raise _bad_load(
            f"replica count {replicas} exceeds replica_max {entry.settings.replica_max} for model {name!r}",
            name,
            "replicas",
        )
    if given.get("gguf_n_ctx", 0) > N_CTX_MAX:
        raise _bad_load(f"gguf_n_ctx must be at most {N_CTX_MAX} (llama.cpp's limit)", name, "gguf_n_ctx")
    if "gguf_flash_attn" in given:
        value = str(given["gguf_flash_attn"]).lower()
        if value not in ("on", "off", "auto"):
            raise _bad_load("gguf_flash_attn must be one of: on, off, auto", name, "gguf_flash_attn")
        given["gguf_flash_attn"] = value
    for key in ("gguf_type_k", "gguf_type_v"):
        if given.get(key) is not None:
            value = str(given[key]).lower()
            if value not in KV_CACHE_TYPES:
                raise _bad_load(f"{key} must be one of: {', '.join(KV_CACHE_TYPES)} (or null)", name, key)
            given[key] = value
    if "exllama_cache_size" in given:
        size = given["exllama_cache_size"]
        if size < 256 or size % 256:
            raise _bad_load("exllama_cache_size must be a multiple of 256 and at least 256", name, "exllama_cache_size")
    has_k, has_v = "exllama_cache_k_bits" in given, "exllama_cache_v_bits" in given
    if has_k != has_v:
        raise _bad_load("exllama_cache_k_bits and exllama_cache_v_bits must be provided together", name)
    if has_k:
        k, v = given["exllama_cache_k_bits"], given["exllama_cache_v_bits"]
        if (k is None) != (v is None):
            raise _bad_load("exllama_cache_k_bits and exllama_cache_v_bits must both be null (fp16) or both set", name)
        for key, bits in (("exllama_cache_k_bits", k), ("exllama_cache_v_bits", v)):
            if bits is not None and not 2 <= bits <= 8:
                raise _bad_load(f"{key} must be between 2 and 8", name, key)
        if "exllama_cache_quant" in given:
            raise _bad_load("exllama_cache_quant cannot be combined with exllama_cache_k_bits/exllama_cache_v_bits", name)
        given["exllama_cache_quant"] = None
    if "exllama_cache_quant" in given and given["exllama_cache_quant"] is not None:
        if given["exllama_cache_quant"] not in EXLLAMA_CACHE_QUANTS:
            raise _bad_load('exllama_cache_quant must be "8" or "8,4"', name, "exllama_cache_quant")
        given["exllama_cache_k_bits"] = given["exllama_cache_v_bits"] = None
    if backend == "vllm_serve":
        _check_vllm_overrides(entry, given)
    return given, replicas


# ---------------------------------------------------------------------- rows
def load_constraints(backend: str, m: ModelSettings) -> dict[str, Any]:
    out: dict[str, Any] = {
        "replicas": {"kind": "int", "minimum": 1, "maximum": m.replica_max, "step": 1, "default": m.replicas}
    }
    if backend == "gguf":
        out |= {
            "gguf_n_ctx": {"kind": "int", "minimum": 1, "step": 1, "default": m.gguf_n_ctx},
            "gguf_flash_attn": {"kind": "enum", "allowed_values": ["on", "off", "auto"], "default": m.gguf_flash_attn},
            "gguf_type_k": {"kind": "enum", "allowed_values": [*KV_CACHE_TYPES, None], "default": m.gguf_type_k},
            "gguf_type_v": {"kind": "enum", "allowed_values": [*KV_CACHE_TYPES, None], "default": m.gguf_type_v},
        }
    elif backend == "exllamav3":
        out |= {
            "exllama_cache_size": {"kind": "int", "minimum": 256, "step": 256, "default": m.exllama_cache_size},
            "exllama_cache_k_bits": {"kind": "int", "minimum": 2, "maximum": 8, "step": 1, "default": m.exllama_cache_k_bits},
            "exllama_cache_v_bits": {"kind": "int", "minimum": 2, "maximum": 8, "step": 1, "default": m.exllama_cache_v_bits},
            "exllama_cache_quant": {"kind": "enum", "allowed_values": list(EXLLAMA_CACHE_QUANTS), "default": m.exllama_cache_quant},
            "exllama_max_rq_tokens": {"kind": "int", "minimum": 1, "step": 1, "default": m.exllama_max_rq_tokens},
        }
    return out


def load_recommendations(backend: str) -> dict[str, Any]:
    if backend == "gguf":
        return {
            "kv_cache_presets": [
                {"label": f"{t}/{t}", "gguf_type_k": t, "gguf_type_v": t} for t in ("f16", "q8_0", "q4_0")
            ]
        }
    if backend == "exllamav3":
        return {
            "kv_cache_presets": [
                {"label": "fp16", "exllama_cache_k_bits": None, "exllama_cache_v_bits": None},
                {"label": "8/8", "exllama_cache_k_bits": 8, "exllama_cache_v_bits": 8},
                {"label": "8/4", "exllama_cache_k_bits": 8, "exllama_cache_v_bits": 4},
            ]
        }
    return {}


def vram_estimate(manager: PoolManager, entry: ModelEntry) -> tuple[float | None, int | None, str]:
    if entry.observed_vram_mib is not None:
        return round(entry.observed_vram_mib, 1), entry.observed_vram_replicas, "observed_load_delta"
    if entry.settings.model_path and manager.backend_of(entry) != "openai_compatible":
        try:
            path = resolve_model_path(manager.settings, entry.settings)
            size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            return round(size / 2**20, 1), 1, "model_artifact_size"
        except OSError:
            pass
    return None, None, "unavailable"


def model_row(manager: PoolManager, entry: ModelEntry) -> dict[str, Any]:
    backend = manager.backend_of(entry)
    rt = entry.runtime
    m = entry.settings
    loaded = entry.state == "loaded" and rt is not None
    live = [r for r in rt.replicas if r.state in ("serving", "retiring")] if rt else []
    vram, vram_n, vram_src = vram_estimate(manager, entry)
    running = rt.running if rt else 0
    waiting = rt.waiting if rt else 0
    return {
        "name": entry.name,
        "resolved_backend": backend,
        "configured_enabled": m.enabled,
        "runtime_state": entry.state,
        "is_loaded": loaded,
        "replicas": len(live) if loaded else m.replicas,
        "replica_max": m.replica_max,
        "loaded_replicas": len(live),
        "inflight_requests": running + waiting,
        "queue_depth": waiting,
        "runtime_inflight": running,
        "configured_target_inflight": m.target_inflight,
        "effective_target_inflight": rt.effective_target_inflight if rt else None,
        "last_error": entry.last_error,
        "vram_estimate_mib": vram,
        "vram_estimate_replica_count": vram_n,
        "vram_estimate_source": vram_src,
        "load_constraints": load_constraints(backend, m),
        "load_recommendations": load_recommendations(backend),
        # the override active now: {} when none is (unloaded, failed, or loaded as configured)
        "load_override": dict(entry.override or {}),
        "replica_details": [
            {"name": r.name, "state": r.state, "active": r.active, "capacity": r.capacity, "error": r.error}
            for r in (rt.replicas if rt else [])
        ],
        "definition": msgspec.to_builtins(m),
        # remote models with prices: today's spend and remaining budget (from the cost ledger)
        "remote_cost": _remote_cost(manager, entry) if backend == "openai_compatible" else None,
    }


def _remote_cost(manager: PoolManager, entry: ModelEntry) -> dict[str, Any] | None:
    from llm_pool.backends.openai_compatible import cost_summary

    return cost_summary(manager.settings, (entry.loaded_settings if entry.runtime else None) or entry.settings, entry.name)


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


async def check_trained_context(manager: PoolManager, entry: ModelEntry, override: dict[str, Any]) -> None:
    """400 when a ``gguf_n_ctx`` override exceeds the context the model was trained for
    (``n_ctx_train``, read from the GGUF header on a worker thread): llama.cpp would load it with
    another context, or spend tens of seconds failing.  A file that cannot be read is left to
    the load to report."""
    n_ctx = override.get("gguf_n_ctx")
    if n_ctx is None or not entry.settings.model_path:
        return
    from llm_pool.backends.gguf_header import trained_context

    try:
        path = resolve_model_path(manager.settings, entry.settings)
    except FileNotFoundError:
        return
    trained = await trio.to_thread.run_sync(trained_context, path)
    if trained is not None and n_ctx > trained:
        raise _bad_load(
            f"gguf_n_ctx {n_ctx} exceeds the context model {entry.name!r} was trained for ({trained}, "
            "n_ctx_train in its GGUF header)",
            entry.name,
            "gguf_n_ctx",
        )


def _check_vllm_overrides(entry: ModelEntry, given: dict[str, Any]) -> None:
    """vllm_* overrides: values vLLM takes, the speculative trio consistent with the settings it
    overrides, and no path: ``vllm_speculative_model`` may only be switched off (null), since a
    draft model is a folder to read or a model to download, which only the settings may name."""
    name = entry.name
    if "vllm_kv_cache_dtype" in given:
        choices = get_args(VllmKvCacheDtype)
        if given["vllm_kv_cache_dtype"] not in choices:
            raise _bad_load(f"vllm_kv_cache_dtype must be one of: {', '.join(choices)}", name, "vllm_kv_cache_dtype")
    if given.get("vllm_speculative_model") is not None:
        raise _bad_load(
            "vllm_speculative_model may only be null in a load override (a draft model is named in the settings files)",
            name,
            "vllm_speculative_model",
        )
    if given.get("vllm_speculative_method") == "":
        raise _bad_load("vllm_speculative_method must be a non-empty string or null", name, "vllm_speculative_method")
    check_vllm_speculative(
        msgspec.structs.replace(entry.settings, **given), lambda key, message: _bad_load(message, name, key)
    )


def _check_gpu_memory(manager: PoolManager, entry: ModelEntry, backend: str, override: dict[str, Any], replicas: int, gpus: list[gpu.GpuInfo]) -> None:
    model = msgspec.structs.replace(entry.settings, **override)
    on_gpu = backend == "exllamav3" or model.device == "cuda" or (backend == "gguf" and model.gguf_n_gpu_layers != 0)
    on_gpu = on_gpu or (backend == "llama_server" and model.llama_server_n_gpu_layers != 0) or backend == "vllm_serve"
    if not on_gpu or not gpus:
        return
    per_replica, counted, _ = vram_estimate(manager, entry)
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


def register_admin(app: Any, manager: PoolManager) -> None:
    def row_response(entry: ModelEntry) -> Response:
        return json_response(model_row(manager, entry))

    @app.get("/v1/admin/models")
    async def admin_models() -> Response:
        return json_response({"models": [model_row(manager, e) for e in manager.entries.values()]})

    @app.get("/v1/admin/models/<path:name>")
    async def admin_model(name: str) -> Response:
        return row_response(manager.entry(name))

    @app.post("/v1/admin/models/<path:name>/load")
    async def admin_load(name: str) -> Response:
        entry = manager.entry(name)
        body: LoadRequest = await _body(LoadRequest, code="invalid_load_request")
        backend = manager.backend_of(entry)
        override, replicas = validate_overrides(entry, backend, body)
        if entry.state in ("loaded", "loading") and (override or replicas is not None):
            raise _bad_load(
                f"model {name!r} is {entry.state}; overrides and replicas apply to a new load only: unload first",
                name,
            )
        await check_trained_context(manager, entry, override)
        if entry.state in ("unloaded", "failed") and not body.force:
            gpus, _ = await trio.to_thread.run_sync(gpu.read_gpus)
            _check_gpu_memory(manager, entry, backend, override, replicas or entry.settings.replicas, gpus)
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

    @app.post("/v1/admin/settings/reload")
    async def admin_reload() -> Response:
        result = await manager.reload_from_files()
        log.info("admin reload", extra={"fields": {"action": "reload", **result}})
        return json_response(result)

    @app.get("/v1/admin/gpu-memory")
    async def admin_gpu_memory() -> Response:
        gpus, error = await trio.to_thread.run_sync(gpu.read_gpus)
        models = []
        for entry in manager.entries.values():
            row = model_row(manager, entry)
            models.append({k: row[k] for k in (
                "name", "runtime_state", "is_loaded", "configured_target_inflight", "effective_target_inflight",
                "vram_estimate_mib", "vram_estimate_replica_count", "vram_estimate_source")})
        return json_response(
            {
                "gpus": [{k: v for k, v in msgspec.to_builtins(g).items() if k != "free_mib"} for g in gpus],
                "models": models,
                "error": error,
            }
        )
