"""Prometheus metrics: what runs and waits, how each request ended, how long it took.

Names follow vLLM's (``vllm:num_requests_running`` → ``llm_pool:num_requests_running``); every
per-model series is labelled by ``model`` and, with the same value, vLLM's ``model_name`` (so a
vLLM dashboard works once its ``vllm:`` prefix reads ``llm_pool:``), never by replica, and every
configured model has all of its series from the first scrape, at 0.

Cardinality stays bounded: ``model``/``model_name`` take only configured model names (a request
for an unknown model is never given a per-model series), one ``model_name`` per ``model``; the
other labels (``reason``, ``state``, ``finished_reason``, ``status``/``code``) come from fixed sets
of our own; nothing is labelled by replica, client, request or caller-chosen text.

Read from the manager at scrape time (a custom collector, so they are never stale):

=========================================  =====  =================================================
``llm_pool:num_requests_running``          gauge  ``{model}`` requests on a replica now
``llm_pool:num_requests_waiting``          gauge  ``{model}`` requests in the model's queue now
``llm_pool:model_state``                   gauge  ``{model,state}`` 1 for the model's current state
                                                  (unloaded, loading, loaded, unloading, failed)
``llm_pool:loaded_replicas``               gauge  ``{model}`` replicas serving (or draining)
``llm_pool:slot_usage_perc``               gauge  ``{model}`` busy / all slots of live replicas,
                                                  0 to 1 (vLLM's KV-cache usage panel; no
                                                  backend here reports its KV cache)
``llm_pool:gpu_memory_used_bytes``         gauge  ``{gpu,gpu_name}`` per device; absent without
``llm_pool:gpu_memory_total_bytes``        gauge  a visible NVIDIA GPU
``llm_pool:replica_restarts_total``        count  ``{model}`` restart attempts of replicas whose
                                                  worker died (every load together)
=========================================  =====  =================================================

Observed once per request, when it ends (:attr:`pool.manager.PoolManager.job_hooks`):

==============================================  =========  ============================================
``llm_pool:request_outcomes_total``             counter    ``{model,reason}`` see :data:`REASONS`
``llm_pool:request_queue_time_seconds``         histogram  submitted → dispatched to a replica
``llm_pool:time_to_first_token_seconds``        histogram  submitted → first output chunk
``llm_pool:request_inference_time_seconds``     histogram  inside the backend (begin → end)
``llm_pool:e2e_request_latency_seconds``        histogram  submitted → ended, every admitted request
``llm_pool:inter_token_latency_seconds``        histogram  mean gap between output tokens after the
                                                           first, once per request (vLLM's
                                                           request_time_per_output_token)
``llm_pool:request_success_total``              counter    ``{finished_reason}`` stop, length,
                                                           cancelled (vLLM's abort)
``llm_pool:prompt_tokens_total``                counter    as the backend counted them
``llm_pool:generation_tokens_total``            counter    as the backend counted them
``llm_pool:prompt_tokens_cached_total``         counter    prompt tokens the engine's cache already
                                                           held (vLLM's prefix_cache_hits; issue 16)
``llm_pool:fairness_queue_time_seconds``        histogram  submitted → dispatched, ``{model,fairness_key}``
==============================================  =========  ============================================

``fairness_key`` labels are bounded: a key named in ``[engine.fairness] weights`` is its own
label, requests without a key are ``_anonymous``, and every other key is ``_other``.  Keys come
from clients, so a label per key would let any client grow the scrape without bound; the
configured keys are the ones an operator chose to watch (models × (configured keys + 2) series).

Counted when an error answer with a 4xx status leaves the web layer (:meth:`PoolMetrics.refused`):

==============================================  =========  ============================================
``llm_pool:http_refusals_total``                counter    ``{status,code}`` every refusal: 400
                                                           validation, 401, 404 (no route, unknown
                                                           model), 405, 409, 413, 429...; see
                                                           :data:`REFUSALS` (there from the first
                                                           scrape, at 0)
==============================================  =========  ============================================

Its labels are bounded without a ``model``: ``code`` is one of llm-pool's own error codes (a
fixed set, see :mod:`pool.errors`), ``status`` its status; a request for an unknown model is
counted here without naming it.

A request is counted once it reaches admission for a *configured* model: refused there (queue
full, model not loaded, ``allow_remote`` missing, budget) it gets an outcome and nothing else;
admitted, it gets an outcome and an end-to-end latency when it ends, plus a queue time if it
reached a replica and a time to first token if it produced output.  Requests naming an unknown
model (unbounded label values) or refused before admission (malformed body, 401) are not counted.

Each app has its own :class:`prometheus_client.CollectorRegistry` (:class:`PoolMetrics`), never
the process-global one, so any number of apps can live in one process (tests).

This module imports no quart and reads GPUs only through what its caller hands it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from llm_pool.pool.errors import PoolError, without_paths
from llm_pool.pool.jobs import Job
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.tracing import current_id

PREFIX = "llm_pool:"
#: Every per-model series carries the model twice: ``model`` (ours) and ``model_name`` (vLLM's
#: label, so a vLLM dashboard's ``{model_name="..."}`` selectors work once its ``vllm:`` prefix
#: reads ``llm_pool:``).  Same value, so no extra series: cardinality stays one per model.
M = ["model", "model_name"]

#: Every ``reason`` label of ``llm_pool:request_outcomes_total``, and what it means.
REASONS: dict[str, str] = {
    "ok": "finished: end of text, a stop string or max_tokens",
    "cancelled": "503 request_cancelled, or stopped early by its stop flag: the client went away, "
    "or an unload/resize/shutdown cancelled it past its drain",
    "rejected_queue_full": "429 executor_queue_full or fairness_key_queue_full at admission",
    "queue_timeout": "503 queue_timeout: waited longer than queue_timeout_s",
    "backend_error": "502 backend_error: the runtime failed or died",
    "upstream_error": "upstream_* (502/504/429): the remote API failed",
    "model_unavailable": "409 model_not_loaded/loading/unloading/failed at admission, or "
    "model_unloading for a request still queued when its model began unloading",
    "shutting_down": "503 shutting_down: refused, or still queued, when the server began stopping",
    "rejected_remote_disallowed": "403 remote_execution_disallowed at admission",
    "rejected_budget": "request_cost_exceeds_max, budget_exceeded or cost_ledger_unavailable at "
    "admission (remote models with a budget)",
    "invalid_request": "400 invalid_request from the backend (e.g. a prompt longer than the context), "
    "or 403 priority_not_allowed at admission",
    "error": "any other error (a bug if it shows up)",
}

#: The refusals every scrape shows from the start (others appear when first seen): status → codes.
REFUSALS: dict[int, tuple[str, ...]] = {
    400: ("invalid_request",),
    401: ("unauthorized",),
    404: ("not_found", "unknown_model"),
    413: ("payload_too_large",),
    429: ("executor_queue_full",),
}

_REASON_OF_CODE = {
    "request_cancelled": "cancelled",
    "executor_queue_full": "rejected_queue_full",
    "fairness_key_queue_full": "rejected_queue_full",
    "priority_not_allowed": "invalid_request",
    "queue_timeout": "queue_timeout",
    "backend_error": "backend_error",
    "model_not_loaded": "model_unavailable",
    "model_loading": "model_unavailable",
    "model_unloading": "model_unavailable",
    "model_failed": "model_unavailable",
    "shutting_down": "shutting_down",
    "remote_execution_disallowed": "rejected_remote_disallowed",
    "request_cost_exceeds_max": "rejected_budget",
    "budget_exceeded": "rejected_budget",
    "cost_ledger_unavailable": "rejected_budget",
    "invalid_request": "invalid_request",
}

STATES = ("unloaded", "loading", "loaded", "unloading", "failed")

# Buckets in seconds: local CPU models answer in tens of ms to minutes; queues can be long.
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
#: ``finished_reason`` of ``llm_pool:request_success_total`` (vLLM's label; ``cancelled`` is its ``abort``).
FINISH_REASONS = ("stop", "length", "cancelled")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)

MIB = 2**20


class GpuMemory(Protocol):
    """What :func:`admin.gpu.read_gpus` returns per device (only these fields are read)."""

    index: int
    name: str
    used_mib: int
    total_mib: int


def outcome_reason(job: Job, error: PoolError | None) -> str:
    """The ``reason`` label for a request that ended (or was refused) with ``error``."""
    if error is None:
        stats = job.stats
        return "cancelled" if stats is not None and stats.finish_reason == "cancelled" else "ok"
    if error.code.startswith("upstream_"):
        return "upstream_error"
    return _REASON_OF_CODE.get(error.code, "error")


class PoolStateCollector(Collector):
    """The gauges read from the manager at scrape time (and the GPU snapshot handed in)."""

    def __init__(self, manager: PoolManager) -> None:
        self.manager = manager
        #: Set right before each scrape by :meth:`PoolMetrics.render`.
        self.gpus: Sequence[GpuMemory] = ()

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(PREFIX + "num_requests_running", "Requests running on a replica.", labels=M)
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting in the model's queue.", labels=M)
        state = GaugeMetricFamily(
            PREFIX + "model_state", "1 for the model's current state, 0 for the others.", labels=[*M, "state"]
        )
        replicas = GaugeMetricFamily(
            PREFIX + "loaded_replicas", "Replicas serving the model (draining ones included).", labels=M
        )
        slots = GaugeMetricFamily(
            PREFIX + "slot_usage_perc", "Busy slots over all slots of the live replicas (0 to 1).", labels=M
        )
        restarts = CounterMetricFamily(
            PREFIX + "replica_restarts", "Restart attempts of replicas whose worker died.", labels=M
        )
        for name, entry in sorted(self.manager.entries.items()):
            rt = entry.runtime
            running.add_metric([name, name], rt.running if rt else 0)
            waiting.add_metric([name, name], rt.waiting if rt else 0)
            for s in STATES:
                state.add_metric([name, name, s], 1.0 if entry.state == s else 0.0)
            live = [r for r in rt.replicas if r.state in ("serving", "retiring")] if rt else []
            replicas.add_metric([name, name], len(live))
            capacity = sum(r.capacity for r in live)
            slots.add_metric([name, name], sum(r.active for r in live) / capacity if capacity else 0.0)
            restarts.add_metric([name, name], entry.replica_restarts)
        yield from (running, waiting, state, replicas, slots, restarts)
        if self.gpus:
            used = GaugeMetricFamily(PREFIX + "gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=["gpu", "gpu_name"])
            total = GaugeMetricFamily(PREFIX + "gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=["gpu", "gpu_name"])
            for g in self.gpus:
                used.add_metric([str(g.index), g.name], g.used_mib * MIB)
                total.add_metric([str(g.index), g.name], g.total_mib * MIB)
            yield from (used, total)


@dataclass(frozen=True)
class _ModelSeries:
    outcomes: dict[str, Any]
    e2e: Any
    queue_time: Any
    ttft: Any
    inference: Any
    prompt_tokens: Any
    generation_tokens: Any
    itl: Any
    cached_prompt_tokens: Any = None  # prompt cache (issue 16)


class PoolMetrics:
    """One app's metrics: its registry, the per-request series, and the state collector.

    Creating it subscribes :meth:`observe` to ``manager.job_hooks``.
    """

    def __init__(self, manager: PoolManager) -> None:
        self.manager = manager
        self.registry = CollectorRegistry()
        r = self.registry
        self.outcomes = Counter(
            PREFIX + "request_outcomes", "Requests by how they ended (see REASONS).", [*M, "reason"], registry=r
        )
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds", "Submitted to dispatched to a replica.", M,
            buckets=QUEUE_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Submitted to the first output chunk.", M,
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.inference = Histogram(
            PREFIX + "request_inference_time_seconds", "Time inside the backend.", M,
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Submitted to ended, for every admitted request.", M,
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.fair_queue_time = Histogram(
            PREFIX + "fairness_queue_time_seconds", "Submitted to dispatched, per fairness key (bounded).",
            [*M, "fairness_key"], buckets=QUEUE_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Mean time between output tokens after the first, one observation per request.", M,
            buckets=ITL_BUCKETS, registry=r,
        )
        self.finished = Counter(
            PREFIX + "request_success", "Requests that finished, by finish reason.", [*M, "finished_reason"], registry=r
        )
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed.", M, registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", M, registry=r)
        # prompt cache (issue 16)
        self.cached_prompt_tokens = Counter(
            PREFIX + "prompt_tokens_cached", "Prompt tokens the engine's cache already held.", M, registry=r
        )
        self.refusals = Counter(
            PREFIX + "http_refusals", "Error answers with a 4xx status, by status and code.", ["status", "code"], registry=r
        )
        for status, codes in REFUSALS.items():
            for code in codes:
                self.refusals.labels(str(status), code)
        self.state = PoolStateCollector(manager)
        r.register(self.state)
        #: Each model's label children, looked up once: ``labels()`` costs ~10 µs a call, on the
        #: event loop, several times per request.
        self._series: dict[str, _ModelSeries] = {}
        manager.job_hooks.append(self.observe)

    def _of(self, model: str) -> _ModelSeries:
        series = self._series.get(model)
        if series is None:
            series = self._series[model] = _ModelSeries(
                outcomes={reason: self.outcomes.labels(model, model, reason) for reason in REASONS},
                e2e=self.e2e.labels(model, model),
                queue_time=self.queue_time.labels(model, model),
                ttft=self.ttft.labels(model, model),
                inference=self.inference.labels(model, model),
                prompt_tokens=self.prompt_tokens.labels(model, model),
                generation_tokens=self.generation_tokens.labels(model, model),
                itl=self.itl.labels(model, model),
                cached_prompt_tokens=self.cached_prompt_tokens.labels(model, model),
            )
        return series

    def observe(self, job: Job, error: PoolError | None) -> None:
        """Count one request that ended, or that admission refused (``job.ended`` False)."""
        model = job.request.model
        series = self._of(model)
        reason = outcome_reason(job, error)
        (series.outcomes.get(reason) or self.outcomes.labels(model, model, reason)).inc()
        if not job.ended or job.t_done is None:  # refused at admission: never queued
            return
        start = job.t_submitted
        series.e2e.observe(job.t_done - start)
        if job.t_dispatched is not None:
            series.queue_time.observe(job.t_dispatched - start)
            self.fair_queue_time.labels(model, model, self.key_label(job.request.fairness_key)).observe(job.t_dispatched - start)
        if job.t_first_output is not None:
            series.ttft.observe(job.t_first_output - start)
        if job.t_dispatched is not None and job.t_backend_begin is not None and job.t_backend_end is not None:
            series.inference.observe(job.t_backend_end - job.t_backend_begin)
        stats = job.stats
        if stats is not None:
            series.prompt_tokens.inc(stats.prompt_tokens or 0)
            series.generation_tokens.inc(stats.output_tokens or 0)
            series.cached_prompt_tokens.inc(stats.cached_prompt_tokens or 0)
            if error is None:
                self.finished.labels(model, model, stats.finish_reason).inc()
            n, decode_ms = stats.output_tokens, stats.decode_after_first_token_ms
            if n is not None and n > 1 and decode_ms is not None:
                series.itl.observe(decode_ms / 1000.0 / (n - 1))

    def refused(self, status: int, code: str) -> None:
        """Count one refusal (an error answer with a 4xx status)."""
        self.refusals.labels(str(status), code).inc()

    def key_label(self, key: str | None) -> str:
        """The bounded ``fairness_key`` label (see the module docstring)."""
        if key is None:
            return "_anonymous"
        return key if key in self.manager.settings.engine.fairness.weights else "_other"

    def _zero_series(self, models: Iterable[str]) -> None:
        """Every configured model gets every series (at 0), so ``rate()`` works from the start."""
        for model in models:
            for reason in REASONS:
                self.outcomes.labels(model, model, reason)
            for metric in (self.queue_time, self.ttft, self.inference, self.e2e, self.prompt_tokens, self.generation_tokens, self.itl,
                           self.cached_prompt_tokens):
                metric.labels(model, model)
            for reason in FINISH_REASONS:
                self.finished.labels(model, model, reason)

    def render(self, accept: str | None = None, gpus: Sequence[GpuMemory] = ()) -> tuple[bytes, str]:
        """The exposition for an ``Accept`` header (Prometheus text, or OpenMetrics when asked
        for) and its content type.  ``gpus``: this scrape's GPU readings (none: no GPU series)."""
        self._zero_series(self.manager.entries)
        self.state.gpus = gpus
        encoder, content_type = choose_encoder(accept or "")
        try:
            return encoder(self.registry), content_type
        finally:
            self.state.gpus = ()


