"""Tuning: measure a GGUF model's replica layouts on this machine, and remember the best.

A **layout** is how a model's cores are cut: ``replicas`` × ``threads`` per replica × ``slots``
(requests one replica runs at once: ``target_inflight``), on one of three engines that read the
same GGUF file: ``gguf`` (in-process, one request at a time), ``gguf_batched`` (in-process,
``gguf_batching = true``) and ``llama_server`` (one supervised ``llama-server`` per replica).
On small models llama.cpp's threads scale poorly, so the cut decides a large share of the speed.

:func:`sweep` loads each layout in turn as a private :class:`~llm_pool.pool.scheduler.ModelRuntime`
(never a configured model's: the pool's loaded models are not touched), drives the synthetic
workload of :mod:`llm_pool.pool.workload` at each concurrency, and unloads it.  Every layout uses
at most the cores it was given (``replicas × threads ≤ cores``); a request for more cores than
the machine has is refused (:class:`TuneError`).  The sweep is bounded: ``max_s`` seconds in all
(layouts not reached are reported as skipped), and cancelling it (Ctrl-C, an admin cancel)
unloads the layout being measured at once.

The result is recorded per engine family (``gguf``, which covers both in-process modes, and
``llama_server``) in a small JSON cache keyed by the model file's fingerprint, the family, the
cores and the engine build; ``replicas = "auto"`` reads it at load (:func:`resolve_auto`).  The
cache lives under the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``, then
``llm-pool/tune``; ``$LLM_POOL_TUNE_CACHE_DIR`` overrides it) and its path is never shown in an
answer.

This module must not import quart.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import msgspec
import trio

from llm_pool.backends import BackendContext, create_backend
from llm_pool.config import ModelSettings, Settings, machine_cores, resolve_model_path
from llm_pool.config.settings import GGUFModel, LlamaServerModel
from llm_pool.pool.jobs import Decoding, Delta, Done, Failed, GenerationRequest, Job, Message
from llm_pool.pool.scheduler import LoadFailed, ModelRuntime
from llm_pool.pool.workload import PROMPT, SYSTEM, Answer, Cell, drive, requests_for

log = logging.getLogger("llm_pool.tuning")

Engine = Literal["gguf", "gguf_batched", "llama_server"]
ENGINES: tuple[Engine, ...] = ("gguf", "gguf_batched", "llama_server")
#: Which settings Struct (``backend``) each engine is, and so which cache family it records in.
FAMILY: dict[Engine, str] = {"gguf": "gguf", "gguf_batched": "gguf", "llama_server": "llama_server"}
DEFAULT_CONCURRENCIES = (1, 4, 8)
#: Tokens per request: long enough that decoding, not the prompt, dominates; short enough
#: that a sweep of a dozen layouts on a small model takes minutes.
DEFAULT_TOKENS = 64
#: The whole sweep's bound; layouts not reached by then are reported as skipped.
DEFAULT_MAX_S = 600.0
#: More replicas than this are not tried (past it each replica's share of the cores is tiny).
MAX_REPLICAS = 8
#: Bumped when the cache's shape changes: older records are then ignored.
CACHE_VERSION = 1
#: How much of the model file its fingerprint reads, at each end: enough to tell two files
#: apart (headers, first and last tensors) without reading gigabytes at every load.
FINGERPRINT_BYTES = 1 << 20


class TuneError(Exception):
    """A tune that cannot run as asked (too many cores, a backend that is not a GGUF engine);
    the message says why, in our words."""


# ---------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """One way to cut the cores: see the module docstring."""

    engine: Engine
    replicas: int
    threads: int
    slots: int

    @property
    def label(self) -> str:
        return f"{self.engine} {self.replicas}x{self.threads}t x{self.slots}"

    def fields(self) -> dict[str, Any]:
        """The model settings this layout sets."""
        out: dict[str, Any] = {
            "replicas": self.replicas,
            "replica_max": self.replicas,
            "n_threads": self.threads,
            "target_inflight": self.slots,
        }
        if FAMILY[self.engine] == "gguf":
            out["gguf_batching"] = self.engine == "gguf_batched"
        return out

    def config_lines(self) -> list[str]:
        """``pool.toml`` lines for a model served with this layout."""
        lines = [f'backend = "{FAMILY[self.engine]}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in self.fields().items()]
        return lines


def cores_for(settings: Settings, requested: int | None = None) -> int:
    """The cores a tune (or a ``replicas = "auto"`` load) works within: ``requested``, else
    ``engine.cpu_cores``, else every core; :class:`TuneError` when that is more than exist."""
    have = machine_cores()
    cores = requested or settings.engine.cpu_cores or have
    if cores > have:
        where = "requested" if requested else "engine.cpu_cores asks for"
        raise TuneError(f"{where} {cores} cores but this machine has {have}")
    return cores


def layouts(engines: tuple[Engine, ...], cores: int, concurrencies: tuple[int, ...]) -> list[Layout]:
    """The layouts a sweep measures: replica counts that divide the cores (each replica gets
    ``cores // replicas`` threads, so every core works), at most :data:`MAX_REPLICAS` and at
    most the highest concurrency; per replica count, the slots that fit each concurrency
    (``ceil(c / replicas)``; 1 for the one-at-a-time ``gguf``, at least 2 for ``gguf_batched``)."""
    top = max(concurrencies)
    counts = [r for r in range(1, min(cores, MAX_REPLICAS, max(top, 1)) + 1) if cores % r == 0]
    out: list[Layout] = []
    for engine in engines:
        for r in counts:
            t = cores // r
            slots = sorted({max(1, math.ceil(c / r)) for c in concurrencies})
            if engine == "gguf":
                slots = [1]
            elif engine == "gguf_batched":
                slots = [s for s in slots if s >= 2] or [2]
            out += [Layout(engine, r, t, s) for s in slots]
    return out


# ---------------------------------------------------------------------------- results
@dataclass
class Row:
    """One layout's figures: ``cells[c]`` per concurrency, or why it has none."""

    layout: Layout
    cells: dict[int, Cell] = field(default_factory=dict)
    load_s: float | None = None
    error: str | None = None
    skipped: str | None = None


@dataclass
class TuneResult:
    model: str
    backend: str
    cores: int
    concurrencies: tuple[int, ...]
    tokens: int
    rows: list[Row] = field(default_factory=list)
    #: True when the sweep was cut short (its time budget, or a cancel): the figures so far.
    partial: bool = False

    def best(self, concurrency: int, family: str | None = None) -> Row | None:
        """The measured layout with the highest tokens/s at ``concurrency`` (ties: the lower
        TTFT p50), within ``family`` if given."""
        measured = [
            r for r in self.rows if concurrency in r.cells and (family is None or FAMILY[r.layout.engine] == family)
        ]
        if not measured:
            return None
        return max(measured, key=lambda r: (r.cells[concurrency].tokens_per_s, -r.cells[concurrency].ttft_p50_s))

    def recommended(self, family: str | None) -> Row | None:
        """The one layout of ``family`` (None: any) to serve every concurrency with: the highest mean, over
        the concurrencies, of its tokens/s as a share of that concurrency's best (a layout
        that is best at c=8 but poor at c=1 loses to one that is close at every c).  Only
        layouts measured at every concurrency count."""
        bests = {c: self.best(c, family) for c in self.concurrencies}
        if any(b is None for b in bests.values()):
            return None
        rows = [
            r for r in self.rows
            if family in (None, FAMILY[r.layout.engine]) and all(c in r.cells for c in self.concurrencies)
        ]  # fmt: skip

        def score(r: Row) -> float:
            shares = []
            for c, b in bests.items():
                top = b.cells[c].tokens_per_s if b else 0.0
                shares.append(r.cells[c].tokens_per_s / top if top > 0 else 0.0)
            return sum(shares) / len(shares)

        return max(rows, key=score) if rows else None


def format_table(result: TuneResult) -> list[str]:
    """The result as a Markdown table (one row per layout, tokens/s and TTFT p50 per
    concurrency), the best layout per concurrency, and the lines to paste per family."""
    cs = result.concurrencies
    lines = [
        f"# tune {result.model}: {result.cores} cores, {result.tokens} tokens per request, greedy, streaming"
        + (" (partial: cut short)" if result.partial else ""),
        "| layout | replicas | threads | slots | " + " | ".join(f"c={c} tok/s | c={c} TTFT p50 ms" for c in cs) + " |",
        "| --- | --- | --- | --- | " + " | ".join("--- | ---" for _ in cs) + " |",
    ]
    for row in result.rows:
        lay = row.layout
        if row.cells:
            figures = [
                f"{row.cells[c].tokens_per_s:.1f} | {row.cells[c].ttft_p50_s * 1000:.0f}" if c in row.cells else "- | -"
                for c in cs
            ]
        else:
            figures = ["- | -" for _ in cs]
        note = f" ({row.error or row.skipped})" if (row.error or row.skipped) else ""
        lines.append(f"| {lay.engine}{note} | {lay.replicas} | {lay.threads} | {lay.slots} | " + " | ".join(figures) + " |")
    for c in cs:
        best = result.best(c)
        if best is not None:
            lines.append(f"best at c={c}: {best.layout.label}, {best.cells[c].tokens_per_s:.1f} tok/s, "
                         f"TTFT p50 {best.cells[c].ttft_p50_s * 1000:.0f} ms")
    for family in sorted({FAMILY[r.layout.engine] for r in result.rows}):
        rec = result.recommended(family)
        if rec is not None:
            lines.append(f"# {family}: best over every concurrency: {rec.layout.label}; paste into the model's table:")
            lines += rec.layout.config_lines()
            lines.append(f'# or keep `replicas = "auto"` (backend "{family}"): it loads this layout on this machine')
    return lines


# ---------------------------------------------------------------------------- the sweep
def tunable(model: ModelSettings, name: str) -> None:
    """:class:`TuneError` unless ``model`` runs a GGUF file on a local llama.cpp engine."""
    if not isinstance(model, (GGUFModel, LlamaServerModel)):
        raise TuneError(f"model {name!r} uses backend {model.backend}; tune measures gguf and llama_server models")


def settings_for(model: ModelSettings, layout: Layout) -> ModelSettings:
    """``model`` served with ``layout`` on its engine: the same file, prompt format and context
    per sequence; a private load (no restarts, no idle timer, a queue the workload fits in)."""
    base = {f: getattr(model, f) for f in ("model_path", "prompt_format", "enable_thinking", "allow_special_tokens_in_input")}
    n_ctx = model.gguf_n_ctx if isinstance(model, GGUFModel) else getattr(model, "llama_server_n_ctx", 2048)
    family = FAMILY[layout.engine]
    if model.backend == family:
        out: Any = model
    elif family == "llama_server":
        out = msgspec.convert({**base, "backend": "llama_server", "llama_server_n_ctx": n_ctx}, LlamaServerModel)
    else:
        out = msgspec.convert({**base, "backend": "gguf", "gguf_n_ctx": n_ctx}, GGUFModel)
    return msgspec.structs.replace(
        out, **layout.fields(), enabled=True, max_queue=4096, restart_max_attempts=0,
        idle_unload_after_s=None, load_on_demand=False, queue_timeout_s=None,
    )  # fmt: skip


Progress = Callable[[str], None]


async def _one(runtime: ModelRuntime, name: str, tokens: int, errors: list[str]) -> Answer:
    """One request of the workload; a failed one adds its message to ``errors``."""
    request = GenerationRequest(
        model=name,
        messages=[Message(role="system", content=SYSTEM), Message(role="user", content=PROMPT)],
        decoding=Decoding(temperature=0.0, top_k=1, max_tokens=tokens),
        stream=True,
    )
    job = Job(request)
    t0 = time.perf_counter()
    first: float | None = None
    n = 0
    runtime.submit_nowait(job)
    try:
        async for event in job.events():
            if isinstance(event, Delta) and first is None and event.text:
                first = time.perf_counter() - t0
            elif isinstance(event, Done):
                n = event.stats.output_tokens or 0
            elif isinstance(event, Failed):
                errors.append(event.error.message)
    finally:
        if not job.ended:
            job.cancel()
    return Answer(ttft_s=first if first is not None else time.perf_counter() - t0, tokens=n)


async def _measure_layout(
    settings: Settings, name: str, model: ModelSettings, row: Row, concurrencies: tuple[int, ...], tokens: int,
    progress: Progress, backend_factory: Callable[[BackendContext], Any] = create_backend,
) -> None:  # fmt: skip
    layout = row.layout

    def make_backend(index: int) -> Any:
        ctx = BackendContext(name=name, replica_index=index, replicas=layout.replicas, model=model, settings=settings,
                             kind=model.backend)
        return backend_factory(ctx)

    runtime = ModelRuntime(f"tune:{name}", make_backend=make_backend, target_inflight=layout.slots, max_queue=4096)
    loaded = trio.Event()
    failed: list[str] = []

    async def lifetime() -> None:
        try:
            await runtime.run(layout.replicas, on_loaded=loaded.set)
        except LoadFailed as e:
            failed.append(str(e))
        finally:
            loaded.set()

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lifetime)
        try:
            await loaded.wait()
            if failed or not runtime.admitting:
                row.error = f"load failed: {failed[0] if failed else 'no replica left'}"
                return
            row.load_s = time.perf_counter() - t0
            errors: list[str] = []
            one = functools.partial(_one, runtime, f"tune:{name}", tokens, errors)
            await drive(one, 1, 1)  # warm-up
            for c in concurrencies:
                cell = await drive(one, c, requests_for(c))
                if errors:  # the layout does not serve: no figures from it
                    row.error = f"a request failed: {errors[0]}"
                    return
                row.cells[c] = cell
                progress(f"  {layout.label} c={c}: {cell.tokens_per_s:.1f} tok/s, TTFT p50 {cell.ttft_p50_s * 1000:.0f} ms")
        finally:
            with trio.CancelScope(shield=True):
                if runtime.admitting or runtime.alive:
                    await runtime.stop(drain_timeout=0)
            nursery.cancel_scope.cancel()


