"""One loaded model at run time: its bounded queue, its dispatch and its replica tasks.

::

    submit_nowait(job) ──▶ FIFO queue ──▶ _pump() ──▶ replica inbox ──▶ backend
         │ 429 when max_queue jobs already wait   least-loaded replica with a free slot,
         │ 409 while unloading                    ties round-robin

Dispatch is synchronous: ``_pump`` runs whenever a slot may have opened or a job arrived (submit,
a job's release, replicas becoming ready) and places queued jobs at once, on the trio thread.  A
dispatcher *task* would cost each hand-off an extra scheduling round, and under load a round is
milliseconds during which a replica sits idle (measured by the R1 reliability suite).

``ModelRuntime.run`` is the model's lifetime: it opens the model's nursery (the replica tasks),
loads every replica (all or nothing) and serves until its cancel scope is cancelled.
Each threaded replica makes a single ``trio.to_thread.run_sync`` call that lasts its whole life, so
the runtime library always sees the same OS thread.

Restarts: an async backend whose engine died raises :class:`~backends.base.EngineCrashed` from
``serve`` (its running jobs already ended with 502 ``engine_crashed``).  The replica goes
``restarting`` (no free slot, so queued jobs go to the other replicas), is closed, waits
``restart_backoff_s`` (doubling per attempt) and loads again; ``restart_max_attempts`` failed
attempts in a row make it ``dead`` (the model ``failed`` if it was the last).

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
import time
from collections.abc import Callable
from typing import Any, Literal

import trio

from llm_pool.backends.base import Backend, EngineCrashed
from llm_pool.pool.errors import (
    PoolError,
    backend_error,
    engine_crashed,
    model_unloading,
    printable,
    queue_full,
    request_cancelled,
)
from llm_pool.pool.jobs import Job

log = logging.getLogger("llm_pool.scheduler")

ReplicaState = Literal["loading", "serving", "restarting", "retiring", "stopped", "dead"]

#: An engine that served at least this long before it crashed starts a new count of restart
#: attempts: ``restart_max_attempts`` bounds a crash loop, not a replica's whole life.
RESTART_RESET_AFTER_S = 60.0


class LoadFailed(Exception):
    """A model (or a replica being added) could not load; the message is the runtime's."""


