"""GGUF models served by llama.cpp's own ``llama-server``, one supervised child process per replica.

An async backend (``threaded = False``): ``load``, ``serve`` and ``close`` run in the replica's
trio task.  ``load`` starts the engine through :class:`backends.engine_process.EngineProcess`
(own process group, output in our logs, no orphan ever) and waits until it is ready; ``serve``
runs each job in its own task over the engine's HTTP API; ``close`` stops the child.  Why a
child and not llama-cpp-python in-process: a crash in native code ends one child, never the
pool, and the engine batches its own ``--parallel`` slots.

The child::

    llama-server -m MODEL --host 127.0.0.1 --port 0 --parallel TARGET_INFLIGHT
                 --ctx-size N_CTX*TARGET_INFLIGHT -t/-tb N_THREADS --log-jsonl --no-webui ...
    env: LLAMA_API_KEY=<fresh per start>, LD_LIBRARY_PATH=<llama_server_library_path>:..., llama_server_env

* The API key is new at every start and travels in the environment (readable only by our user,
  unlike the command line), so nothing else on the host can call the engine.
* Port 0: the engine binds a free loopback port and names it in its "listening on" line, which
  it prints once the model is loaded; then ``GET /health`` must answer 200.  Both within
  ``start_timeout_s``; an engine that exits first fails the load at once with its last lines.
* ``--parallel`` is ``target_inflight`` and so is ``capability``: the pool never sends more jobs
  than the engine has slots, and each slot gets the whole ``llama_server_n_ctx``.

One job (same rules as the in-process GGUF backend):

* The prompt is rendered and tokenized here exactly as the in-process GGUF backend does it
  (:mod:`backends.prompts`: special tokens parsed in the template's markup only, the size
  bounds first), with the GGUF file's own vocabulary opened ``vocab_only`` in this process
  (:func:`~backends.gguf.open_vocab`), then sent as token ids to ``POST /completion``
  (``stream: true``): the engine never parses caller text for control tokens, and a prompt has
  the same tokens in both backends.
* Stop strings are applied here (:class:`~backends.prompts.StopMatcher`), never emitting part of
  one; a hit closes the stream.  Greedy when ``temperature == 0`` or ``top_k == 1``; a
  request's ``seed`` is sent as the engine's ``seed`` (32 bits, :func:`~backends.decoding.engine_seed`),
  its OpenAI penalties as ``presence_penalty`` / ``frequency_penalty``.
* Metrics: wall-clock timers as every backend, replaced by the engine's own ``timings``
  (``prompt_ms``, ``predicted_ms``, ``predicted_n``, ``prompt_n``) when it sent them.

Failures::

    engine died while the job ran       → 502 engine_crashed (the replica restarts, see below)
    engine answered an error status     → 502 backend_error with the engine's message
    connection lost, engine still alive → 502 backend_error
    prompt too long for n_ctx           → 400 invalid_request (as in-process GGUF)

Crash: when the child exits on its own, every job it ran ends with ``engine_crashed`` and
``serve`` raises :class:`~backends.base.EngineCrashed`; the scheduler restarts the replica with
backoff (``restart_max_attempts``, ``restart_backoff_s``) while queued jobs go to the model's
other replicas.

Cancellation: a cancelled job (client gone, unload) has its scope cancelled at once
(:func:`~backends.base.cancel_when_stopped`): the stream to the engine is closed, and
llama-server aborts that sequence and frees its slot.  ``close`` always stops the child (SIGTERM, SIGKILL after ``stop_timeout_s``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from llm_pool.backends.base import BackendKind, EngineCrashed, StreamTimer, cancel_when_stopped
from llm_pool.backends.decoding import engine_seed
from llm_pool.backends.engine_process import EngineProcess, describe_exit, engine_env
from llm_pool.backends.llama_common import open_vocab, set_prompt_model
from llm_pool.backends.prompts import PromptPrep
from llm_pool.pool.errors import PoolError, backend_error, engine_crashed, request_cancelled
from llm_pool.pool.jobs import GenerationStats, Job

if TYPE_CHECKING:
    from llm_pool.backends.base import BackendContext

log = logging.getLogger("llm_pool.llama_server")

#: After a lost connection, how long to wait for the child's exit before calling it a crash.
CRASH_CONFIRM_S = 1.0
#: How long a crash report waits for the child's last output lines.
LAST_WORDS_S = 0.5
#: Between two health probes while the engine starts.
HEALTH_POLL_S = 0.05
#: Engine error text quoted in a message is cut to this many characters.
QUOTE_MAX = 300
LISTENING = re.compile(r"listening on (https?://\S+?)/?$")


def default_binary() -> Path:
    """The llama-server ``make install`` builds: the venv's ``bin/`` (beside this Python)."""
    return Path(sys.prefix) / "bin" / "llama-server"