async def sweep(
    settings: Settings,
    name: str,
    *,
    cores: int | None = None,
    concurrencies: tuple[int, ...] = DEFAULT_CONCURRENCIES,
    engines: tuple[Engine, ...] = ENGINES,
    tokens: int = DEFAULT_TOKENS,
    max_s: float = DEFAULT_MAX_S,
    progress: Progress = lambda line: None,
    record: bool = True,
    on_row: Callable[[TuneResult], None] = lambda result: None,
    backend_factory: Callable[[BackendContext], Any] = create_backend,
) -> TuneResult:
    """Measure every layout of ``name`` within ``cores`` (see the module docstring); the
    result, also recorded in the tuning cache when ``record`` (per family, when the sweep
    measured every layout of that family at every concurrency or ran out of time).

    Raises :class:`TuneError` before anything is loaded when the model is not a GGUF model,
    its file is missing, or ``cores`` is more than the machine has.

    Cancellation: cancelling the caller unloads the layout being measured (its engines end at
    their next token, child processes are reaped) and records nothing.
    """
    if name not in settings.engine.models:
        raise TuneError(f"no model named {name!r} in the settings")
    model = settings.engine.models[name]
    tunable(model, name)
    n_cores = cores_for(settings, cores)
    try:
        path = await trio.to_thread.run_sync(resolve_model_path, settings, model)
    except FileNotFoundError:
        raise TuneError(f"model {name!r}: its model file does not exist") from None
    result = TuneResult(model=name, backend=model.backend, cores=n_cores, concurrencies=concurrencies, tokens=tokens)
    result.rows = [Row(layout) for layout in layouts(engines, n_cores, concurrencies)]
    on_row(result)
    deadline = trio.current_time() + max_s
    progress(f"tuning {name}: {len(result.rows)} layouts within {n_cores} cores, concurrency {','.join(map(str, concurrencies))}, "
             f"at most {max_s:g} s")
    for i, row in enumerate(result.rows, 1):
        if trio.current_time() >= deadline:
            row.skipped = "time budget spent"
            result.partial = True
            continue
        progress(f"[{i}/{len(result.rows)}] {row.layout.label}")
        with trio.move_on_at(deadline):
            await _measure_layout(
                settings, name, settings_for(model, row.layout), row, concurrencies, tokens, progress, backend_factory
            )
        if len(row.cells) < len(concurrencies) and row.error is None:
            row.skipped = "time budget spent"
            result.partial = True
        on_row(result)
    if record:
        await trio.to_thread.run_sync(record_result, result, path, settings)
    return result