# ------------------------------------------------------------------ the status page's timeline
#: The status page's charts: one sample every :data:`TIMELINE_INTERVAL_S`, the last
#: :data:`TIMELINE_WINDOW_S` of them kept (180 samples; no external Prometheus needed).
TIMELINE_INTERVAL_S = 5.0
TIMELINE_WINDOW_S = 900.0
#: Times to first token kept per model and interval for its percentiles; more in one interval
#: are not kept (bounded memory, whatever the traffic).
TTFT_KEPT = 2048


@dataclass
class _Interval:
    """What one model's requests did since the last sample (filled by :meth:`Timeline.observe`)."""

    output_tokens: int = 0
    requests: int = 0
    ttfts: list[float] | None = None
    errors: dict[str, int] | None = None


@dataclass(frozen=True)
class ModelSample:
    tokens_per_s: float
    running: int
    queued: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    #: Requests that ended in the interval (refusals at admission included).
    requests: int
    #: Requests that ended with an error, by llm-pool's error code.
    errors: dict[str, int]


@dataclass(frozen=True)
class Sample:
    #: trio time (:func:`trio.current_time`) at the end of the interval.
    t: float
    models: dict[str, ModelSample]
    #: ``(index, name, used_mib, total_mib)`` per GPU read at that time (none without NVML).
    gpus: tuple[tuple[int, str, int, int], ...]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


