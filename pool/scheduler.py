"""One loaded model at run time: its bounded queue, its dispatch and its replica tasks.

::

    submit_nowait(job) ──▶ FairQueue ──▶ _pump() ──▶ replica inbox ──▶ backend
         │ 429 executor_queue_full /      priority, then      least-loaded replica with a
         │     fairness_key_queue_full    weighted slot time  free slot, ties round-robin
         │ 409 while unloading            per fairness_key

Dispatch is synchronous: ``_pump`` runs whenever a slot may have opened or a job arrived (submit,
a job's release, replicas becoming ready) and places queued jobs at once, on the trio thread.  A
dispatcher *task* would cost each hand-off an extra scheduling round, and under load a round is
milliseconds during which a replica sits idle (measured by the R1 reliability suite).

``ModelRuntime.run`` is the model's lifetime: it opens the model's nursery (the replica tasks),
loads every replica (all or nothing) and serves until its cancel scope is cancelled.
Each threaded replica makes a single ``trio.to_thread.run_sync`` call that lasts its whole life, so
the runtime library always sees the same OS thread.

The queue is :class:`~pool.fairness.FairQueue`: which queued job runs next (priority, then the
``fairness_key`` with the least slot time per weight); with one key and one priority it is FIFO.

Restarts (healing): a replica whose worker died restarts.  That is an async backend whose engine
died (it raises :class:`~backends.base.EngineCrashed` from ``serve``, its running jobs already
ended with 502 ``engine_crashed``), or any backend from whose ``serve`` an exception escaped (a
threaded worker's thread then ends; its jobs get 502 ``backend_error``).  The replica goes
``restarting`` (no free slot, so queued jobs wait for the other replicas), is closed, waits
``restart_backoff_s`` (doubling per attempt) and loads again: the same backend object for an
engine process, a new one from ``make_backend`` (on a new worker thread) otherwise.
``restart_max_attempts`` failed attempts in a row make it ``dead`` (the model ``failed`` if it
was the last); a replica that served ``RESTART_RESET_AFTER_S`` starts a new count.  Each attempt
calls ``on_restart`` (``llm_pool:replica_restarts_total``) and is logged.

Prompt-cache affinity (issue 16): a replica's engine keeps the KV cache of the prompts it served
last, so a request that shares a prefix with one of them decodes only the rest.  A job with a
``prompt_cache_key`` goes to the replica that last served that key (a bounded LRU map, key →
replica); one without goes to the replica whose recent prompts share the longest prefix with its
own (at least :data:`PREFIX_MIN_CHARS`).  Either only while that replica has a free slot and runs
at most :data:`AFFINITY_SLACK` jobs more than the least-loaded replica with a free slot: past
that, least-loaded wins (a busy replica's cache is not worth a queue, and one key cannot pin its
traffic to one replica while others idle).

Cancellation: cancelling the model's scope (``stop``, after the drain) sets the stop flag of every
running job with a ``request_cancelled`` error and asks each backend to return; backends stop at
their next token.  A replica's slot is released when its job ends, whatever happened, and a replica
that dies fails whatever it still held.

This module must not import quart.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import queue
from collections.abc import Callable
from typing import Any, Literal

import trio

from llm_pool.backends.base import Backend, EngineCrashed
from llm_pool.config import FairnessSettings
from llm_pool.pool.errors import (
    PoolError,
    backend_error,
    engine_crashed,
    model_unloading,
    printable,
    request_cancelled,
)
from llm_pool.pool.fairness import FairQueue
from llm_pool.pool.jobs import Job

log = logging.getLogger("llm_pool.scheduler")

ReplicaState = Literal["loading", "serving", "restarting", "retiring", "stopped", "dead"]

#: An engine that served at least this long before it crashed starts a new count of restart
#: attempts: ``restart_max_attempts`` bounds a crash loop, not a replica's whole life.
RESTART_RESET_AFTER_S = 60.0

# -- prompt-cache affinity (issue 16; see the module docstring)
#: ``prompt_cache_key`` → replica entries kept per model (least recently used dropped first):
#: keys come from clients, so the map must not grow without bound.
AFFINITY_KEYS = 4096
#: How many more running jobs than the least-loaded free replica an affine replica may have.
AFFINITY_SLACK = 1
#: Prompts remembered per replica for prefix affinity, and how much of each.
PREFIXES_PER_REPLICA = 8
PREFIX_CHARS = 2048
#: A shared prefix shorter than this is no reason to prefer a replica.
PREFIX_MIN_CHARS = 64


def prompt_prefix(job: Job) -> str:
    """The start of ``job``'s prompt as the caller wrote it (every turn, in order): what
    prefix affinity compares.  Rendering adds the same markup for the same turns."""
    out: list[str] = []
    size = 0
    for m in job.request.messages:
        out.append(f"{m.role}\x00{m.content}\x00")
        size += len(out[-1])
        if size >= PREFIX_CHARS:
            break
    return "".join(out)[:PREFIX_CHARS]


def shared_prefix(a: str, b: str) -> int:
    """Length of the common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _cancelled() -> bool:
    """Whether the current task's scope is cancelled (an unload past its drain, a resize)."""
    return trio.current_effective_deadline() == -math.inf