# ---------------------------------------------------------------------------- a tune in the server
TuneState = Literal["running", "done", "cancelled", "failed"]
#: Progress lines a server-side tune keeps (the newest).
PROGRESS_LINES = 200


class TuneJob:
    """One tune run by the server (``POST /v1/admin/models/{name}/tune``): :meth:`run` is a task
    in the pool manager's nursery; the admin API reads its state, progress and (partial)
    result, and :meth:`cancel` stops it (the layout being measured is unloaded at once)."""

    def __init__(
        self, model: str, *, cores: int | None, concurrencies: tuple[int, ...], engines: tuple[Engine, ...],
        tokens: int, max_s: float,
    ) -> None:  # fmt: skip
        self.model = model
        self.cores = cores
        self.concurrencies = concurrencies
        self.engines = engines
        self.tokens = tokens
        self.max_s = max_s
        self.state: TuneState = "running"
        self.error: str | None = None
        self.progress: collections.deque[str] = collections.deque(maxlen=PROGRESS_LINES)
        self.result: TuneResult | None = None
        self.started_at = time.time()
        self.finished_at: float | None = None
        #: Set when :meth:`run` ended, however.
        self.finished = trio.Event()
        self._scope = trio.CancelScope()

    def cancel(self) -> None:
        self._scope.cancel()

    async def run(self, settings: Settings, backend_factory: Callable[[BackendContext], Any] = create_backend) -> None:
        """The sweep; never raises (its end is :attr:`state`, and :attr:`error` says why it failed).

        Cancellation: :meth:`cancel`, or the manager's nursery (shutdown): state ``cancelled``,
        nothing recorded."""

        def keep(result: TuneResult) -> None:
            self.result = result

        try:
            with self._scope:
                await sweep(
                    settings, self.model, cores=self.cores, concurrencies=self.concurrencies, engines=self.engines,
                    tokens=self.tokens, max_s=self.max_s, progress=self.progress.append, on_row=keep,
                    backend_factory=backend_factory,
                )  # fmt: skip
                self.state = "done"
        except TuneError as e:
            self.state, self.error = "failed", str(e)
        except Exception as e:  # a bug: the tune ends, the pool goes on
            log.exception("tune of %s failed", self.model)
            self.state, self.error = "failed", f"{type(e).__name__}: {e}"
        finally:
            if self.state == "running":
                self.state = "cancelled"
            self.finished_at = time.time()
            self.finished.set()