class Timeline:
    """A ring of the last :data:`TIMELINE_WINDOW_S` of per-model samples for the status page's
    charts: output tokens/s (tokens of the requests that ended in the interval, over the
    interval), requests running and queued at the sample, TTFT p50/p95 of the requests that ended
    in the interval, errors by code; and each GPU's memory.

    Memory is bounded: ``window_s / interval_s`` samples, each holding configured models only
    (names come from the settings, never from a request), error codes from llm-pool's own fixed
    set, and at most :data:`TTFT_KEPT` times per model between two samples.

    :meth:`observe` is a ``manager.job_hooks`` hook; :meth:`run` samples every ``interval_s``
    (``pool.server.serve`` runs it); :meth:`snapshot` adds the interval in progress, so a chart
    shows a request at once."""

    def __init__(self, manager: PoolManager, *, interval_s: float = TIMELINE_INTERVAL_S, window_s: float = TIMELINE_WINDOW_S) -> None:
        self.manager = manager
        self.interval_s = interval_s
        self.window_s = window_s
        self.samples: deque[Sample] = deque(maxlen=max(1, int(window_s / interval_s)))
        self._open: dict[str, _Interval] = {}
        self._since: float | None = None
        manager.job_hooks.append(self.observe)

    def observe(self, job: Job, error: PoolError | None) -> None:
        model = job.request.model
        if model not in self.manager.entries:
            return
        acc = self._open.setdefault(model, _Interval())
        acc.requests += 1
        if error is not None:
            acc.errors = acc.errors or {}
            acc.errors[error.code] = acc.errors.get(error.code, 0) + 1
        if job.stats is not None:
            acc.output_tokens += job.stats.output_tokens or 0
        if job.t_first_output is not None:
            acc.ttfts = acc.ttfts if acc.ttfts is not None else []
            if len(acc.ttfts) < TTFT_KEPT:
                acc.ttfts.append(job.t_first_output - job.t_submitted)

    def _current(self, now: float, gpus: Sequence[GpuMemory]) -> Sample:
        since = self._since if self._since is not None else now - self.interval_s
        span = max(now - since, 1.0)  # an interval just begun: no spike from one request
        models = {}
        for name, entry in sorted(self.manager.entries.items()):
            acc = self._open.get(name) or _Interval()
            rt = entry.runtime
            ttfts = acc.ttfts or []
            models[name] = ModelSample(
                tokens_per_s=round(acc.output_tokens / span, 3),
                running=rt.running if rt else 0,
                queued=rt.waiting if rt else 0,
                ttft_p50_s=percentile(ttfts, 0.5),
                ttft_p95_s=percentile(ttfts, 0.95),
                requests=acc.requests,
                errors=dict(acc.errors or {}),
            )
        return Sample(now, models, tuple((g.index, g.name, g.used_mib, g.total_mib) for g in gpus))

    def sample(self, gpus: Sequence[GpuMemory] = ()) -> Sample:
        """Close the interval in progress: one sample into the ring (the oldest falls out)."""
        now = trio.current_time()
        sample = self._current(now, gpus)
        self.samples.append(sample)
        self._open.clear()
        self._since = now
        return sample

    def snapshot(self, gpus: Sequence[GpuMemory] = ()) -> tuple[list[Sample], float]:
        """The samples, oldest first, then the interval in progress (with ``gpus``, read now),
        and the trio time now."""
        now = trio.current_time()
        out = list(self.samples)
        if (self._since is not None or self._open) and (not out or now > out[-1].t):
            out.append(self._current(now, gpus))
        return out, now

    async def run(self, read_gpus: Callable[[], tuple[Sequence[GpuMemory], str | None]] | None = None) -> None:
        """Sample every ``interval_s`` until cancelled; ``read_gpus`` (``admin.gpu.read_gpus``)
        runs on a worker thread."""
        self._since = trio.current_time()
        while True:
            await trio.sleep(self.interval_s)
            gpus: Sequence[GpuMemory] = ()
            if read_gpus is not None:
                gpus, _ = await trio.to_thread.run_sync(read_gpus)
            self.sample(gpus)