class LoadFailed(Exception):
    """A model (or a replica being added) could not load; the message is the runtime's."""


class Replica:
    """One replica: a backend instance, its worker, and the jobs it holds."""

    def __init__(self, name: str, backend: Backend, capacity: int, index: int = 1) -> None:
        self.name = name
        #: The number ``make_backend`` got for it (a restart makes its new backend with it).
        self.index = index
        self.backend = backend
        self.capacity = capacity
        self.state: ReplicaState = "loading"
        self.active = 0
        self.jobs: set[Job] = set()
        self._error: str | None = None
        self.stopping = False
        self.ready = trio.Event()
        self.done = trio.Event()
        #: The starts of the prompts it served last (prefix affinity), newest last.
        self.prefixes: collections.deque[str] = collections.deque(maxlen=PREFIXES_PER_REPLICA)
        self.inbox: Any = None  # queue.SimpleQueue for threaded backends, trio channel otherwise
        self._inbox_recv: Any = None
        self.new_inbox()

    def new_inbox(self) -> None:
        """A fresh inbox (at start, and for a restarted threaded worker: the dead one's inbox
        may hold a stop request)."""
        if self.backend.threaded:
            self.inbox = queue.SimpleQueue()
        else:
            self.inbox, self._inbox_recv = trio.open_memory_channel[Job | None](math.inf)

    @property
    def error(self) -> str | None:
        """Why this replica failed to load or died: one printable line (:func:`pool.errors.printable`)."""
        return self._error

    @error.setter
    def error(self, text: str | None) -> None:
        self._error = None if text is None else printable(text)

    @property
    def ejected(self) -> bool:
        """Out of rotation by its health (a remote endpoint's; see :meth:`ModelRuntime._pick`)."""
        return bool(getattr(self.backend, "ejected", False))

    @property
    def weight(self) -> float:
        """Its share in the least-loaded choice (a remote endpoint's ``weight``)."""
        return float(getattr(self.backend, "weight", 1.0))

    @property
    def free(self) -> int:
        # ``crashed``: an engine process that died takes no job even before serve() returned
        if self.state != "serving" or self.stopping or self.backend.crashed:
            return 0
        return self.capacity - self.active

    def put(self, job: Job | None) -> None:
        if self.backend.threaded:
            self.inbox.put(job)
        elif job is None:
            self.inbox.close()
        else:
            self.inbox.send_nowait(job)

    def stop_jobs(self, error: PoolError) -> None:
        self.stopping = True  # its inbox is closing: no job may be placed on it any more
        for job in list(self.jobs):
            job.cancel(error)
        if self.state not in ("stopped", "dead"):
            self.put(None)