# ---------------------------------------------------------------------------- the cache
def cache_dir() -> Path:
    """Where tuning results are kept (see the module docstring)."""
    if env := os.environ.get("LLM_POOL_TUNE_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-pool" / "tune"


def fingerprint(path: Path) -> str:
    """The model file's identity: SHA-256 of its size and its first and last
    :data:`FINGERPRINT_BYTES` (a folder: of its files' names and sizes)."""
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(f"{p.relative_to(path)}:{p.stat().st_size}\n".encode())
        return h.hexdigest()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def build_id(family: str, model: ModelSettings | None = None) -> str:
    """The engine build a result was measured with: llama-cpp-python's version, and for
    ``llama_server`` the binary's size and time (a rebuilt engine is a new build)."""
    try:
        llama = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        llama = "none"
    if family != "llama_server":
        return f"llama-cpp-python {llama}"
    from llm_pool.backends.llama_server import default_binary

    configured = getattr(model, "llama_server_binary", None)
    binary = Path(configured) if configured else default_binary()
    try:
        st = binary.stat()
        return f"llama-cpp-python {llama}; llama-server {st.st_size}:{int(st.st_mtime)}"
    except OSError:
        return f"llama-cpp-python {llama}; llama-server missing"


def _cache_file(fp: str, family: str, cores: int, build: str) -> Path:
    key = hashlib.sha256(json.dumps([CACHE_VERSION, fp, family, cores, build]).encode()).hexdigest()[:32]
    return cache_dir() / f"{key}.json"


def record_result(result: TuneResult, path: Path, settings: Settings) -> list[str]:
    """Write each family's recommended layout (and the table) to the cache; the families
    written.  A family is written only when its every layout was measured (or the sweep ran
    out of time after measuring some: the best of those is still better than a guess)."""
    fp = fingerprint(path)
    model = settings.engine.models.get(result.model)
    written = []
    for family in sorted({FAMILY[r.layout.engine] for r in result.rows}):
        rec = result.recommended(family)
        if rec is None:
            continue
        build = build_id(family, model if model is not None and model.backend == family else None)
        data = {
            "version": CACHE_VERSION,
            "fingerprint": fp,
            "family": family,
            "cores": result.cores,
            "build": build,
            "recorded_at": time.time(),
            "concurrencies": list(result.concurrencies),
            "tokens": result.tokens,
            "partial": result.partial,
            "recommended": asdict(rec.layout),
            "rows": [
                {"layout": asdict(r.layout), "error": r.error, "skipped": r.skipped,
                 "cells": {str(c): asdict(cell) for c, cell in r.cells.items()}}
                for r in result.rows if FAMILY[r.layout.engine] == family
            ],
        }  # fmt: skip
        target = _cache_file(fp, family, result.cores, build)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(target)  # atomic: a load reading it never sees half a file
        written.append(family)
    return written


def lookup(settings: Settings, model: ModelSettings) -> Layout | None:
    """The layout last recorded for ``model``'s file, backend, cores and build, or None."""
    try:
        path = resolve_model_path(settings, model)
        cores = cores_for(settings)
        family = model.backend
        target = _cache_file(fingerprint(path), family, cores, build_id(family, model))
        data = json.loads(target.read_text())
        rec = data["recommended"]
        layout = Layout(engine=rec["engine"], replicas=int(rec["replicas"]), threads=int(rec["threads"]), slots=int(rec["slots"]))
    except (OSError, ValueError, KeyError, TypeError, TuneError):
        return None
    if layout.engine not in ENGINES or FAMILY[layout.engine] != model.backend or layout.replicas < 1:
        return None
    return layout


ReplicasSource = Literal["configured", "override", "tuned", "default", "auto"]


def resolve_auto(settings: Settings, model: ModelSettings) -> tuple[dict[str, Any], ReplicasSource]:
    """The settings a ``replicas = "auto"`` model loads with, and where they came from:
    ``tuned`` (the cache's layout: replicas, threads, slots and, for ``gguf``, batching; its
    ``replica_max`` raised to the tuned count when lower) or ``default`` (no record: one replica
    on every core, the model's own ``target_inflight``).  Reads files: call it on a worker
    thread."""
    layout = lookup(settings, model) if isinstance(model, (GGUFModel, LlamaServerModel)) else None
    if layout is not None and layout.replicas > 1 and getattr(model, "llama_server_port", None) is not None:
        layout = None  # a fixed port holds one engine: the tuned count cannot load
    if layout is None:
        return {"replicas": 1}, "default"
    fields = layout.fields()
    fields["replica_max"] = max(model.replica_max, layout.replicas)
    return fields, "tuned"
