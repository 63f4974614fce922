"""Fair sharing of one model's replica slots among its clients: priority first, then weighted
least-served slot time per ``fairness_key``.

::

    push(job) ──▶ per key, per priority: FIFO deques ──▶ pop(): the lowest ``priority`` that has
        │  admit(): 403 negative priority               work; within it the key whose slot time
        │  429 fairness_key_queue_full (per key)        / weight is least (ties: the key served
        │  429 executor_queue_full (per model)          longest ago, i.e. round-robin)

Why slot time and not request counts: a 2,000-token answer holds a slot 100 times longer than a
20-token one, so a client of long answers would get 100 times the capacity of a client of short
ones at equal request counts.  A key's **score** is the slot time of its ended jobs plus the
elapsed time of its running ones, divided by its weight (``[engine.fairness] weights``, else
``default_weight``).  Slot time runs from dispatch to release on trio's clock: the backend's
start → end plus two hand-offs of microseconds (a job is only dispatched to a free slot), and it
is charged however the job ended (failed and cancelled jobs used the slot too).  Counting
running jobs at once keeps one client from being picked for every slot that frees while its
first long jobs have not ended yet.

No banked credit: a key that becomes busy (nothing queued or running before) starts at the lowest
score among the keys busy now when its own is lower, so a client idle for an hour does not come
back with an hour's claim on the slots.  A key with nothing queued or running for
``idle_state_ttl_s`` is forgotten (and starts afresh).  ``soft_max_inflight_per_key``: a key with
that many running jobs is passed over while another key at the same priority waits, and picked
when nobody else does (a free slot never idles while work waits).

Requests without a key share one anonymous bucket (``None``) at ``default_weight``.

Cost: ``pop`` is O(keys waiting at the top priority); cancelling a queued job is O(1) (it is
skipped when it reaches the front of its deque).  Everything runs on the trio thread.

This module must not import quart or any backend.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import trio

from llm_pool.config import FairnessSettings
from llm_pool.pool.errors import PoolError, fairness_key_queue_full, queue_full
from llm_pool.pool.jobs import Job

#: Idle keys are looked for at most this often (a sweep is O(keys)).
SWEEP_EVERY_S = 10.0


class KeyState:
    """What the queue knows about one ``fairness_key`` within one model."""

    __slots__ = (
        "key", "weight", "queues", "counts", "pending", "active", "charged", "running_since",
        "last_used", "served_seq", "rejected_per_key_limit", "rejected_executor_limit",
    )  # fmt: skip

    def __init__(self, key: str | None, weight: float, now: float) -> None:
        self.key = key
        self.weight = weight
        #: priority → the key's queued jobs in arrival order (cancelled ones skipped lazily)
        self.queues: dict[int, collections.deque[Job]] = {}
        #: priority → how many of them are still queued
        self.counts: dict[int, int] = {}
        self.pending = 0
        self.active = 0
        #: slot seconds of its ended jobs
        self.charged = 0.0
        #: sum of its running jobs' dispatch times (their elapsed time is active·now − this)
        self.running_since = 0.0
        self.last_used = now
        self.served_seq = 0
        self.rejected_per_key_limit = 0
        self.rejected_executor_limit = 0

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.active)

    def score(self, now: float) -> float:
        return (self.charged + self.active * now - self.running_since) / self.weight


class FairQueue:
    """One model's queue; see the module docstring.  ``clock``: trio's, or a test's."""

    def __init__(self, settings: FairnessSettings | None = None, *, clock: Callable[[], float] = trio.current_time) -> None:
        self.settings = settings or FairnessSettings()
        self._clock = clock
        self.keys: dict[str | None, KeyState] = {}
        #: priority → the keys with a queued job at that priority
        self._levels: dict[int, set[KeyState]] = {}
        #: Jobs queued and not cancelled, all keys together.
        self.pending = 0
        self._seq = 0
        self._last_sweep = clock()
        self._may_go_first = frozenset(self.settings.negative_priority_keys)
        self.rejected_per_key_limit = 0
        self.rejected_executor_limit = 0

    def _state(self, key: str | None, now: float) -> KeyState:
        state = self.keys.get(key)
        if state is None:
            weight = self.settings.default_weight if key is None else self.settings.weights.get(key, self.settings.default_weight)
            state = self.keys[key] = KeyState(key, weight, now)
        return state

    # ------------------------------------------------------------------ admission
    def admit(self, job: Job, *, free: int, max_queue: int) -> None:
        """Raise why ``job`` may not queue now, counting the refusal against its key: 403
        ``priority_not_allowed``, 429 ``fairness_key_queue_full``, 429 ``executor_queue_full``.
        ``free``: free slots now (a job that will run at once is never refused for a queue)."""
        request = job.request
        key = request.fairness_key
        if request.priority < 0 and key not in self._may_go_first:
            raise PoolError(
                403,
                "priority_not_allowed",
                f"priority {request.priority} is below 0, which only the fairness keys in "
                "engine.fairness.negative_priority_keys may ask for"
                + ("" if key is None else f" ({key!r} is not one of them)"),
                model=request.model,
                param="priority",
            )
        state = self._state(key, self._clock())
        per_key = self.settings.max_pending_per_key
        if per_key is not None and not free and state.pending >= per_key:
            state.rejected_per_key_limit += 1
            self.rejected_per_key_limit += 1
            raise fairness_key_queue_full(request.model, key, per_key)
        limit, setting = max_queue, "max_queue"
        bound = self.settings.max_pending_per_executor
        if bound is not None and bound < max_queue:
            limit, setting = bound, "max_pending_per_executor"
        if self.pending >= limit + free:
            state.rejected_executor_limit += 1
            self.rejected_executor_limit += 1
            raise queue_full(request.model, limit, setting=setting)

    # ------------------------------------------------------------------ queue
    def push(self, job: Job) -> None:
        now = self._clock()
        state = self._state(job.request.fairness_key, now)
        if not state.busy:
            self._lift(state, now)
        priority = job.request.priority
        queue = state.queues.get(priority)
        if queue is None:
            queue = state.queues[priority] = collections.deque()
        queue.append(job)
        state.counts[priority] = state.counts.get(priority, 0) + 1
        state.pending += 1
        state.last_used = now
        self.pending += 1
        self._levels.setdefault(priority, set()).add(state)
        if now - self._last_sweep >= min(SWEEP_EVERY_S, self.settings.idle_state_ttl_s):
            self.sweep(now)

    def _lift(self, state: KeyState, now: float) -> None:
        """No banked credit: start at the lowest score among the busy keys, if below it."""
        floor = min((s.score(now) for s in self.keys.values() if s.busy and s is not state), default=None)
        if floor is not None and state.score(now) < floor:
            state.charged = floor * state.weight

    def cancel(self, job: Job) -> None:
        """``job`` was cancelled while queued: it no longer counts (it stays in its deque until
        it reaches the front, or until its level empties)."""
        state = self.keys[job.request.fairness_key]
        priority = job.request.priority
        state.pending -= 1
        state.last_used = self._clock()
        self.pending -= 1
        left = state.counts[priority] - 1
        if left:
            state.counts[priority] = left
            queue = state.queues[priority]
            if len(queue) > 2 * left + 64:  # mostly cancelled jobs: keep the memory bounded
                state.queues[priority] = collections.deque(j for j in queue if j.state == "queued")
        else:
            self._empty_level(state, priority)

    def _empty_level(self, state: KeyState, priority: int) -> None:
        del state.counts[priority]
        del state.queues[priority]  # what is left in it was cancelled
        level = self._levels[priority]
        level.discard(state)
        if not level:
            del self._levels[priority]

    def pop(self) -> Job | None:
        """The next job to run, already counted as running for its key (see :meth:`ended`);
        None when nothing is queued."""
        if not self.pending:
            return None
        priority = min(self._levels)
        now = self._clock()
        candidates: Any = self._levels[priority]
        cap = self.settings.soft_max_inflight_per_key
        if cap is not None:
            candidates = [s for s in candidates if s.active < cap] or candidates
        state = min(candidates, key=lambda s: (s.score(now), s.served_seq))
        queue = state.queues[priority]
        job = queue.popleft()
        while job.state != "queued":  # cancelled while queued: already uncounted
            job = queue.popleft()
        state.pending -= 1
        self.pending -= 1
        left = state.counts[priority] - 1
        if left:
            state.counts[priority] = left
        else:
            self._empty_level(state, priority)
        self._seq += 1
        state.served_seq = self._seq
        state.active += 1
        state.running_since += now
        state.last_used = now
        job.slot_start = now
        return job

    def ended(self, job: Job) -> None:
        """A job :meth:`pop` returned released its slot: charge its slot time to its key.
        Idempotent."""
        start = job.slot_start
        if start is None or job.slot_end is not None:
            return
        now = job.slot_end = self._clock()
        state = self.keys.get(job.request.fairness_key)
        if state is None:  # pragma: no cover - a key with a running job is never swept
            return
        state.active -= 1
        state.running_since -= start
        state.charged += now - start
        state.last_used = now

    def drain(self) -> list[Job]:
        """Every job still queued (priority order, then per key in arrival order); the queue is
        empty afterwards."""
        jobs = [
            job
            for priority in sorted(self._levels)
            for state in self._levels[priority]
            for job in state.queues[priority]
            if job.state == "queued"
        ]
        for state in self.keys.values():
            state.queues.clear()
            state.counts.clear()
            state.pending = 0
        self._levels.clear()
        self.pending = 0
        return jobs

    def sweep(self, now: float | None = None) -> None:
        """Forget the keys idle for ``idle_state_ttl_s``."""
        now = self._clock() if now is None else now
        self._last_sweep = now
        ttl = self.settings.idle_state_ttl_s
        for key in [k for k, s in self.keys.items() if not s.busy and now - s.last_used >= ttl]:
            del self.keys[key]

    # ------------------------------------------------------------------ figures
    def row(self) -> dict[str, Any]:
        """The admin API's ``fairness`` object for this model."""
        now = self._clock()
        self.sweep(now)
        keys = sorted(self.keys.values(), key=lambda s: (s.score(now), s.key or ""))
        return {
            "rejected_per_key_limit": self.rejected_per_key_limit,
            "rejected_executor_limit": self.rejected_executor_limit,
            "keys": [
                {
                    "fairness_key": s.key,
                    "pending": s.pending,
                    "active": s.active,
                    "weight": s.weight,
                    "score": round(s.score(now), 3),
                    "rejected_per_key_limit": s.rejected_per_key_limit,
                    "rejected_executor_limit": s.rejected_executor_limit,
                }
                for s in keys
            ],
        }
