"""The backend protocol: what a runtime adapter gives the pool, and the loops most adapters share.

A backend instance belongs to exactly one replica.  Two kinds exist:

* **threaded** (GGUF, CT2, ExLlamaV3): ``load()``, ``serve(inbox)`` and ``close()`` all run on the
  replica's one long-lived worker thread, in that order.  ``serve`` takes jobs from ``inbox``
  (blocking ``get`` when idle, ``get_nowait`` between steps when batching) and returns when it
  receives ``None``.  llama.cpp keeps per-thread OpenMP teams, so one thread for the replica's
  whole life is what keeps it fast.
* **async** (remote APIs): ``async load()``, ``async serve(inbox)``, ``async close()`` run in
  the replica's trio task; ``inbox`` is then a trio receive channel.

``capability`` is how many jobs one replica can honestly run at once; the pool uses
``min(target_inflight, capability)``.

An async backend whose engine can die on its own (a supervised child process) raises
:class:`EngineCrashed` from ``serve`` after ending the jobs it ran; the scheduler then closes it
and calls ``load`` again, with backoff, up to ``restart_max_attempts`` times in a row (backend
attributes; a backend without them is never restarted).

Every job taken from the inbox must end with ``job.finish`` or ``job.fail`` (``run_job`` does
that for one-at-a-time backends).  Backend libraries are imported lazily inside the adapter's
``load``, so a machine without them still serves the other models.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from llm_pool.config import ModelSettings, Settings, machine_cores, resolve_model_path
from llm_pool.pool.jobs import GenerationStats, Job

if TYPE_CHECKING:
    from llm_pool.backends.decoding import Rule

#: The thread-side inbox of a threaded backend; ``None`` asks ``serve`` to return.
Inbox = queue.SimpleQueue["Job | None"]


@dataclass(frozen=True, kw_only=True)
class BackendContext:
    """Everything an adapter may know about the model it serves."""

    name: str
    replica_index: int
    replicas: int
    model: ModelSettings
    settings: Settings
    kind: str
    # -- issue 18 (remote endpoints): which of the model's replica positions this is, 0-based;
    # reused once its replica is gone (a replica restarted keeps its own).  A remote model with
    # ``remote_endpoints`` serves endpoint ``slot`` on it.
    slot: int = 0

    def model_path(self) -> Path:
        """The resolved model file/folder; ``FileNotFoundError`` with a clear message if absent."""
        return resolve_model_path(self.settings, self.model)

    @property
    def n_threads(self) -> int:
        """Compute threads for this replica: configured, else cores (``engine.cpu_cores``, or
        those this process may run on) / replicas (at least 1)."""
        if self.model.n_threads:
            return self.model.n_threads
        cores = self.settings.engine.cpu_cores or machine_cores()
        return max(1, cores // max(1, self.replicas))


class OverrideError(ValueError):
    """A load override a backend kind refuses: ``field`` and our message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _never(model: Any) -> bool:
    return False


def _as_given(overrides: dict[str, Any]) -> dict[str, Any]:
    return overrides


@dataclass(frozen=True, kw_only=True)
class BackendKind:
    """Everything the pool knows about one backend kind, in one place.

    Each backend module defines its ``KIND``; :data:`llm_pool.backends.KINDS` registers them.
    The runtime, the serving and the web layers ask a model's kind
    (:func:`llm_pool.backends.kind_of`) instead of comparing backend names: adding a backend is
    one module (with its settings Struct in :mod:`llm_pool.config.settings`) and one registry
    line.  Field types and bounds live in that Struct's ``Meta`` alone: load overrides are
    validated by converting into it, and the admin API's ``load_constraints`` are read from it.
    """

    name: str
    create: Callable[[BackendContext], Backend]
    #: Runs on someone else's machine: a request needs ``allow_remote``, and there is no local
    #: model file (no size estimate, no prompt rendering here).
    remote: bool = False
    #: Whether a model of this kind takes GPU memory (the admin load's free-memory check).
    uses_gpu: Callable[[Any], bool] = _never
    #: Fields an admin load may override (``replicas`` always may); never a path.
    overrides: tuple[str, ...] = ()
    #: Rules between a load's override fields beyond each field's own type: returns the
    #: overrides to apply (normalised, implied fields set) or raises :class:`OverrideError`.
    check_overrides: Callable[[dict[str, Any]], dict[str, Any]] = _as_given
    #: Upper bounds read from the model file, for overrides that the file limits:
    #: ``{field: (bound, what it is)}``, ``what`` formatted with ``model`` and ``bound``; run on a
    #: worker thread.
    file_bounds: Callable[[Path], dict[str, tuple[int, str]]] | None = None
    #: Decoding values this runtime refuses beyond the API's own ranges (admission 400s).
    decoding_rules: tuple[Rule, ...] = ()
    #: Whether a request's ``seed`` makes its sampling reproducible (a remote kind: whether it is
    #: passed on).  Without it a seeded request that samples is a 400, never a seed ignored.
    seeded_sampling: bool = False
    #: Presets the admin's load form offers (``load_recommendations``): name → ``{"kind":
    #: "pair_presets", "fields", "recommended_pairs", "notes"}`` (``admin.rows.PairPresets``).
    load_recommendations: dict[str, Any] = field(default_factory=dict)
    #: What an override field's type cannot say, for the admin's ``load_constraints``: field →
    #: ``format``, ``examples``, ``null_means``, and ``default`` (the runtime's own value for
    #: null, shown when the configured value is null).
    load_constraint_notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Today's spend and remaining budget, for kinds that cost money (``remote_cost``).
    cost_summary: Callable[[Settings, Any, str], dict[str, Any] | None] | None = None
    # structured output and tool calling (issue 16)
    #: The ``response_format`` types this runtime honours (``text``, ``json_object``,
    #: ``json_schema``); a request for another is a 400, never unconstrained text.
    response_formats: tuple[str, ...] = ("text",)
    #: Whether it does tool calling (``tools`` on ``/v1/chat/completions``); else a 400.
    tools: bool = False
    # capabilities (issue 16; :mod:`llm_pool.backends.capabilities`)
    #: The ``thinking`` values a model of this kind takes; None: its prompt format's (the pool
    #: renders the prompt: ``qwen3_template`` and ``gemma4_template`` toggle it).
    thinking_modes: tuple[str, ...] | None = None
    #: Whether a conversation may have several turns; None: as its prompt format allows.
    multi_turn: bool | None = None
    # --- OpenAI semantics (issue 16 §2): logprobs and embeddings
    #: Whether a model of this kind returns per-token log probabilities (``logprobs``); others
    #: refuse a request for them with a 400.
    token_logprobs: Callable[[Any], bool] = _never
    #: Whether a model of this kind can be an embeddings model (its Struct's ``embeddings``).
    embeddings: bool = False


