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
from llm_pool.pool.api import ModelCapabilities


class _Doc(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class LoadConstraint(_Doc, omit_defaults=True):
    """What a load override accepts (for a form), in the seed's ``runtime-admin-api.md`` shape:
    an integer range (``integer``, or ``integer_or_null`` where null is allowed), a set of values
    (``enum``), or a string (``string_or_null``; ``string`` where null is not allowed, which no
    override field is today); read from the settings Struct's annotations, with the backend
    kind's ``load_constraint_notes`` (``format``, ``examples``, ``null_means``).

    ``default`` is the value a load without this override gets: the configured one, or, where
    that is null and the runtime has a concrete default (GGUF's ``f16`` cache), that default."""

    kind: Literal["integer", "integer_or_null", "enum", "string_or_null", "string"]
    default: Any
    minimum: int | None = None
    maximum: int | None = None
    step: int | None = None
    allowed_values: list[Any] | None = None
    examples: list[Any] | None = None
    #: How the value is written (``ggml_type_name``, ``<bits>|<k_bits>,<v_bits>``).
    format: str | None = None
    #: What null asks for (``fp16``: an unquantised cache).
    null_means: str | None = None
    #: llm-pool's: the regular expression a string value must match.
    pattern: str | None = None


class PairPresets(_Doc):
    """A ``load_recommendations`` entry: presets that set several fields together (K and V
    cache types), each ``{"label": ..., <field>: <value>, ...}``; convenience defaults, not every
    combination the load accepts (``load_constraints`` says that)."""

    kind: Literal["pair_presets"]
    fields: list[str]
    recommended_pairs: list[dict[str, Any]]
    notes: list[str]


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


class EndpointRow(_Doc):
    """A remote endpoint's health (issue 18; ``backends/openai_compatible.py``): its URL (which
    carries no credentials, by validation), never its key."""

    base_url: str
    weight: float
    state: Literal["in_rotation", "ejected"]
    #: Seconds of the ejection left (a passing probe then reinstates it); null in rotation.
    ejected_for_s: float | None
    #: Ejections in a row (each doubles the next one's length).
    ejections: int
    consecutive_failures: int
    last_probe_ok: bool | None
    last_error: str | None


class ReplicaDetail(_Doc):
    name: str
    state: Literal["loading", "serving", "restarting", "retiring", "stopped", "dead"]
    active: int
    capacity: int
    error: str | None
    #: A remote model's endpoint served by this replica (with ``remote_endpoints``), else null.
    endpoint: EndpointRow | None = None


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
    load_recommendations: dict[str, PairPresets]
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
    # capabilities (issue 16)
    #: What the model takes: modalities, file inputs, turns, thinking modes, response formats.
    capabilities: ModelCapabilities
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


# ---------------------------------------------------------------- the status page's charts
class TimelineModel(_Doc):
    """One model's series in ``GET /v1/admin/timeline``, one value per time of ``t``."""

    #: Output tokens of the requests that ended in each interval, over the interval.
    tokens_per_s: list[float]
    #: Requests on a replica / in the queue at each sample.
    running: list[int]
    queued: list[int]
    #: Time to first token of the requests that ended in each interval (null: none did).
    ttft_p50_s: list[float | None]
    ttft_p95_s: list[float | None]
    #: Requests that ended in each interval (refusals at admission included).
    requests: list[int]
    #: Requests that ended with an error, by llm-pool's error code (only codes seen in the window).
    errors: dict[str, list[int]]
    #: The model's memory now: its VRAM estimate (see ``vram_estimate_source``), else null.
    memory_mib: float | None
    memory_source: Literal["observed_load_delta", "model_artifact_size", "unavailable"]


class TimelineGpu(_Doc):
    index: int
    name: str
    #: MiB in use at each time of ``t`` (null where it was not read).
    used_mib: list[int | None]
    total_mib: int


class TimelineReport(_Doc):
    """``GET /v1/admin/timeline``: the server's own ring of samples (the last ``window_s``,
    one every ``interval_s``; the last one is the interval in progress)."""

    interval_s: float
    window_s: float
    #: Unix time (seconds) of each sample, oldest first.
    t: list[float]
    models: dict[str, TimelineModel]
    gpus: list[TimelineGpu]
    #: Why no GPU could be read (no NVIDIA GPU or driver), else null.
    gpu_error: str | None
    #: This server process's resident memory (engine child processes not counted), else null.
    process_rss_mib: float | None


class LogLine(_Doc, forbid_unknown_fields=False):
    """One ``data:`` of ``GET /v1/admin/logs``: a log line's keys as the JSON log writes them
    (``fields`` of the line beside these; paths removed, long text cut)."""

    seq: int
    ts: str
    level: str
    logger: str
    event: str
    request_id: str | None = None
    model: str | None = None


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