class LlamaServerBackend:
    """One replica: one llama-server child; see the module docstring."""

    threaded = False

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.replica = f"{ctx.name}#{ctx.replica_index}"
        self.model = ctx.model
        self.capability = ctx.model.target_inflight
        self.prompts: PromptPrep[int] = PromptPrep(ctx.model, backend="llama_server")
        #: The GGUF file's tokenizer (``llama_cpp._internals.LlamaModel``, vocab only), kept
        #: across engine restarts.
        self._vocab: Any = None
        #: Context per slot, as the engine reports it once started.
        self.n_ctx = ctx.model.llama_server_n_ctx
        self.engine: EngineProcess | None = None
        self.base_url = ""
        self.starts = 0
        self._client: httpx.AsyncClient | None = None
        self._started_at = 0.0
        self._running: dict[Job, trio.CancelScope] = {}
        self._crash: str | None = None
        #: True from the moment the engine died until the next load: the scheduler then gives
        #: this replica no job (see ``Replica.free``).
        self.crashed = False

    def describe(self) -> dict[str, object]:
        engine = self.engine
        return {
            "binary": str(self._binary()),
            "url": self.base_url or None,
            "pid": engine.pid if engine else None,
            "engine_pid": engine.engine_pid if engine else None,
            "parallel": self.capability,
            "n_ctx": self.n_ctx,
            "n_threads": self.ctx.n_threads,
            "starts": self.starts,
        }

    # ------------------------------------------------------------------ configuration
    def _binary(self) -> Path:
        configured = self.model.llama_server_binary
        return self._path(configured) if configured else default_binary()

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else Path(self.ctx.settings.base_dir) / path

    def _existing(self, key: str) -> Path | None:
        value = getattr(self.model, key)
        if value is None:
            return None
        path = self._path(value)
        if not path.exists():
            raise FileNotFoundError(f"{key} {value!r}: no such file or directory: {path}")
        return path

    def argv(self, model_path: Path) -> list[str]:
        """The engine's command line (no secret in it: the key is in the environment)."""
        m = self.model
        n = self.capability
        argv = [
            str(self._binary()),
            "--model", str(model_path),
            "--host", m.llama_server_host,
            "--port", str(m.llama_server_port or 0),
            "--parallel", str(n),
            "--ctx-size", str(m.llama_server_n_ctx * n),
            "--threads", str(self.ctx.n_threads),
            "--threads-batch", str(self.ctx.n_threads),
            "--n-gpu-layers", str(m.llama_server_n_gpu_layers),
            "--flash-attn", m.llama_server_flash_attn,
            "--log-jsonl",
            "--no-webui",
        ]  # fmt: skip
        if (mmproj := self._existing("llama_server_mmproj_path")) is not None:
            argv += ["--mmproj", str(mmproj)]
        if m.llama_server_image_max_tokens is not None:
            argv += ["--image-max-tokens", str(m.llama_server_image_max_tokens)]
        if (draft := self._existing("llama_server_draft_model_path")) is not None:
            argv += ["--spec-draft-model", str(draft)]
        if m.llama_server_spec_type is not None:
            argv += ["--spec-type", m.llama_server_spec_type]
        if m.llama_server_spec_draft_n_max is not None:
            argv += ["--spec-draft-n-max", str(m.llama_server_spec_draft_n_max)]
        if m.llama_server_spec_draft_p_min is not None:
            argv += ["--spec-draft-p-min", f"{m.llama_server_spec_draft_p_min:g}"]
        if m.llama_server_spec_draft_ngl is not None:
            argv += ["--spec-draft-ngl", str(m.llama_server_spec_draft_ngl)]
        if m.llama_server_reasoning is not None:
            argv += ["--reasoning", m.llama_server_reasoning]
        return argv + list(m.llama_server_extra_args)

    # ------------------------------------------------------------------ lifetime
    async def load(self) -> None:
        """Start the engine and wait until it serves; raises with the reason (and the engine's
        last lines) otherwise, leaving no process behind."""
        m = self.model
        model_path = self.ctx.model_path()
        binary = self._binary()
        if not os.access(binary, os.X_OK):
            hint = "set llama_server_binary" if m.llama_server_binary else "run `make install` (it builds llama-server)"
            raise RuntimeError(f"llama-server binary not found or not executable: {binary}; {hint}")
        if self._vocab is None:
            self._vocab = await trio.to_thread.run_sync(open_vocab, model_path)
            set_prompt_model(self.prompts, self._vocab)
        argv = self.argv(model_path)
        key = secrets.token_urlsafe(32)
        env = engine_env(os.environ, library_path=m.llama_server_library_path, extra=m.llama_server_env)
        env["LLAMA_API_KEY"] = key
        listening = trio.Event()
        found: list[str] = []

        def on_line(line: str) -> None:
            if not found and (match := LISTENING.search(line)):
                found.append(match.group(1))
                listening.set()

        self._crash = None
        self.crashed = False
        self.base_url = ""
        engine = EngineProcess(
            argv, env=env, model=self.name, replica=self.replica, stop_timeout_s=m.stop_timeout_s, on_line=on_line
        )
        self.engine = engine
        client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=max(4, 2 * self.capability)),
        )
        try:
            try:
                await engine.start()
            except OSError as e:
                raise RuntimeError(f"cannot start llama-server {binary}: {e.strerror or e}") from None
            with trio.move_on_after(m.start_timeout_s) as timer:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(engine.run_io)
                    await self._wait_ready(engine, listening, found, client)
                    nursery.cancel_scope.cancel()
            if engine.exited.is_set():
                with trio.move_on_after(LAST_WORDS_S):
                    await engine.output_closed.wait()
                raise RuntimeError(
                    f"llama-server exited while starting ({describe_exit(engine.returncode)}): {engine.tail()}"
                )
            if timer.cancelled_caught:
                raise RuntimeError(
                    f"llama-server did not become ready within {m.start_timeout_s:g}s (start_timeout_s); "
                    f"its last lines: {engine.tail()}"
                )
            await self._read_props(client)
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
                await engine.stop()
            raise
        self._client = client
        self.starts += 1
        self._started_at = time.monotonic()
        log.info(
            "llama-server ready",
            extra={"fields": {"model": self.name, "replica": self.replica, "url": self.base_url, "pid": engine.pid,
                              "engine_pid": engine.engine_pid, "parallel": self.capability, "n_ctx": self.n_ctx}},
        )

    async def _wait_ready(
        self, engine: EngineProcess, listening: trio.Event, found: list[str], client: httpx.AsyncClient
    ) -> None:
        """Return once ``/health`` answers 200, or once the engine exited."""
        async with trio.open_nursery() as nursery:

            async def exited() -> None:
                await engine.exited.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(exited)
            await listening.wait()
            self.base_url = found[0]
            while True:
                try:
                    r = await client.get(f"{self.base_url}/health")
                    if r.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await trio.sleep(HEALTH_POLL_S)
            nursery.cancel_scope.cancel()

    async def _read_props(self, client: httpx.AsyncClient) -> None:
        r = await client.get(f"{self.base_url}/props")
        if r.status_code != 200:
            raise RuntimeError(f"llama-server /props answered HTTP {r.status_code}: {_quote(r.text)}")
        props = r.json()
        n_ctx = props.get("default_generation_settings", {}).get("n_ctx")
        if isinstance(n_ctx, int) and n_ctx > 0:
            self.n_ctx = n_ctx

    async def close(self) -> None:
        client, self._client = self._client, None
        engine = self.engine
        with trio.CancelScope(shield=True):
            if client is not None:
                await client.aclose()
            if engine is not None:
                await engine.stop()
        vocab, self._vocab = self._vocab, None
        if vocab is not None:
            vocab.close()

    # ------------------------------------------------------------------ serving
    async def serve(self, inbox: trio.MemoryReceiveChannel[Job | None]) -> None:
        """Run each job in its own task until ``inbox`` is closed and every job ended; raise
        :class:`EngineCrashed` if the engine died first (its jobs already ended)."""
        engine = self.engine
        assert engine is not None, "not loaded"
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(engine.run_io)
                outer.start_soon(self._watch_exit, engine, outer.cancel_scope)
                async with trio.open_nursery() as jobs:
                    async for job in inbox:
                        if job is not None:
                            jobs.start_soon(self._run_job, job, name=f"{self.replica} {job.id}")
                outer.cancel_scope.cancel()
        finally:
            self._end_undelivered(inbox)
        if self._crash is not None:
            raise EngineCrashed(self._crash, uptime_s=time.monotonic() - self._started_at)

    async def _watch_exit(self, engine: EngineProcess, scope: trio.CancelScope) -> None:
        """The engine died on its own: end its jobs with ``engine_crashed``, stop serving."""
        await engine.exited.wait()
        self.crashed = True  # no new job for this replica from now on (Replica.free)
        with trio.move_on_after(LAST_WORDS_S):
            await engine.output_closed.wait()
        self._crash = f"llama-server died ({describe_exit(engine.returncode)}): {engine.tail()}"
        error = self._crash_error()
        for job in list(self._running):
            job.fail(job.cancel_error or error)
        scope.cancel()

    def _end_undelivered(self, inbox: trio.MemoryReceiveChannel[Job | None]) -> None:
        """Jobs dispatched to this replica that it never started (stopped or crashed first)."""
        while True:
            try:
                job = inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if job is not None:
                if self._crash is not None:
                    job.fail(job.cancel_error or engine_crashed(self.name, f"replica {self.replica} restarting"))
                else:
                    job.fail(job.cancel_error or request_cancelled(self.name, f"replica {self.replica} stopped"))

    async def _run_job(self, job: Job) -> None:
        scope = trio.CancelScope()
        self._running[job] = scope
        stats: GenerationStats | None = None
        error: BaseException | None = None
        timer = StreamTimer()
        try:
            if job.should_stop():
                return
            job.begin()
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_stopped, job, scope)
                    try:
                        stats = await self._generate(job, timer)
                    except Exception as e:  # caught here, not wrapped in the nursery's group
                        error = e
                    nursery.cancel_scope.cancel()
        except Exception as e:
            error = e
        finally:
            del self._running[job]
            if stats is not None:
                job.finish(stats)
            elif error is not None:
                job.fail(error)
            elif job.should_stop():  # client gone (or the pool's cancel error, delivered by Job)
                job.finish(timer.stats(finish_reason="cancelled", prompt_tokens=None))
            else:  # serve() was cancelled under it: the engine died, or the replica stopped
                job.fail(self._crash_error() if self.crashed else request_cancelled(self.name, f"replica {self.replica} stopped"))

    # ------------------------------------------------------------------ one job
    async def _generate(self, job: Job, timer: StreamTimer) -> GenerationStats:
        req = job.request
        d = req.decoding
        # tokenizing is bounded by the size checks, but can take ~0.2 s: off the event loop
        _, tokens, stops = await trio.to_thread.run_sync(self.prompts.prepare, job, self.n_ctx)
        timer.prompt_ready()
        greedy = d.greedy
        body: dict[str, Any] = {
            "prompt": tokens,
            "n_predict": min(d.max_tokens, self.n_ctx - len(tokens)),
            "stream": True,
            "cache_prompt": True,
            "temperature": 0.0 if greedy else d.temperature,
            "top_k": 1 if greedy else d.top_k,
            "top_p": d.top_p,
            "min_p": 0.0,
            "repeat_penalty": d.repetition_penalty,
            "presence_penalty": d.presence_penalty,
            "frequency_penalty": d.frequency_penalty,
        }
        if d.seed is not None:
            body["seed"] = engine_seed(d.seed)
        assert self._client is not None, "not loaded"
        request = self._client.build_request("POST", f"{self.base_url}/completion", json=body)
        finish = "length"
        final: dict[str, Any] | None = None
        predicted = 0
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as e:
            raise await self._lost(e) from None
        try:
            if response.status_code != 200:
                raise self._status_error(response.status_code, await response.aread())
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, ":" keep-alive pings
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise self._engine_error(chunk["error"])
                predicted = chunk.get("tokens_predicted", predicted)
                text = chunk.get("content") or ""
                if text:
                    timer.token()
                    out, hit = stops.push(text)
                    job.emit(out)
                    if hit:
                        finish = "stop"
                        break
                if chunk.get("stop"):
                    final = chunk
                    finish = "stop" if chunk.get("stop_type") in ("eos", "word") else "length"
                    break
        except httpx.TransportError as e:
            raise await self._lost(e) from None
        finally:
            await _close(response)
        if finish != "stop":
            job.emit(stops.flush())
        stats = timer.stats(finish_reason=finish, prompt_tokens=len(tokens))
        stats.output_tokens = predicted or stats.output_tokens  # what the engine decoded, if it said
        if final is not None:
            _apply_timings(stats, final)
        return stats

    # ------------------------------------------------------------------ errors
    async def _lost(self, e: Exception) -> PoolError:
        """A connection error: ``engine_crashed`` if the child is dying, else a backend error."""
        engine = self.engine
        if engine is not None:
            with trio.move_on_after(CRASH_CONFIRM_S):
                await engine.exited.wait()
            if engine.exited.is_set():
                return self._crash_error()
        return backend_error(self.name, f"lost the connection to llama-server at {self.base_url}: {type(e).__name__}")

    def _crash_error(self) -> PoolError:
        code = self.engine.returncode if self.engine is not None else None
        return engine_crashed(self.name, f"the engine of replica {self.replica} died while running the request "
                                         f"({describe_exit(code)}); the replica restarts")

    def _status_error(self, status: int, body: bytes) -> PoolError:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if isinstance(data, dict) and "error" in data:
            return self._engine_error(data["error"], status)
        return backend_error(self.name, f"llama-server answered HTTP {status}: {_quote(body.decode('utf-8', 'replace'))}")

    def _engine_error(self, error: Any, status: int | None = None) -> PoolError:
        message = error.get("message") if isinstance(error, dict) else error
        code = f"HTTP {status}" if status else "an error"
        return backend_error(self.name, f"llama-server answered {code}: {_quote(str(message))}")