class EngineCrashed(Exception):
    """``serve`` ended because the engine died; the message says how (and its last words).

    ``uptime_s`` is how long the engine had served: a long-lived engine starts a new count of
    restart attempts."""

    def __init__(self, message: str, *, uptime_s: float) -> None:
        super().__init__(message)
        self.uptime_s = uptime_s


class Backend(Protocol):
    """What the runtime calls on a backend (see the module docstring for the two kinds):
    threaded backends' ``load``/``serve``/``close`` are plain methods run on the replica's
    worker thread; async backends' are coroutines run in the replica's trio task."""

    threaded: bool
    capability: int
    #: True from the moment a backend's engine process died until its next load: the scheduler
    #: then gives the replica no job, even before ``serve`` returned (in-process backends: never).
    crashed: bool

    def describe(self) -> dict[str, object]:
        """Facts worth showing an admin (threads, context size, device...)."""
        ...

    def load(self) -> Any:
        """Load the model (threaded: blocking; async: awaitable); raise with the reason."""
        ...

    def serve(self, inbox: Any) -> Any:
        """Run jobs from ``inbox`` until it yields ``None`` (threaded) or closes (async)."""
        ...

    def close(self) -> Any:
        """Release what ``load`` took; called once, also after a failed load."""
        ...

    # Optional (read with getattr, default in brackets): ``reports_handover`` [False] says the
    # backend calls ``job.hand_over()`` once its engine has a job's request (engine children:
    # the handler's response start then waits for that, see ``Job.handed_over``).
    # Optional (issue 18, a replica that is a remote endpoint; read with getattr, default in
    # brackets): ``ejected`` [False] takes the replica out of rotation while it lives (its
    # health); ``weight`` [1.0] its share in the least-loaded choice; ``async
    # rotation_changed()`` returns when ``ejected`` may have changed (the scheduler then places
    # queued work again).


@runtime_checkable
class Admits(Protocol):
    """A backend with its own admission step before the queue (the remote backend reserves a
    request's cost there): ``admit(job, submit)`` calls ``submit(job)`` or raises the refusal."""

    def admit(self, job: Job, submit: Callable[[Job], None]) -> None: ...


def run_job(generate: Callable[[Job], GenerationStats], job: Job) -> None:
    """Run one job start to end: skip it if already cancelled, time it, always end it."""
    if job.should_stop():
        job.finish(GenerationStats(finish_reason="cancelled", output_tokens=0))
        return
    job.begin()
    try:
        stats = generate(job)
    except BaseException as e:  # the replica keeps serving; the client gets a 502
        job.fail(e)
        if not isinstance(e, Exception):
            raise
    else:
        job.finish(stats)


class SequentialBackend:
    """Base for threaded backends that run one job at a time: subclasses write ``generate``."""

    threaded = True
    crashed = False  # no engine process of its own to die
    capability = 1

    def serve(self, inbox: Inbox) -> None:
        while (job := inbox.get()) is not None:
            run_job(self.generate, job)

    def generate(self, job: Job) -> GenerationStats:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        return {}


class StreamTimer:
    """Per-job generation timers, as backends report them (milliseconds)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.t_prompt_ready: float | None = None
        self.t_first: float | None = None
        self.tokens = 0

    def prompt_ready(self) -> None:
        self.t_prompt_ready = time.perf_counter()

    def token(self) -> None:
        self.tokens += 1
        if self.t_first is None:
            self.t_first = time.perf_counter()

    def stats(self, *, finish_reason: str, prompt_tokens: int | None) -> GenerationStats:
        end = time.perf_counter()
        start = self.t_prompt_ready or self.t0
        ms = lambda s: round(s * 1000.0, 3)  # noqa: E731
        return GenerationStats(
            finish_reason=finish_reason,  # type: ignore[arg-type]
            prompt_tokens=prompt_tokens,
            output_tokens=self.tokens,
            tokenize_ms=ms(start - self.t0),
            time_to_first_token_ms=ms(self.t_first - start) if self.t_first else None,
            generate_total_ms=ms(end - start),
            decode_after_first_token_ms=ms(end - self.t_first) if self.t_first else None,
        )


async def cancel_when_stopped(job: Job, scope: Any) -> None:
    """Cancel ``scope`` (a ``trio.CancelScope`` around one job's work in an async backend) as
    soon as the job is cancelled: its client left, or the model is unloading."""
    await job.wait_stopped()
    scope.cancel()
