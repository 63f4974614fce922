"""The pool manager: owns every configured model, its state, and its runtime.

States: ``unloaded → loading → loaded → unloading → unloaded``, and ``failed`` (with
``last_error``) when a load fails or every replica died.  A model never stays in ``loading`` or
``unloading`` after an error: each transition is made in a ``finally``.

All admin operations (load, unload, resize, reload) and admission of inference jobs go through
here; HTTP routes only decode, call and encode.  Each model's lifetime is one task in the
manager's nursery (running :meth:`ModelRuntime.run`), so a client that disconnects from an admin
call never interrupts a load.

Idle unload (Ollama's keep-alive): a model with ``idle_unload_after_s`` is unloaded once it has
had no queued or running request for that long.  The timer starts when the model becomes
``loaded`` (by autoload or an admin load alike) and again whenever its last request ends; a
request arriving, a resize in progress or any state change stops it.  It is one task per loaded
model in the manager's nursery (:meth:`PoolManager._unload_when_idle`), gone with the load.

Load on demand (``load_on_demand = true``): a request for the model while it is unloaded,
failed or loading waits in the model's on-demand list (its ``max_queue`` and
``queue_timeout_s`` apply) and starts the load if none runs; once loaded, the list goes into the
model's queue in arrival order, and a failed load fails it (502).  Several requests make one
load.

The budget (``engine.max_loaded_models``, ``engine.max_loaded_memory_mib`` against
:meth:`PoolManager.memory_estimate`, and ``engine.groups``) holds for every load but the startup
autoload of enabled models: before a load on demand or an admin load, the least recently used
*idle* loaded models (nothing queued or running, no resize) are unloaded until the new one fits;
when idle models cannot make room the request (or the admin call) gets 503
``pool_capacity_exhausted`` at once, and the model stays unloaded.  A model that gets a request
while a load waits to evict it is not evicted (victims are chosen again before each unload).
With ``idle_unload_after_s`` this is Ollama's keep-alive:
the admin row's ``idle_unload_in_s`` is the countdown.

This module must not import quart.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import trio

from llm_pool.backends import BackendContext, create_backend, kind_of
from llm_pool.backends.base import Admits, Backend
from llm_pool.config import ModelSettings, Settings, SettingsError, load_settings, resolve_model_path
from llm_pool.pool.errors import (
    PoolError,
    backend_error,
    model_unloading,
    pool_capacity_exhausted,
    printable,
    queue_full,
    request_cancelled,
    shutting_down,
    unknown_model,
    without_paths,
)
from llm_pool.pool.jobs import Job
from llm_pool.pool.scheduler import LoadFailed, ModelRuntime
from llm_pool.pool.tuning import Engine, ReplicasSource, TuneError, TuneJob, cores_for, resolve_auto, tunable

log = logging.getLogger("llm_pool.manager")

State = Literal["unloaded", "loading", "loaded", "unloading", "failed"]
#: Admission errors that a model with ``load_on_demand`` answers by loading instead.
_ON_DEMAND_CODES = frozenset({"model_not_loaded", "model_failed", "model_loading"})
BackendFactory = Callable[[BackendContext], Backend]


class ModelEntry:
    """A configured model and what the pool knows about it right now."""

    def __init__(self, name: str, settings: ModelSettings) -> None:
        self.name = name
        self.settings = settings
        self.state: State = "unloaded"
        self.runtime: ModelRuntime | None = None
        self._last_error: str | None = None
        #: Runtime-only overrides of the current load (never written to the config files); None
        #: once that load ended (unloaded or failed): no override is active then.
        self.override: dict[str, Any] | None = None
        self.loaded_settings: ModelSettings | None = None
        self.load_done = trio.Event()
        self.unload_done = trio.Event()
        #: Resizes of one model run one at a time (two at once would retire/remove the same replica).
        self.resize_lock = trio.Lock()
        self.loaded_at: float | None = None
        #: True when a loaded model failed because every replica died (not at load).
        self.failed_while_serving = False
        #: GPU memory delta observed during the last load (kept across unload).
        self.observed_vram_mib: float | None = None
        self.observed_vram_replicas: int | None = None
        #: Requests admitted and not ended yet (queued or running): what idle unload watches.
        self.pending_jobs = 0
        #: Set (and replaced) whenever ``pending_jobs``, the state or a resize changes.
        self.activity = trio.Event()
        #: Requests waiting for a load on demand (module docstring), in arrival order.
        self.on_demand: list[Job] = []
        #: When a request last arrived or ended (monotonic): the least recently used idle model
        #: is evicted first.
        self.last_used = 0.0
        #: trio time at which the idle timer unloads the model; None while it is not counting.
        self.idle_deadline: float | None = None
        #: Restart attempts of its replicas whose worker died, over every load (a counter).
        self.replica_restarts = 0
        #: Whether the model is meant to be serving now, what readiness counts: enabled models
        #: from the start; an admin load sets it, an admin or idle unload clears it.
        self.wanted = settings.enabled
        #: Why the last load was refused before it began (the budget: 503), or None.
        self.refused: PoolError | None = None
        # -- tuning (issue 21)
        #: Where the current (or last) load's replica layout came from: the settings
        #: (``configured``), an admin load's ``replicas`` (``override``), or for ``replicas =
        #: "auto"`` the tuning cache (``tuned``) or the safe default (``default``); ``auto`` until
        #: such a model was first loaded.
        self.replicas_source: ReplicasSource = "auto" if settings.replicas == "auto" else "configured"

    @property
    def last_error(self) -> str | None:
        """Why the last load failed or the model died; one printable line (see
        :func:`pool.errors.printable`), whole for the admin API, shown elsewhere without paths."""
        return self._last_error

    @last_error.setter
    def last_error(self, text: str | None) -> None:
        self._last_error = None if text is None else printable(text)

    def count_restart(self) -> None:
        """A replica of this model began a restart attempt (``llm_pool:replica_restarts_total``)."""
        self.replica_restarts += 1

    def touch(self) -> None:
        """Wake whoever waits on :attr:`activity` (the idle-unload timer)."""
        self.activity.set()
        self.activity = trio.Event()


class PoolManager:
    """See the module docstring.  Use as ``await nursery.start(manager.run)``."""

    def __init__(
        self,
        settings: Settings,
        *,
        backend_factory: BackendFactory = create_backend,
        config_path: str | None = None,
    ) -> None:
        self.settings = settings
        #: What ``POST /v1/admin/settings/reload`` re-reads (None: the default lookup).
        self.config_path = config_path
        self.backend_factory = backend_factory
        self.entries: dict[str, ModelEntry] = {
            name: ModelEntry(name, m) for name, m in settings.engine.models.items()
        }
        self.shutting_down = False
        self._nursery: trio.Nursery | None = None
        #: Called as ``hook(entry, before, after)`` on every state change (metrics, logs).
        self.state_hooks: list[Callable[[ModelEntry, State, State], None]] = []
        #: Called as ``hook(job, error)`` once per request that reached admission for a
        #: configured model: when admission refuses it (``error`` set and ``job.ended`` False: it
        #: never queued), else when it ends, however (see :attr:`pool.jobs.Job.on_end`).
        #: The one place request outcomes are seen (metrics).
        self.job_hooks: list[Callable[[Job, PoolError | None], None]] = []
        #: Measures GPU memory for load deltas; None where no GPU is visible.
        self.gpu_used_mib: Callable[[], float | None] = lambda: None
        # -- tuning (issue 21)
        #: The last tune of each model run by this server (one runs at a time).
        self.tunes: dict[str, TuneJob] = {}

    # ------------------------------------------------------------------ lifetime
    async def run(self, *, autoload: bool = True, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Own the models' nursery; load enabled models in the background; run until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if autoload:
                for entry in self.entries.values():
                    if entry.settings.enabled:
                        self._start_load(entry, None, entry.settings.replicas)
            task_status.started()
            await trio.sleep_forever()

    def _set_state(self, entry: ModelEntry, state: State) -> None:
        before, entry.state = entry.state, state
        if before != state:
            entry.touch()
            for hook in self.state_hooks:
                hook(entry, before, state)

    def _run_job_hooks(self, job: Job, error: PoolError | None) -> None:
        for hook in self.job_hooks:
            try:
                hook(job, error)
            except Exception:  # a metrics bug must never fail a request
                log.exception("job hook %r failed", hook)

    # ------------------------------------------------------------------ queries
    def entry(self, name: str) -> ModelEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise unknown_model(name) from None

    def loaded_models(self) -> list[str]:
        return sorted(name for name, e in self.entries.items() if e.state == "loaded")

    def ready(self) -> bool:
        """Not shutting down, and every model meant to be serving now is loaded (see
        :attr:`ModelEntry.wanted`: a model unloaded on purpose is no readiness failure)."""
        return not self.shutting_down and all(e.state == "loaded" for e in self.entries.values() if e.wanted)

    # ------------------------------------------------------------------ admission
    def check_admission(self, name: str, *, allow_remote: bool) -> ModelEntry:
        """Raise the error a request to ``name`` gets right now, if any (no side effects)."""
        entry = self.entry(name)
        if self.shutting_down:
            raise shutting_down()
        if kind_of(entry.settings).remote and not allow_remote:
            raise PoolError(
                403,
                "remote_execution_disallowed",
                f"model {name!r} runs on a remote API; set allow_remote: true to use it",
                model=name,
                param="allow_remote",
            )
        if entry.state == "loaded" and entry.runtime is not None:
            return entry
        if entry.state == "loading":
            raise PoolError(409, "model_loading", f"model {name!r} is loading", model=name)
        if entry.state == "unloading":
            raise model_unloading(name)
        if entry.state == "failed":
            raise PoolError(
                409,
                "model_failed",
                f"model {name!r} failed {'while serving' if entry.failed_while_serving else 'to load'}: "
                f"{without_paths(entry.last_error or '')}",
                model=name,
            )
        raise PoolError(409, "model_not_loaded", f"model {name!r} is not loaded", model=name)

    def submit(self, job: Job, *, allow_remote: bool) -> ModelEntry:
        """Admit ``job`` to its model's queue, or raise the reason it can't be.

        A backend that :class:`~llm_pool.backends.base.Admits` wraps the queueing in its own
        admission; the remote backend reserves the request's cost there (400/429 before the queue).
        """
        try:
            try:
                entry = self.check_admission(job.request.model, allow_remote=allow_remote)
            except PoolError as e:
                entry = self.entries[job.request.model] if job.request.model in self.entries else None  # type: ignore[assignment]
                if entry is None or not entry.settings.load_on_demand or e.code not in _ON_DEMAND_CODES:
                    raise
                self._wait_for_load(entry, job)
            else:
                self._enqueue(entry, job)
        except PoolError as e:
            if job.request.model in self.entries:  # never a label per unknown name
                self._run_job_hooks(job, e)
            raise
        # queued: nothing can end it before this synchronous code returns
        entry.pending_jobs += 1
        entry.last_used = time.monotonic()
        entry.touch()
        job.on_end.append(functools.partial(self._job_ended, entry))
        return entry

    def _enqueue(self, entry: ModelEntry, job: Job) -> None:
        assert entry.runtime is not None
        admit = next((r.backend.admit for r in entry.runtime.serving_replicas if isinstance(r.backend, Admits)), None)
        if admit is not None:
            admit(job, entry.runtime.submit_nowait)
        else:
            entry.runtime.submit_nowait(job)

    def _job_ended(self, entry: ModelEntry, job: Job, error: PoolError | None) -> None:
        entry.pending_jobs -= 1
        entry.last_used = time.monotonic()
        entry.touch()
        self._run_job_hooks(job, error)

    # ------------------------------------------------------------------ load on demand
    def _wait_for_load(self, entry: ModelEntry, job: Job) -> None:
        """Put ``job`` in ``entry``'s on-demand list, starting the load (after evictions) unless
        one runs; raises 429 (list full) or 503 ``pool_capacity_exhausted``."""
        if len(entry.on_demand) >= entry.settings.max_queue:
            raise queue_full(entry.name, entry.settings.max_queue)
        if entry.state in ("unloaded", "failed"):
            self._begin_load(entry, None, entry.settings.replicas)

        def cancelled(job: Job) -> None:
            if job in entry.on_demand:
                entry.on_demand.remove(job)

        job.on_cancel_queued = cancelled
        entry.on_demand.append(job)

    def _begin_load(self, entry: ModelEntry, override: dict[str, Any] | None, replicas: int) -> None:
        """Start loading ``entry`` within the pool's budget: 503 ``pool_capacity_exhausted`` now
        when idle models cannot make room; else ``loading`` at once, and a task unloads what must
        go, then loads.  Every load but the startup autoload comes this way (on demand and admin)."""
        self.evictions_for(entry)  # raises 503 when idle models cannot make room
        entry.load_done = trio.Event()
        entry.last_error = None
        entry.refused = None
        self._set_state(entry, "loading")
        assert self._nursery is not None
        self._nursery.start_soon(self._evict_then_load, entry, override, replicas, name=f"load {entry.name}")

    async def _evict_then_load(self, entry: ModelEntry, override: dict[str, Any] | None, replicas: int) -> None:
        """Unload idle models until ``entry`` fits the budget, then load it.  The victims are
        chosen again before each unload, and :meth:`unload` marks its model ``unloading`` before
        it yields: a model that got a request since the load began is never evicted under it
        (another idle one goes, or the load is refused with 503)."""
        try:
            while victims := self.evictions_for(entry):
                log.info("evict", extra={"fields": {"action": "evict", "model": victims[0].name, "for": entry.name}})
                await self.unload(victims[0].name)
            self._start_load(entry, override, replicas)
        except PoolError as e:  # nothing of this model was loaded: it stays unloaded, its waiters get the 503
            entry.refused = e
            self._set_state(entry, "unloaded")
            entry.load_done.set()
            self._flush_on_demand(entry)
        except BaseException:
            self._set_state(entry, "failed")
            entry.last_error = entry.last_error or "the load did not start"
            entry.load_done.set()
            self._flush_on_demand(entry)
            raise

    def _flush_on_demand(self, entry: ModelEntry) -> None:
        """The load ended: waiting requests go into the queue, in arrival order, or fail."""
        waiting, entry.on_demand = entry.on_demand, []
        for job in waiting:
            job.on_cancel_queued = None
            if job.state != "queued":
                continue
            try:
                if entry.refused is not None:
                    raise entry.refused
                if entry.state != "loaded" or entry.runtime is None:
                    raise backend_error(entry.name, f"load on demand failed: {entry.last_error}")
                self._enqueue(entry, job)
            except PoolError as e:
                job.cancel(e)

    def evictions_for(self, entry: ModelEntry) -> list[ModelEntry]:
        """The idle loaded models to unload, least recently used first, so that loading
        ``entry`` fits ``engine.max_loaded_models``, ``engine.max_loaded_memory_mib`` and
        ``engine.groups``; 503 ``pool_capacity_exhausted`` when idle models are not enough."""
        engine = self.settings.engine
        others = [e for e in self.entries.values() if e is not entry and e.state in ("loaded", "loading", "unloading")]
        idle = sorted(
            (e for e in others if e.state == "loaded" and not e.pending_jobs and not e.resize_lock.locked() and not e.on_demand),
            key=lambda e: e.last_used,
        )
        mine = {g for g, members in engine.groups.items() if entry.name in members}
        victims: list[ModelEntry] = []
        if mine:  # llama-swap's exclusive groups: only models sharing a group stay loaded
            victims = [e for e in idle if not any(e.name in engine.groups[g] for g in mine)]
        staying = [e for e in others if e not in victims]
        spare = [e for e in idle if e not in victims]

        def over() -> str | None:
            if engine.max_loaded_models is not None and len(staying) + 1 > engine.max_loaded_models:
                return f"engine.max_loaded_models={engine.max_loaded_models} models are loaded"
            budget = engine.max_loaded_memory_mib
            if budget is not None:
                need = sum(self.memory_estimate(e)[0] or 0.0 for e in [*staying, entry])
                if need > budget:
                    return f"about {need:.0f} MiB would be loaded, over engine.max_loaded_memory_mib={budget:g}"
            return None

        while (why := over()) is not None:
            if not spare:
                raise pool_capacity_exhausted(entry.name, f"{why} and none of them is idle")
            victim = spare.pop(0)
            victims.append(victim)
            staying.remove(victim)
        return victims

    def memory_estimate(self, entry: ModelEntry) -> tuple[float | None, int | None, str]:
        """``(MiB, replicas counted, source)`` of a model's memory: the GPU memory its last load
        took (``observed_load_delta``), else its model file(s) on disk (``model_artifact_size``),
        else unknown (remote models; counted as 0 by the budget)."""
        if entry.observed_vram_mib is not None:
            return round(entry.observed_vram_mib, 1), entry.observed_vram_replicas, "observed_load_delta"
        if entry.settings.model_path and not kind_of(entry.settings).remote:
            try:
                path = resolve_model_path(self.settings, entry.settings)
                size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                return round(size / 2**20, 1), 1, "model_artifact_size"
            except OSError:
                pass
        return None, None, "unavailable"

    # ------------------------------------------------------------------ load
    def _make_runtime(self, entry: ModelEntry, model: ModelSettings, replicas: int) -> ModelRuntime:
        kind = model.backend
        slots: dict[int, int] = {}  # replica index -> its slot (BackendContext.slot)

        def make_backend(index: int) -> Backend:
            if index not in slots:  # the lowest slot no live replica holds (a restart keeps its own)
                held = {slots.get(r.index) for r in runtime.replicas if r.state not in ("stopped", "dead")}
                slots[index] = next(n for n in range(len(held) + 1) if n not in held)
            ctx = BackendContext(
                name=entry.name,
                replica_index=index,
                replicas=replicas,
                model=model,
                settings=self.settings,
                kind=kind,
                slot=slots[index],
            )
            return self.backend_factory(ctx)

        runtime = ModelRuntime(
            entry.name,
            make_backend=make_backend,
            target_inflight=model.target_inflight,
            max_queue=model.max_queue,
            fairness=self.settings.engine.fairness,
            restart_max_attempts=model.restart_max_attempts,
            restart_backoff_s=model.restart_backoff_s,
            on_restart=entry.count_restart,
        )
        return runtime

    def _start_load(self, entry: ModelEntry, override: dict[str, Any] | None, replicas: int | str) -> None:
        assert self._nursery is not None
        model = msgspec.structs.replace(entry.settings, **(override or {}))
        entry.override = override
        entry.loaded_settings = model
        entry.last_error = None
        if entry.load_done.is_set():  # a load on demand made its event already (callers may wait on it)
            entry.load_done = trio.Event()
        self._set_state(entry, "loading")
        if replicas == "auto":  # the layout is read from the tuning cache in the model's task
            self._nursery.start_soon(self._model_lifetime, entry, None, model, name=f"model {entry.name}")
            return
        assert isinstance(replicas, int)
        entry.replicas_source = "configured" if replicas == entry.settings.replicas else "override"
        model = msgspec.structs.replace(model, replicas=replicas)
        entry.loaded_settings = model
        runtime = self._make_runtime(entry, model, replicas)
        self._nursery.start_soon(self._model_lifetime, entry, runtime, model, name=f"model {entry.name}")

    async def _model_lifetime(self, entry: ModelEntry, runtime: ModelRuntime | None, model: ModelSettings) -> None:
        """One load's life.  ``runtime`` None: a ``replicas = "auto"`` model, whose layout is
        read first (:func:`pool.tuning.resolve_auto`, on a worker thread)."""
        vram_before = self.gpu_used_mib()
        replicas = model.replicas if isinstance(model.replicas, int) else 1

        def on_loaded() -> None:
            entry.runtime = runtime
            entry.loaded_at = time.time()
            vram_after = self.gpu_used_mib()
            if vram_before is not None and vram_after is not None:
                entry.observed_vram_mib = max(0.0, vram_after - vram_before)
                entry.observed_vram_replicas = replicas
            self._set_state(entry, "loaded")
            entry.load_done.set()
            self._flush_on_demand(entry)
            log.info("model %s loaded with %d replica(s)", entry.name, replicas)
            idle_s = (entry.loaded_settings or entry.settings).idle_unload_after_s
            if idle_s is not None and self._nursery is not None:
                self._nursery.start_soon(self._unload_when_idle, entry, runtime, idle_s, name=f"idle unload {entry.name}")

        try:
            if runtime is None:
                fields, entry.replicas_source = await trio.to_thread.run_sync(resolve_auto, self.settings, model)
                model = msgspec.structs.replace(model, **fields)
                entry.loaded_settings = model
                assert isinstance(model.replicas, int)
                replicas = model.replicas
                log.info("model %s: replicas auto -> %s layout, %d replica(s)", entry.name, entry.replicas_source, replicas)
                runtime = self._make_runtime(entry, model, replicas)
            await runtime.run(replicas, on_loaded=on_loaded)
        except LoadFailed as e:
            entry.last_error = str(e)
            log.error("model %s failed to load: %s", entry.name, e)
        except Exception as e:  # a bug: never leave a model half-alive
            entry.last_error = f"{type(e).__name__}: {e}"
            log.exception("model %s crashed", entry.name)
        finally:
            entry.runtime = None
            entry.override = None  # this load's override ends with it
            if entry.last_error is None and runtime is not None and runtime.last_error is not None:
                entry.last_error = runtime.last_error
            if entry.state == "unloading" or (entry.state == "loaded" and entry.last_error is None):
                self._set_state(entry, "unloaded")
            else:
                entry.failed_while_serving = entry.state == "loaded"
                if entry.last_error is None:  # cancelled while loading (shutdown)
                    entry.last_error = "the load was cancelled (server shutting down)"
                self._set_state(entry, "failed")
            entry.load_done.set()
            entry.unload_done.set()
            self._flush_on_demand(entry)  # a load that failed fails its waiting requests

    async def load(self, name: str, *, override: dict[str, Any] | None = None, replicas: int | None = None) -> ModelEntry:
        """Load ``name`` (idempotent when already loaded without changes) and wait for the end.

        Raises 409 ``model_unloading``, 400 when a loaded model is asked to change (unload
        first), or 500 ``model_load_failed`` with the runtime's message.
        """
        entry = self.entry(name)
        if self.shutting_down:
            raise shutting_down()
        if entry.state == "unloading":
            raise model_unloading(name)
        if entry.state in ("loaded", "loading") and (override or replicas is not None):
            raise PoolError(
                400,
                "invalid_load_request",
                f"model {name!r} is {entry.state}; overrides and replicas need the model unloaded first",
                model=name,
            )
        if entry.state in ("unloaded", "failed"):
            self._begin_load(entry, override, replicas or entry.settings.replicas)  # 503 when no room
        entry.wanted = True
        await entry.load_done.wait()
        if entry.refused is not None and entry.state == "unloaded":
            raise entry.refused
        # judge the load by "failed" only: by the time this task resumes, another admin call may
        # already be unloading the model this load did load
        if entry.state == "failed":
            raise PoolError(500, "model_load_failed", f"model {name!r} failed to load: {entry.last_error}", model=name)
        return entry

    # ------------------------------------------------------------------ unload
    async def unload(self, name: str, *, drain_timeout: float | None = None, force: bool = False) -> ModelEntry:
        """Graceful unload; see :meth:`ModelRuntime.stop`.  No-op when unloaded or failed."""
        entry = self.entry(name)
        if entry.state == "loading":
            raise PoolError(409, "model_loading", f"model {name!r} is loading; unload it once loaded", model=name)
        if entry.state == "unloading":
            with trio.CancelScope(shield=True):
                await entry.unload_done.wait()
            return entry
        entry.wanted = False  # asked for by an admin or the idle timer: readiness stops waiting for it
        if entry.state != "loaded" or entry.runtime is None:
            return entry
        runtime = entry.runtime
        entry.unload_done = trio.Event()
        self._set_state(entry, "unloading")
        timeout = 0.0 if force else entry.settings.drain_timeout_s if drain_timeout is None else drain_timeout
        with trio.CancelScope(shield=True):  # an admin client leaving must not leave "unloading"
            await runtime.stop(drain_timeout=timeout)
            await entry.unload_done.wait()
        log.info("model %s unloaded", name)
        return entry

    async def resize(self, name: str, replicas: int) -> ModelEntry:
        entry = self.entry(name)

        def check_loaded() -> ModelRuntime:
            if entry.state != "loaded" or entry.runtime is None:
                raise PoolError(409, f"model_{entry.state}" if entry.state != "unloaded" else "model_not_loaded",
                                f"model {name!r} is {entry.state}; only a loaded model can be resized", model=name)
            return entry.runtime

        check_loaded()
        # the load's own ceiling: a replicas = "auto" load raises it to the tuned count
        replica_max = (entry.loaded_settings or entry.settings).replica_max
        if not 1 <= replicas <= replica_max:
            raise PoolError(
                400,
                "invalid_request",
                f"replica count {replicas} exceeds replica_max {replica_max} for model {name!r}"
                if replicas > replica_max
                else "replicas must be at least 1",
                model=name,
                param="replicas",
            )
        try:
            async with entry.resize_lock:
                entry.touch()  # the idle timer stops while a resize runs...
                runtime = check_loaded()  # again: it may have changed while this call waited its turn
                try:
                    with trio.CancelScope(shield=True):
                        await runtime.resize(replicas, drain_timeout=entry.settings.drain_timeout_s)
                except LoadFailed as e:
                    if not runtime.admitting:  # the model is being unloaded (or died) meanwhile
                        raise model_unloading(name) from None
                    raise PoolError(500, "model_load_failed", f"model {name!r}: new replica failed to load: {e}", model=name) from None
        finally:
            entry.touch()  # ...and starts again once it ended (the lock is released by now)
        return entry

    # ------------------------------------------------------------------ idle unload
    async def _unload_when_idle(self, entry: ModelEntry, runtime: ModelRuntime, after_s: float) -> None:
        """Unload ``entry`` once it has had no queued or running request, and no resize, for
        ``after_s`` seconds in a row (see the module docstring).  Returns when the load it was
        started for ends, whoever ended it.

        Cancellation: cancelled with the manager (shutdown); an unload it began finishes first
        (:meth:`unload` shields itself).
        """
        def this_load() -> bool:
            return entry.runtime is runtime and entry.state == "loaded"

        def busy() -> bool:
            return entry.pending_jobs > 0 or entry.resize_lock.locked()

        while this_load():
            changed = entry.activity
            if busy():
                await changed.wait()
                continue
            entry.idle_deadline = trio.current_time() + after_s
            try:
                with trio.move_on_after(after_s) as timer:
                    await changed.wait()
            finally:
                entry.idle_deadline = None
            if timer.cancelled_caught and this_load() and not busy():
                log.info(
                    "idle unload",
                    extra={"fields": {"action": "idle_unload", "model": entry.name, "idle_unload_after_s": after_s}},
                )
                await self.unload(entry.name)
                return

    # ------------------------------------------------------------------ tuning (issue 21)
    def start_tune(
        self, name: str, *, cores: int | None, concurrencies: tuple[int, ...], engines: tuple[Engine, ...],
        tokens: int, max_s: float,
    ) -> TuneJob:  # fmt: skip
        """Start a tune of ``name`` (:mod:`llm_pool.pool.tuning`) in the background: its layouts
        load privately (the model itself, loaded or not, is untouched) within ``cores``.

        Raises 404 ``unknown_model``, 400 ``invalid_request`` (not a GGUF model, more cores
        than exist), 409 ``tune_running`` while any tune runs (two would measure each other),
        503 ``shutting_down``."""
        entry = self.entry(name)
        if self.shutting_down:
            raise shutting_down()
        running = next((t for t in self.tunes.values() if t.state == "running"), None)
        if running is not None:
            raise PoolError(409, "tune_running", f"a tune of model {running.model!r} is running; cancel it or wait for its end",
                            model=name)
        try:
            tunable(entry.settings, name)
        except TuneError as e:
            raise PoolError(400, "invalid_request", str(e), model=name) from None
        try:
            cores_for(self.settings, cores)
        except TuneError as e:
            raise PoolError(400, "invalid_request", str(e), model=name, param="$.cores" if cores else None) from None
        job = TuneJob(name, cores=cores, concurrencies=concurrencies, engines=engines, tokens=tokens, max_s=max_s)
        self.tunes[name] = job
        assert self._nursery is not None
        self._nursery.start_soon(job.run, self.settings, self.backend_factory, name=f"tune {name}")
        log.info("tune started", extra={"fields": {"action": "tune", "model": name, "cores": cores}})
        return job

    def tune_of(self, name: str) -> TuneJob:
        """The last tune of ``name`` run by this server; 404 ``not_found`` when none ran."""
        self.entry(name)
        job = self.tunes.get(name)
        if job is None:
            raise PoolError(404, "not_found", f"model {name!r} has not been tuned by this server", model=name)
        return job

    async def reload_from_files(self) -> dict[str, Any]:
        """Re-read the settings files (``config_path``, else the default lookup) and adopt them
        (:meth:`reload`); what both ``POST /v1/admin/settings/reload`` and SIGHUP do.

        Raises 400 ``invalid_settings`` (naming the file and key) when they do not decode, and
        :meth:`reload`'s 409; nothing changes then.  The files are read on a worker thread.
        """
        try:
            settings = await trio.to_thread.run_sync(load_settings, self.config_path)
        except SettingsError as e:
            raise PoolError(400, "invalid_settings", f"settings not reloaded: {e}") from None
        return self.reload(settings)

    def reload(self, settings: Settings) -> dict[str, Any]:
        """Adopt a newly read catalog; never loads or unloads anything.

        Raises 409 ``settings_reload_conflict`` (catalog unchanged) when a model that is not
        unloaded/failed would be removed or would change its definition.
        """
        old, new = self.settings.engine.models, settings.engine.models
        added = [n for n in new if n not in old]
        removed = [n for n in old if n not in new]
        updated = [n for n in new if n in old and new[n] != old[n]]  # a new backend is a new Struct
        unchanged = [n for n in new if n in old and n not in updated]
        busy = [n for n in removed + updated if self.entries[n].state in ("loaded", "loading", "unloading")]
        if busy:
            raise PoolError(
                409,
                "settings_reload_conflict",
                "settings not reloaded: these models are loaded and their definition changed or was "
                f"removed; unload them first: {', '.join(busy)}",
            )
        entries = {}
        for name, model in new.items():
            entry = self.entries.get(name) or ModelEntry(name, model)
            entry.settings = model
            entries[name] = entry
        self.entries = entries
        restart = settings.service != self.settings.service
        self.settings = msgspec.structs.replace(settings, service=self.settings.service)
        return {
            "added_models": added,
            "removed_models": removed,
            "updated_models": updated,
            "unchanged_models": unchanged,
            "service_restart_required": restart,
        }

    async def _stop_for_shutdown(self, entry: ModelEntry, runtime: ModelRuntime, drain_s: float) -> None:
        self._set_state(entry, "unloading")
        await runtime.stop(
            drain_timeout=drain_s,
            error=request_cancelled(entry.name, "the server shut down before the request finished"),
            queued_error=shutting_down(),
        )
        await entry.unload_done.wait()

    async def shutdown(self, drain_s: float) -> None:
        """Stop admission everywhere, drain every model within ``drain_s``, close them all."""
        self.shutting_down = True
        async with trio.open_nursery() as nursery:
            for entry in self.entries.values():
                if entry.state == "loaded" and entry.runtime is not None:
                    nursery.start_soon(self._stop_for_shutdown, entry, entry.runtime, drain_s)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