def _apply_timings(stats: GenerationStats, final: dict[str, Any]) -> None:
    """The engine's own measures, where it sent them (they exclude our HTTP overhead)."""
    t = final.get("timings")
    if not isinstance(t, dict):
        return
    prompt_ms, predicted_ms = t.get("prompt_ms"), t.get("predicted_ms")
    if isinstance(prompt_ms, (int, float)) and isinstance(predicted_ms, (int, float)):
        stats.time_to_first_token_ms = round(prompt_ms, 3)
        stats.decode_after_first_token_ms = round(predicted_ms, 3)
        stats.generate_total_ms = round(prompt_ms + predicted_ms, 3)
    if isinstance(t.get("predicted_n"), int):  # it counts the end-of-generation token; we don't
        stats.output_tokens = t["predicted_n"] - (final.get("stop_type") == "eos")
    if isinstance(final.get("tokens_evaluated"), int):
        stats.prompt_tokens = final["tokens_evaluated"]


def _quote(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= QUOTE_MAX else text[: QUOTE_MAX - 1] + "…"


async def _close(response: httpx.Response) -> None:
    """Close a response even while cancelled: closing the stream is what aborts the engine's
    sequence and frees its slot."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        await response.aclose()


KIND = BackendKind(
    name="llama_server",
    create=LlamaServerBackend,
    uses_gpu=lambda m: m.llama_server_n_gpu_layers != 0,
    seeded_sampling=True,
)