class Replica:
    """One replica: a backend instance, its worker, and the jobs it holds."""

    def __init__(self, name: str, backend: Backend, capacity: int) -> None:
        self.name = name
        self.backend = backend
        self.capacity = capacity
        self.state: ReplicaState = "loading"
        self.active = 0
        self.jobs: set[Job] = set()
        self._error: str | None = None
        self.ready = trio.Event()
        self.done = trio.Event()
        self.inbox: Any = None  # queue.SimpleQueue for threaded backends, trio channel otherwise
        self._inbox_recv: Any = None
        if backend.threaded:
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
    def free(self) -> int:
        # ``crashed``: an engine process that died takes no job even before serve() returned
        if self.state != "serving" or getattr(self.backend, "crashed", False):
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
    ) -> None:
        self.name = name
        self.make_backend = make_backend
        self.target_inflight = target_inflight
        self.max_queue = max_queue
        self.replicas: list[Replica] = []
        self.waiting = 0
        #: True from the end of a successful load until stop() or the last replica's death.
        self.admitting = False
        self.last_error: str | None = None
        self.last_activity = time.monotonic()
        self.finished = trio.Event()
        #: Jobs in arrival order; cancelled ones are skipped when they reach the front (and
        #: swept out once they are the majority), so cancelling is O(1).
        self._queue: collections.deque[Job] = collections.deque()
        self._cancelled_in_queue = 0
        self._changed = trio.Event()
        self._rr = 0
        #: Replica numbers are never reused, so a name always means one replica.
        self._replica_counter = 0
        self._nursery: trio.Nursery | None = None
        #: What running jobs get when the model's scope is cancelled (unload past its drain).
        self._stop_error: PoolError | None = None
        #: What jobs that never reached a replica get once admission stopped (409 on unload).
        self._queued_error: PoolError | None = None

    # ------------------------------------------------------------------ figures
    @property
    def effective_target_inflight(self) -> int:
        caps = [r.capacity for r in self.replicas]
        return min(caps) if caps else self.target_inflight

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

    async def _wait_changed(self) -> None:
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
            replica = Replica(f"{self.name}#{index}", backend, min(self.target_inflight, backend.capability))
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
        token = trio.lowlevel.current_trio_token()

        def loaded(error: BaseException | None) -> None:
            if error is not None:
                replica.state = "dead"
                replica.error = str(error) or type(error).__name__
                log.warning("replica %s failed to load: %s", replica.name, replica.error)
            replica.ready.set()

        def mark_dead() -> None:
            replica.state = "dead"

        def thread_main() -> None:
            backend: Any = replica.backend
            try:
                backend.load()
            except BaseException as e:
                token.run_sync_soon(loaded, e)
                return
            token.run_sync_soon(loaded, None)
            try:
                backend.serve(replica.inbox)
            except BaseException as e:
                replica.error = f"runtime died: {type(e).__name__}: {e}"
                log.error("replica %s died", replica.name, exc_info=e)
                token.run_sync_soon(mark_dead)
            finally:
                try:
                    backend.close()
                except Exception:
                    log.exception("replica %s: close failed", replica.name)

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
                try:
                    if replica.backend.threaded:
                        await trio.to_thread.run_sync(thread_main, limiter=trio.CapacityLimiter(1))
                    else:
                        await self._run_async_replica(replica, loaded)
                finally:
                    # ended by itself (returned, died, crashed) unless an outer scope cancelled it;
                    # its leftover jobs then get the replica's error below, not the stop error
                    ended_itself = trio.current_effective_deadline() != -math.inf
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

    async def _run_async_replica(self, replica: Replica, loaded: Callable[[BaseException | None], None]) -> None:
        backend: Any = replica.backend
        try:
            await backend.load()
        except Exception as e:
            loaded(e)
            return
        loaded(None)
        attempts = 0
        while True:
            crash: EngineCrashed | None = None
            try:
                await backend.serve(replica._inbox_recv)
            except EngineCrashed as e:
                crash = e
            except Exception as e:
                replica.state = "dead"  # no more jobs while it closes
                replica.error = f"runtime died: {type(e).__name__}: {e}"
                log.error("replica %s died", replica.name, exc_info=e)
            finally:
                if crash is not None and replica.state == "serving":
                    replica.state = "restarting"  # no free slot: queued jobs go elsewhere
                with trio.CancelScope(shield=True):
                    await backend.close()
            if crash is None:
                return
            attempts = 1 if crash.uptime_s >= RESTART_RESET_AFTER_S else attempts + 1
            if not await self._restart(replica, crash, attempts):
                return

    async def _restart(self, replica: Replica, crash: EngineCrashed, attempts: int) -> bool:
        """Load a crashed replica's backend again after its backoff; False when it must end
        (attempts spent, retiring, or the model stopping).  Each failed load is an attempt."""
        backend: Any = replica.backend
        max_attempts = getattr(backend, "restart_max_attempts", 0)
        backoff = getattr(backend, "restart_backoff_s", 0.0)
        error = str(crash)
        self._fail_undelivered(replica, engine_crashed(self.name, f"replica {replica.name} restarting: {error}"))
        while True:
            if replica.state != "restarting" or not self.admitting:  # retiring, or the model stops
                replica.state = "dead" if replica.state == "restarting" else replica.state
                replica.error = replica.error or error
                return False
            if attempts > max_attempts:
                replica.state = "dead"
                replica.error = (
                    f"engine crashed and {max_attempts} restart attempt(s) failed; last: {error}"
                    if max_attempts
                    else f"engine crashed: {error}"
                )
                log.error("replica %s gave up restarting: %s", replica.name, replica.error)
                return False
            delay = backoff * 2 ** (attempts - 1)
            log.warning(
                "replica restarting",
                extra={"fields": {"model": self.name, "replica": replica.name, "attempt": attempts,
                                  "max_attempts": max_attempts, "backoff_s": delay, "error": error}},
            )
            await trio.sleep(delay)
            try:
                await backend.load()
            except Exception as e:
                error = f"restart failed: {e}"
                with trio.CancelScope(shield=True):
                    await backend.close()
                attempts += 1
                continue
            if replica.state != "restarting":  # retired meanwhile: serve() returns at once
                return True
            replica.state = "serving"
            log.info("replica restarted", extra={"fields": {"model": self.name, "replica": replica.name,
                                                            "attempt": attempts}})
            self._notify()
            self._pump()
            return True

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
        """Queue ``job`` (placing it on a replica at once if one has a free slot) or raise 409
        (unloading) / 429 (queue full) at once."""
        if not self.admitting:
            raise model_unloading(self.name)
        free = sum(r.free for r in self.replicas)
        if self.waiting >= self.max_queue + free:
            raise queue_full(self.name, self.max_queue)
        self.waiting += 1
        self.last_activity = time.monotonic()
        job.on_cancel_queued = self._cancel_queued
        self._queue.append(job)
        self._pump()

    def _cancel_queued(self, job: Job) -> None:
        self.waiting -= 1
        self._cancelled_in_queue += 1
        if self._cancelled_in_queue > 64 and 2 * self._cancelled_in_queue > len(self._queue):
            self._queue = collections.deque(j for j in self._queue if j.state == "queued")
            self._cancelled_in_queue = 0
        self._notify()

    def _pick(self) -> Replica | None:
        candidates = [r for r in self.replicas if r.free > 0]
        if not candidates:
            return None
        n = len(self.replicas)
        order = {r.name: (i - self._rr) % n for i, r in enumerate(self.replicas)}
        best = min(candidates, key=lambda r: (r.active, order[r.name]))
        self._rr = (self.replicas.index(best) + 1) % n
        return best

    def _pump(self) -> None:
        """Place queued jobs, oldest first, while a replica has a free slot."""
        queue_ = self._queue
        while queue_ and self.admitting:
            job = queue_[0]
            if job.state != "queued":  # cancelled while queued
                queue_.popleft()
                self._cancelled_in_queue -= 1
                continue
            replica = self._pick()
            if replica is None:
                return
            queue_.popleft()
            self.waiting -= 1
            job.on_cancel_queued = None
            replica.active += 1
            replica.jobs.add(job)
            job.mark_dispatched(replica.name, functools.partial(self._release, replica))
            replica.put(job)

    def _release(self, replica: Replica, job: Job) -> None:
        if job in replica.jobs:
            replica.jobs.discard(job)
            replica.active -= 1
        self.last_activity = time.monotonic()
        self._notify()
        self._pump()

    def _fail_queued(self, error: PoolError) -> None:
        queued, self._queue = self._queue, collections.deque()
        self._cancelled_in_queue = 0
        for job in queued:
            if job.state == "queued":
                job.on_cancel_queued = None
                self.waiting -= 1
                job.cancel(error)
        self._notify()

    # ------------------------------------------------------------------ unload and resize
    async def wait_idle(self, replicas: list[Replica] | None = None) -> None:
        while True:
            group = self.replicas if replicas is None else replicas
            if not any(r.active for r in group) and (replicas is not None or not self.waiting):
                return
            await self._wait_changed()

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
