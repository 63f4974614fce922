"""The admin API's answers, as Structs: what ``/v1/admin/*`` serves and ``/openapi.json``
documents are the same objects (:mod:`llm_pool.admin.routes` builds them).

``forbid_unknown_fields``: a test that decodes real answers with them fails on any key they do
not declare.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from llm_pool.config import ModelSettings
from llm_pool.config.settings import Backend


class _Doc(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class LoadConstraint(_Doc, omit_defaults=True):
    """What a load override accepts (for a form): an int range, a set of values, or a string
    matching a pattern; read from the settings Struct's annotations."""

    kind: Literal["int", "enum", "string", "string_or_null"]
    default: Any
    minimum: int | None = None
    maximum: int | None = None
    step: int | None = None
    allowed_values: list[Any] | None = None
    pattern: str | None = None


class FairnessKeyRow(_Doc):
    """One ``fairness_key`` of a loaded model (:mod:`llm_pool.pool.fairness`)."""

    fairness_key: str | None
    pending: int
    active: int
    weight: float
    #: Slot time served (seconds, running jobs' elapsed time included) divided by the weight.
    score: float
    rejected_per_key_limit: int
    rejected_executor_limit: int


class FairnessRow(_Doc):
    rejected_per_key_limit: int
    rejected_executor_limit: int
    keys: list[FairnessKeyRow]


class ReplicaDetail(_Doc):
    name: str
    state: Literal["loading", "serving", "restarting", "retiring", "stopped", "dead"]
    active: int
    capacity: int
    error: str | None


class AdminModel(_Doc):
    """One configured model as the admin API shows it (:func:`llm_pool.admin.routes.model_row`)."""

    name: str
    resolved_backend: Backend
    configured_enabled: bool
    runtime_state: Literal["unloaded", "loading", "loaded", "unloading", "failed"]
    is_loaded: bool
    #: Live replicas when loaded, else the configured count.
    replicas: int
    replica_max: int
    loaded_replicas: int
    #: Queued + running.
    inflight_requests: int
    queue_depth: int
    runtime_inflight: int
    configured_target_inflight: int
    effective_target_inflight: int | None
    last_error: str | None
    vram_estimate_mib: float | None
    vram_estimate_replica_count: int | None
    vram_estimate_source: Literal["observed_load_delta", "model_artifact_size", "unavailable"]
    load_constraints: dict[str, LoadConstraint]
    load_recommendations: dict[str, Any]
    #: The runtime-only override active on the loaded model; ``{}`` when none is.
    load_override: dict[str, Any]
    replica_details: list[ReplicaDetail]
    #: The model's settings as configured (never a secret: keys are named by variable).
    definition: ModelSettings
    #: Remote models: today's spend and remaining budget from the cost ledger.
    remote_cost: dict[str, Any] | None
    #: Fair sharing among fairness keys; null while the model is not loaded.
    fairness: FairnessRow | None
    #: Restart attempts of this model's replicas since it was loaded.
    replica_restarts: int
    #: Seconds until the idle timer unloads the model (null: not counting down).
    idle_unload_in_s: float | None
    load_on_demand: bool
    # -- tuning (issue 21)
    #: Where the replica layout of the current (or last) load came from: ``configured`` (the
    #: settings' count), ``override`` (an admin load's ``replicas``), ``tuned`` (``replicas =
    #: "auto"``: the last ``llm-pool tune`` result for this file, backend, cores and build),
    #: ``default`` (``"auto"`` with no such result: one replica on every core), ``auto`` (not
    #: loaded since the settings asked for ``"auto"``).
    replicas_source: Literal["configured", "override", "tuned", "default", "auto"]


class AdminModels(_Doc):
    models: list[AdminModel]


class ReloadResult(_Doc):
    added_models: list[str]
    removed_models: list[str]
    updated_models: list[str]
    unchanged_models: list[str]
    #: ``[service]`` changed: those settings apply only after a restart.
    service_restart_required: bool


class GpuRow(_Doc):
    index: int
    name: str
    used_mib: int
    total_mib: int
    used_over_total: str


class GpuModelRow(_Doc):
    name: str
    runtime_state: Literal["unloaded", "loading", "loaded", "unloading", "failed"]
    is_loaded: bool
    configured_target_inflight: int
    effective_target_inflight: int | None
    vram_estimate_mib: float | None
    vram_estimate_replica_count: int | None
    vram_estimate_source: Literal["observed_load_delta", "model_artifact_size", "unavailable"]


class GpuMemoryReport(_Doc):
    gpus: list[GpuRow]
    models: list[GpuModelRow]
    #: Why no GPU could be read (no NVIDIA GPU or driver), else null.
    error: str | None


# -- tuning (issue 21): POST/GET/DELETE /v1/admin/models/{name}/tune
class TuneCell(_Doc):
    """One layout at one concurrency."""

    concurrency: int
    tokens_per_s: float
    ttft_p50_ms: float
    requests: int
    zero_token_answers: int


class TuneLayoutRow(_Doc):
    """One layout: ``replicas`` × ``threads`` per replica × ``slots`` per replica on ``engine``."""

    engine: Literal["gguf", "gguf_batched", "llama_server"]
    replicas: int
    threads: int
    slots: int
    cells: list[TuneCell]
    #: Why it has no figures: its load or a request failed, or the time bound came first.
    error: str | None
    skipped: str | None


class TuneBest(_Doc):
    concurrency: int
    engine: Literal["gguf", "gguf_batched", "llama_server"]
    replicas: int
    threads: int
    slots: int
    tokens_per_s: float


class TuneStatus(_Doc):
    """A tune run by the server: its progress, then its table, the best layout per
    concurrency, and the ``pool.toml`` lines to paste (what ``llm-pool tune`` prints)."""

    model: str
    state: Literal["running", "done", "cancelled", "failed"]
    #: Why it failed (its model file is missing...); null otherwise.
    error: str | None
    #: The cores it cuts into layouts (null until it started).
    cores: int | None
    concurrencies: list[int]
    tokens: int
    max_s: float
    started_at: float
    finished_at: float | None
    #: The newest progress lines, oldest first.
    progress: list[str]
    rows: list[TuneLayoutRow]
    best: list[TuneBest]
    #: The table and the lines to paste, as ``llm-pool tune`` prints them.
    report: list[str]
    #: Cut short by its time bound (or a cancel): the figures so far.
    partial: bool