class ModelRuntime:
    """The serving part of one model: see the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        make_backend: Callable[[int], Backend],
        target_inflight: int,
        max_queue: int,
        fairness: FairnessSettings | None = None,
        restart_max_attempts: int = 0,
        restart_backoff_s: float = 1.0,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.make_backend = make_backend
        self.target_inflight = target_inflight
        self.max_queue = max_queue
        #: For replicas whose worker died; an engine-process backend's own attributes win.
        self.restart_max_attempts = restart_max_attempts
        self.restart_backoff_s = restart_backoff_s
        self.on_restart = on_restart
        self.replicas: list[Replica] = []
        #: True from the end of a successful load until stop() or the last replica's death.
        self.admitting = False
        self.last_error: str | None = None
        self.finished = trio.Event()
        #: The queued jobs; cancelled ones are skipped when they reach the front, so
        #: cancelling is O(1).
        self.queue = FairQueue(fairness)
        self._changed = trio.Event()
        self._rr = 0
        #: ``prompt_cache_key`` → the replica that last served it (LRU, :data:`AFFINITY_KEYS`).
        self._affinity: collections.OrderedDict[str, Replica] = collections.OrderedDict()
        #: Replica numbers are never reused, so a name always means one replica.
        self._replica_counter = 0
        self._nursery: trio.Nursery | None = None
        #: What running jobs get when the model's scope is cancelled (unload past its drain).
        self._stop_error: PoolError | None = None
        #: What jobs that never reached a replica get once admission stopped (409 on unload).
        self._queued_error: PoolError | None = None
        #: Jobs handed back by a replica for their one retry elsewhere (issue 18): (job, the
        #: replica it failed on, its error), placed before the queue.
        self._retrying: list[tuple[Job, Replica, PoolError]] = []

    # ------------------------------------------------------------------ figures
    @property
    def effective_target_inflight(self) -> int:
        caps = [r.capacity for r in self.replicas]
        return min(caps) if caps else self.target_inflight

    @property
    def waiting(self) -> int:
        """Jobs queued (not cancelled), every key together."""
        return self.queue.pending

    @property
    def running(self) -> int:
        return sum(r.active for r in self.replicas)

    @property
    def serving_replicas(self) -> list[Replica]:
        return [r for r in self.replicas if r.state == "serving"]

    @property
    def alive(self) -> bool:
        return any(r.state in ("loading", "serving", "restarting", "retiring") for r in self.replicas)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        """Return at the next change of this runtime's replicas or queue (a state, a slot)."""
        await self._changed.wait()

    # ------------------------------------------------------------------ lifetime
    async def run(self, replicas: int, *, on_loaded: Callable[[], None]) -> None:
        """Load ``replicas`` replicas, call ``on_loaded``, then serve until cancelled.

        Raises :class:`LoadFailed` (outside the model's nursery) if any replica fails to load;
        the replicas that did load are closed first.  Returns normally after :meth:`stop`.
        """
        error: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                error = await self._add_replicas(replicas)
                if error is not None:
                    nursery.cancel_scope.cancel()
                else:
                    self.admitting = True
                    on_loaded()
        finally:
            self.admitting = False
            self._fail_queued(self._queued_error or backend_error(self.name, "model stopped"))
            self.finished.set()
        if error is not None:
            raise LoadFailed(error)

    async def _add_replicas(self, count: int) -> str | None:
        """Start ``count`` replicas and wait until each loaded; the first error or None."""
        assert self._nursery is not None
        new = []
        for _ in range(count):
            self._replica_counter += 1
            index = self._replica_counter
            try:
                backend = self.make_backend(index)
            except Exception as e:  # a bad definition or a missing library
                return f"{type(e).__name__}: {e}" if not isinstance(e, LoadFailed) else str(e)
            replica = Replica(f"{self.name}#{index}", backend, min(self.target_inflight, backend.capability), index)
            self.replicas.append(replica)
            new.append(replica)
            self._nursery.start_soon(self._run_replica, replica, name=replica.name)
        for replica in new:
            await replica.ready.wait()
        # a loaded replica waits in "loading" (no jobs) until the whole batch loaded, so a batch
        # that fails never had jobs to drop
        errors = [r.error for r in new if r.state != "loading"]
        if errors:
            for replica in new:
                replica.stop_jobs(backend_error(self.name, "load failed"))
            for replica in new:
                await replica.done.wait()
            for replica in new:
                self.replicas.remove(replica)
            return errors[0] or "replica failed to load"
        for replica in new:
            replica.state = "serving"
        self._notify()
        self._pump()
        return None

    async def _run_replica(self, replica: Replica) -> None:
        def loaded(error: BaseException | None) -> None:
            if error is not None:
                replica.state = "dead"
                replica.error = str(error) or type(error).__name__
                log.warning("replica %s failed to load: %s", replica.name, replica.error)
            replica.ready.set()

        ended_itself = False

        async def stop_on_cancel() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if not ended_itself:  # the model is being cancelled (unload past its drain)
                    replica.stop_jobs(self._stop_error or request_cancelled(self.name, "model unloaded"))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_on_cancel)
                nursery.start_soon(self._follow_rotation, replica)
                try:
                    if replica.backend.threaded:
                        await self._run_threaded_replica(replica, loaded)
                    else:
                        await self._run_async_replica(replica, loaded)
                finally:
                    # ended by itself (returned, died, crashed) unless an outer scope cancelled it;
                    # its leftover jobs then get the replica's error below, not the stop error
                    ended_itself = not _cancelled()
                nursery.cancel_scope.cancel()
        except Exception as e:  # a bug in an adapter: the replica is dead, the pool goes on
            replica.error = replica.error or f"{type(e).__name__}: {e}"
            log.exception("replica %s crashed", replica.name)
        finally:
            if not replica.ready.is_set():
                loaded(LoadFailed(replica.error or "cancelled while loading"))
            if replica.state != "dead":
                replica.state = "dead" if replica.error else "stopped"
            leftover = backend_error(self.name, replica.error or f"replica {replica.name} stopped")
            for job in list(replica.jobs):
                job.fail_nowait(job.cancel_error or leftover)
            replica.jobs.clear()
            replica.active = 0
            replica.done.set()
            self._notify()
            if self.admitting and not self.alive and self.replicas:
                self.last_error = replica.error
                self.admitting = False
                self._stop_error = backend_error(self.name, f"no replica left: {replica.error}")
                self._queued_error = self._stop_error
                self._fail_queued(self._queued_error)
                if self._nursery is not None:  # the model ends; the manager marks it failed
                    self._nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ threaded replicas
    async def _run_threaded_replica(self, replica: Replica, loaded: Callable[[BaseException | None], None]) -> None:
        """A threaded replica's life: one worker thread per backend (load, serve, close), and
        a new backend on a new thread when the worker died (see the module docstring).

        Cancellation: the worker thread is never abandoned; the stop request (``None`` in the
        inbox, put by ``stop_jobs``) makes ``serve`` return, and this returns after it."""
        token = trio.lowlevel.current_trio_token()
        attempts = 0
        first = True
        while True:
            serving_since: list[float] = []

            def on_load(
                error: BaseException | None, first: bool = first, since: list[float] = serving_since, attempt: int = attempts
            ) -> None:  # trio thread
                if error is None:
                    since.append(trio.current_time())
                if first:
                    loaded(error)
                elif error is None:
                    self._restarted(replica, attempt)

            died = await trio.to_thread.run_sync(
                functools.partial(self._thread_main, replica, token, on_load), limiter=trio.CapacityLimiter(1)
            )
            if died is None or _cancelled():
                return
            phase, error = died
            if first and phase == "load":
                return  # loaded() reported it: the load fails
            first = False
            if phase == "serve":
                self._worker_died(replica, error)
                uptime = trio.current_time() - serving_since[0] if serving_since else 0.0
                attempts = 1 if uptime >= RESTART_RESET_AFTER_S else attempts + 1
            else:
                error, attempts = f"restart failed: {error}", attempts + 1
            while True:
                if not await self._backoff(replica, error, attempts, what="runtime died"):
                    return
                try:
                    replica.backend = self.make_backend(replica.index)
                    break
                except Exception as e:
                    error, attempts = f"restart failed: {type(e).__name__}: {e}", attempts + 1

    @staticmethod
    def _thread_main(
        replica: Replica, token: trio.lowlevel.TrioToken, on_load: Callable[[BaseException | None], None]
    ) -> tuple[str, str] | None:
        """The worker thread: load, serve until asked to stop, close.  Returns None when
        ``serve`` returned, else ``(phase, error)`` with phase ``load`` or ``serve``."""
        backend: Any = replica.backend
        try:
            backend.load()
        except BaseException as e:
            token.run_sync_soon(on_load, e)
            return ("load", f"{type(e).__name__}: {e}")
        token.run_sync_soon(on_load, None)
        try:
            backend.serve(replica.inbox)
        except BaseException as e:  # an exception escaped: the worker died
            log.error("replica %s died", replica.name, exc_info=e)
            return ("serve", f"{type(e).__name__}: {e}")
        finally:
            try:
                backend.close()
            except Exception:
                log.exception("replica %s: close failed", replica.name)
        return None

    # ------------------------------------------------------------------ async replicas
    async def _run_async_replica(self, replica: Replica, loaded: Callable[[BaseException | None], None]) -> None:
        backend: Any = replica.backend
        try:
            await backend.load()
        except Exception as e:
            loaded(e)
            return
        loaded(None)
        attempts = 0
        serving_since = trio.current_time()
        while True:
            crash: EngineCrashed | None = None
            died: str | None = None
            try:
                await backend.serve(replica._inbox_recv)
            except EngineCrashed as e:
                crash = e
            except Exception as e:
                died = f"{type(e).__name__}: {e}"
                log.error("replica %s died", replica.name, exc_info=e)
            finally:
                if (crash is not None or died is not None) and replica.state == "serving":
                    replica.state = "restarting"  # no free slot: queued jobs go elsewhere
                with trio.CancelScope(shield=True):
                    await backend.close()
            if crash is not None:
                attempts = 1 if crash.uptime_s >= RESTART_RESET_AFTER_S else attempts + 1
                restarted = await self._restart(replica, crash, attempts)
            elif died is not None:
                self._worker_died(replica, died)
                uptime = trio.current_time() - serving_since
                attempts = 1 if uptime >= RESTART_RESET_AFTER_S else attempts + 1
                restarted = await self._restart_fresh(replica, died, attempts)
            else:
                return
            if not restarted:
                return
            backend = replica.backend
            serving_since = trio.current_time()

    async def _restart(self, replica: Replica, crash: EngineCrashed, attempts: int) -> bool:
        """Load a crashed engine's backend again after its backoff; False when it must end
        (attempts spent, retiring, or the model stopping).  Each failed load is an attempt."""
        backend: Any = replica.backend
        error = str(crash)
        self._fail_undelivered(replica, engine_crashed(self.name, f"replica {replica.name} restarting: {error}"))
        while True:
            if not await self._backoff(replica, error, attempts, what="engine crashed"):
                return False
            try:
                await backend.load()
            except Exception as e:
                error = f"restart failed: {e}"
                with trio.CancelScope(shield=True):
                    await backend.close()
                attempts += 1
                continue
            self._restarted(replica, attempts)  # retired meanwhile: serve() returns at once
            return True

    async def _restart_fresh(self, replica: Replica, error: str, attempts: int) -> bool:
        """Replace an async replica whose ``serve`` raised with a new backend, after its
        backoff; False when it must end."""
        while True:
            if not await self._backoff(replica, error, attempts, what="runtime died"):
                return False
            backend: Any = None
            try:
                backend = self.make_backend(replica.index)
                await backend.load()
            except Exception as e:
                error = f"restart failed: {type(e).__name__}: {e}"
                if backend is not None:
                    with trio.CancelScope(shield=True):
                        await backend.close()
                attempts += 1
                continue
            replica.backend = backend
            self._restarted(replica, attempts)
            return True

    # ------------------------------------------------------------------ restarts
    def _worker_died(self, replica: Replica, error: str) -> None:
        """An exception escaped ``serve``: the replica stops taking jobs, and every job it held
        (running, or dispatched and never taken) ends with 502 ``backend_error`` (a job is never
        dispatched twice).  A fresh inbox waits for the next worker."""
        if replica.state == "serving":
            replica.state = "restarting"
        replica.error = f"runtime died: {error}"
        died = backend_error(self.name, replica.error)
        for job in list(replica.jobs):
            job.fail_nowait(job.cancel_error or died)
        replica.new_inbox()
        self._notify()

    async def _backoff(self, replica: Replica, error: str, attempts: int, *, what: str) -> bool:
        """Wait before restart attempt ``attempts`` (``restart_backoff_s``, doubling per attempt);
        False when the replica must end instead: attempts spent (it is ``dead`` with the last
        error), retiring, or the model stopping."""
        max_attempts, backoff = self.restart_max_attempts, self.restart_backoff_s

        def must_end() -> bool:
            if replica.state != "restarting" or not self.admitting:  # retiring, or the model stops
                replica.state = "dead" if replica.state == "restarting" else replica.state
                replica.error = replica.error or error
                return True
            return False

        if must_end():
            return False
        if attempts > max_attempts:
            replica.state = "dead"
            replica.error = (
                f"{what} and {max_attempts} restart attempt(s) failed; last: {error}"
                if max_attempts
                else f"{what}: {error}"
            )
            log.error("replica %s gave up restarting: %s", replica.name, replica.error)
            return False
        delay = backoff * 2 ** (attempts - 1)
        log.warning(
            "replica restarting",
            extra={"fields": {"model": self.name, "replica": replica.name, "attempt": attempts,
                              "max_attempts": max_attempts, "backoff_s": delay, "error": error}},
        )
        if self.on_restart is not None:
            self.on_restart()
        await trio.sleep(delay)
        return not must_end()

    def _restarted(self, replica: Replica, attempts: int) -> None:
        if replica.state != "restarting":  # retired meanwhile: its serve returns at once
            return
        replica.state = "serving"
        replica.error = None
        log.info("replica restarted", extra={"fields": {"model": self.name, "replica": replica.name,
                                                        "attempt": attempts}})
        self._notify()
        self._pump()

    def _fail_undelivered(self, replica: Replica, error: PoolError) -> None:
        """Jobs dispatched to ``replica`` that its backend never took: they end now (a restart
        may take long; a job is never dispatched twice)."""
        while True:
            try:
                job = replica._inbox_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if job is not None:
                job.fail_nowait(job.cancel_error or error)

    # ------------------------------------------------------------------ admission and dispatch
    def submit_nowait(self, job: Job) -> None:
        """Queue ``job`` (placing it on a replica at once if one has a free slot) or raise at
        once: 409 (unloading), 403 ``priority_not_allowed``, 429 ``fairness_key_queue_full`` /
        ``executor_queue_full`` (see :meth:`pool.fairness.FairQueue.admit`)."""
        if not self.admitting:
            raise model_unloading(self.name)
        # free slots of the replicas in rotation (an ejected endpoint's count only in panic mode)
        in_rotation = [r for r in self.replicas if r.state == "serving" and not r.ejected]
        free = sum(r.free for r in (in_rotation or self.replicas))
        self.queue.admit(job, free=free, max_queue=self.max_queue)
        job.on_cancel_queued = self._cancel_queued
        self.queue.push(job)
        self._pump()

    def _cancel_queued(self, job: Job) -> None:
        self.queue.cancel(job)
        self._notify()

    def _candidates(self, avoid: Replica | None = None) -> list[Replica]:
        """The replicas a job may be placed on now: a free slot, never ``avoid``.  Ejected
        replicas (a remote endpoint's health) are passed over while another serving replica is in
        rotation; when every one is ejected, none is (Envoy's panic mode: better to try than to
        refuse everything).  Empty: wait."""
        candidates = [r for r in self.replicas if r.free > 0 and r is not avoid]
        if not candidates:
            return []
        in_rotation = [r for r in candidates if not r.ejected]
        if in_rotation:
            return in_rotation
        if any(self._eligible(r, avoid) for r in self.replicas):
            return []  # the replicas in rotation are busy: wait for them
        return candidates

    def _pick(self, job: Job | None = None, avoid: Replica | None = None) -> Replica | None:
        """The replica for ``job`` among :meth:`_candidates`: its affine replica (module
        docstring) while that one is within :data:`AFFINITY_SLACK` of the least loaded, else
        the one with the fewest running jobs per unit of weight (ties round-robin); None: wait."""
        candidates = self._candidates(avoid)
        if not candidates:
            return None
        n = len(self.replicas)
        order = {r.name: (i - self._rr) % n for i, r in enumerate(self.replicas)}
        best = min(candidates, key=lambda r: (r.active / r.weight, order[r.name]))
        if job is not None and len(candidates) > 1:
            best = self._affine(job, [r for r in candidates if r.active <= best.active + AFFINITY_SLACK], order) or best
        self._rr = (self.replicas.index(best) + 1) % n
        return best

    def _affine(self, job: Job, eligible: list[Replica], order: dict[str, int]) -> Replica | None:
        key = job.request.prompt_cache_key
        if key is not None:
            replica = self._affinity.get(key)
            return replica if replica in eligible else None
        prefix = prompt_prefix(job)
        scored = [(max((shared_prefix(prefix, p) for p in r.prefixes), default=0), r) for r in eligible]
        top = max(score for score, _ in scored)
        if top < PREFIX_MIN_CHARS:
            return None
        return min((r for score, r in scored if score == top), key=lambda r: (r.active, order[r.name]))

    def _remember(self, job: Job, replica: Replica) -> None:
        """What affinity needs of ``job``, placed on ``replica``."""
        key = job.request.prompt_cache_key
        if key is not None:
            self._affinity[key] = replica
            self._affinity.move_to_end(key)
            if len(self._affinity) > AFFINITY_KEYS:
                self._affinity.popitem(last=False)
        elif len(self.replicas) > 1:
            replica.prefixes.append(prompt_prefix(job))

    def _pump(self) -> None:
        """Place queued jobs, in the queue's order, while a replica has a free slot."""
        if self._retrying:
            self._place_retries()
        queue_ = self.queue
        while queue_.pending and self.admitting:
            if not self._candidates():
                return
            job = queue_.pop()
            assert job is not None
            replica = self._pick(job)
            assert replica is not None
            self._remember(job, replica)
            job.on_cancel_queued = None
            job.retry = self._retry_elsewhere
            self._dispatch(job, replica)

    def _dispatch(self, job: Job, replica: Replica) -> None:
        replica.active += 1
        replica.jobs.add(job)
        job.mark_dispatched(
            replica.name,
            functools.partial(self._release, replica),
            handover_later=getattr(replica.backend, "reports_handover", False),
        )
        replica.put(job)

    # ------------------------------------------------------------------ one retry elsewhere (issue 18)
    @staticmethod
    def _eligible(replica: Replica, avoid: Replica | None) -> bool:
        """Serving, in rotation, not ``avoid``: may run a retry (now or once a slot frees)."""
        return (
            replica is not avoid
            and replica.state == "serving"
            and not replica.stopping
            and not replica.backend.crashed
            and not replica.ejected
        )

    def _retry_elsewhere(self, job: Job, error: PoolError) -> bool:
        """``Job.retry``: take ``job`` back from the replica it failed on (nothing reached its
        client) and run it on another replica in rotation, before anything queued; False when
        there is none (the job then fails with ``error`` as it would have)."""
        replica = next((r for r in self.replicas if r.name == job.replica), None)
        if replica is None or job not in replica.jobs or not self.admitting:
            return False
        if not any(self._eligible(r, replica) for r in self.replicas):
            return False
        replica.jobs.discard(job)
        replica.active -= 1
        job.state = "queued"  # cancellable as a queued job again (below), until placed
        job.on_cancel_queued = self._cancel_retry
        self._retrying.append((job, replica, error))
        log.info(
            "retrying on another replica",
            extra={"fields": {"model": self.name, "replica": replica.name, "request_id": job.trace_id,
                              "code": error.code}},
        )
        self._notify()
        self._pump()
        return True

    def _cancel_retry(self, job: Job) -> None:
        self._retrying = [item for item in self._retrying if item[0] is not job]
        self._notify()

    def _place_retries(self) -> None:
        """Place the jobs waiting for their retry; fail those no replica in rotation is left for."""
        give_up: list[tuple[Job, PoolError]] = []
        for item in list(self._retrying):
            job, avoid, error = item
            if not self.admitting or not any(self._eligible(r, avoid) for r in self.replicas):
                self._retrying.remove(item)
                give_up.append((job, error))
                continue
            replica = self._pick(avoid=avoid)
            if replica is None or replica.ejected:
                continue
            self._retrying.remove(item)
            job.on_cancel_queued = None
            self._dispatch(job, replica)
        for job, error in give_up:
            job.on_cancel_queued = None
            job.fail_nowait(job.cancel_error or error)

    async def _follow_rotation(self, replica: Replica) -> None:
        """Place queued work whenever the replica's backend says it went in or out of rotation."""
        while True:
            wait = getattr(replica.backend, "rotation_changed", None)
            if wait is None:
                return
            await wait()
            self._notify()
            self._pump()

    def _release(self, replica: Replica, job: Job) -> None:
        if job in replica.jobs:
            replica.jobs.discard(job)
            replica.active -= 1
        self.queue.ended(job)
        self._notify()
        self._pump()

    def _fail_queued(self, error: PoolError) -> None:
        retrying, self._retrying = self._retrying, []
        for job in [*self.queue.drain(), *(item[0] for item in retrying)]:
            job.on_cancel_queued = None
            job.cancel(error)
        self._notify()

    # ------------------------------------------------------------------ unload and resize
    async def wait_idle(self, replicas: list[Replica] | None = None) -> None:
        while True:
            group = self.replicas if replicas is None else replicas
            if not any(r.active for r in group) and (replicas is not None or not self.waiting):
                return
            await self.wait_changed()

    async def stop(
        self, *, drain_timeout: float, error: PoolError | None = None, queued_error: PoolError | None = None
    ) -> bool:
        """Stop admission, fail queued jobs (409 ``model_unloading``), let running jobs finish
        within ``drain_timeout`` seconds, then cancel the model's scope and wait until every
        replica has closed.  Returns True if the drain finished in time.

        Cancellation: if the caller is cancelled, the model is still cancelled and closed.
        """
        self.admitting = False
        self._stop_error = error
        self._queued_error = queued_error or error or model_unloading(self.name)
        self._fail_queued(self._queued_error)
        self._notify()
        drained = False
        try:
            with trio.move_on_after(drain_timeout):
                await self.wait_idle()
                drained = True
        finally:  # also when the caller is cancelled during the drain
            self._stop_error = error or request_cancelled(
                self.name,
                f"model unloaded; the request did not finish within the {drain_timeout:g}s drain"
                if drain_timeout > 0
                else "model unloaded with force",
            )
            # give every running job its error *before* cancelling the scope: an async backend
            # ends its cancelled jobs itself, and must find the error already there
            for replica in self.replicas:
                replica.stop_jobs(self._stop_error)
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
            with trio.CancelScope(shield=True):
                await self.finished.wait()
        return drained

    async def resize(self, replicas: int, *, drain_timeout: float) -> None:
        """Grow (load new replicas while the others serve) or shrink (drain the removed ones
        first; jobs still running at ``drain_timeout`` are cancelled).  One at a time (the
        manager serializes them); 409 ``model_unloading`` once :meth:`stop` began."""
        if not self.admitting:
            raise model_unloading(self.name)
        current = [r for r in self.replicas if r.state in ("serving", "loading", "restarting")]
        if replicas > len(current):
            error = await self._add_replicas(replicas - len(current))
            if error is not None:
                raise LoadFailed(error)
            return
        retiring = current[replicas:]
        for replica in retiring:
            replica.state = "retiring"
        with trio.move_on_after(drain_timeout):
            await self.wait_idle(retiring)
        for replica in retiring:
            replica.stop_jobs(request_cancelled(self.name, "its replica was removed by a resize"))
        for replica in retiring:
            await replica.done.wait()
            self.replicas.remove(replica)
        self._notify()