def process_rss_mib() -> float | None:
    """This server process's resident memory (Linux ``/proc/self/statm``), else None.  Engine
    child processes (llama-server, vLLM) are not counted."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB, 1)


# ------------------------------------------------------------------ the status page's log tail
#: Recent log lines kept for ``GET /v1/admin/logs`` and the longest text kept of each value.
LOG_RING_LINES = 500
LOG_VALUE_CHARS = 2000
#: Concurrent followers of the log tail; one more gets 429.
LOG_FOLLOWERS = 16


def _shown_value(value: Any) -> Any:
    """A log value as the tail shows it: text without filesystem paths, cut at
    :data:`LOG_VALUE_CHARS`; containers value by value."""
    if isinstance(value, str):
        text = without_paths(value)
        return text if len(text) <= LOG_VALUE_CHARS else text[:LOG_VALUE_CHARS] + "…"
    if isinstance(value, dict):
        return {str(k): _shown_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shown_value(v) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _shown_value(str(value))


class LogRing(logging.Handler):
    """The last :data:`LOG_RING_LINES` log records of the ``llm_pool`` loggers, as the JSON log
    line's keys (``ts``, ``level``, ``logger``, ``event``, ``request_id``, the line's fields;
    an exception only by its type), each numbered, for the status page's live tail.  Access
    lines are kept only for answers with an error status (the status page alone polls several
    URLs every 2 s: its lines would push the inference lines out).

    Records may come from any thread; a follower (:meth:`follow`, in a trio task) is woken
    through its trio token.  Nothing here is written to disk; text values lose their paths."""

    def __init__(self, capacity: int = LOG_RING_LINES) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: deque[tuple[int, dict[str, Any]]] = deque(maxlen=capacity)
        self.last = 0
        self._guard = threading.Lock()
        self._followers: dict[object, tuple[Any, trio.Event]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if record.name == "llm_pool.access" and isinstance(fields, dict) and isinstance(fields.get("status"), int) and fields["status"] < 400:
            return  # a page that polls would push the inference lines out; errors stay
        try:
            line: dict[str, Any] = {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(),
                "logger": record.name,
                "event": _shown_value(record.getMessage()),
            }
            request_id = getattr(record, "request_id", None) or current_id()
            if request_id is not None:
                line["request_id"] = request_id
            if isinstance(fields, dict):
                line.update(_shown_value(fields))
            if record.exc_info and record.exc_info[0] is not None:
                line["exception"] = record.exc_info[0].__name__
        except Exception:  # noqa: BLE001 - a log line must never break its writer
            self.handleError(record)
            return
        with self._guard:
            self.last += 1
            self.lines.append((self.last, line))
            followers = list(self._followers.values())
        for token, event in followers:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

    def since(self, after: int, model: str | None = None) -> list[tuple[int, dict[str, Any]]]:
        """The lines numbered above ``after`` (of ``model`` only, when given), oldest first."""
        with self._guard:
            lines = [item for item in self.lines if item[0] > after]
        return [item for item in lines if model is None or item[1].get("model") == model]

    def check_room(self) -> None:
        """429 ``log_tail_busy`` when :data:`LOG_FOLLOWERS` tails are open."""
        with self._guard:
            if len(self._followers) >= LOG_FOLLOWERS:
                raise PoolError(429, "log_tail_busy", f"at most {LOG_FOLLOWERS} log tails may be open at once")

    def start_after(self, backlog: int) -> int:
        """The number to follow from so that the last ``backlog`` lines come first."""
        with self._guard:
            return max(0, self.last - backlog) if self.lines else self.last

    async def follow(self, after: int, model: str | None = None, *, idle_s: float = 15.0) -> AsyncIterator[list[tuple[int, dict[str, Any]]]]:
        """Batches of new lines as they are written; an empty batch after ``idle_s`` without
        one (a keep-alive).  Ends at once past :data:`LOG_FOLLOWERS` followers (the route
        refuses those with :meth:`check_room` first)."""
        key = object()
        token = trio.lowlevel.current_trio_token()
        with self._guard:
            if len(self._followers) >= LOG_FOLLOWERS:
                return
            self._followers[key] = (token, trio.Event())
        try:
            while True:
                event = trio.Event()
                with self._guard:
                    self._followers[key] = (token, event)
                batch = self.since(after, model)
                if not batch:
                    with trio.move_on_after(idle_s):
                        await event.wait()
                    batch = self.since(after, model)
                if batch:
                    after = batch[-1][0]
                else:
                    with self._guard:
                        after = max(after, self.last)
                yield batch
        finally:
            with self._guard:
                self._followers.pop(key, None)


#: The process's one ring (the ``logging`` module's loggers are process-wide too), attached to
#: the ``llm_pool`` logger by :func:`log_ring`.
_LOG_RING = LogRing()


def log_ring() -> LogRing:
    """The process's :class:`LogRing`, attached to the ``llm_pool`` logger (once)."""
    logger = logging.getLogger("llm_pool")
    if _LOG_RING not in logger.handlers:
        logger.addHandler(_LOG_RING)
    return _LOG_RING
