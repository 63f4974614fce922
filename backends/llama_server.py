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
  (:func:`~backends.llama_common.open_vocab`), then sent as token ids to ``POST /completion``
  (``stream: true``): the engine never parses caller text for control tokens, and a prompt has
  the same tokens in both backends.
* A request with images (a model with ``llama_server_mmproj_path`` and ``modalities = ["text",
  "image"]``) is the one exception: llama-server takes images only as ``{"prompt_string",
  "multimodal_data"}`` and parses that string for control tokens itself, so the prompt is
  rendered with :data:`MEDIA_MARKER` where each image was and caller text that spells a
  special token (or the marker) is refused with a 400 (:func:`multimodal_prompt`).
* Stop strings are applied here (:class:`~backends.prompts.StopMatcher`), never emitting part of
  one; a hit closes the stream.  Greedy when ``temperature == 0`` or ``top_k == 1``; a
  request's ``seed`` is sent as the engine's ``seed`` (32 bits, :func:`~backends.decoding.engine_seed`),
  its OpenAI penalties as ``presence_penalty`` / ``frequency_penalty``.
* ``/v1/completions``' raw prompts take the same path (no template, caller text as text);
  ``logprobs`` are the engine's ``n_probs`` (``completion_probabilities`` of each chunk); an
  ``embeddings = true`` model runs with ``--embeddings`` and its jobs go to ``POST /embedding``
  as token ids (:meth:`LlamaServerBackend._embed`).
* Metrics: wall-clock timers as every backend, replaced by the engine's own ``timings``
  (``prompt_ms``, ``predicted_ms``, ``predicted_n``, ``prompt_n``) when it sent them.

Failures, crashes and cancellation: as every supervised engine
(:mod:`backends.engine_backend`), plus ``prompt too long for n_ctx → 400 invalid_request`` (as
in-process GGUF).  Crash: the scheduler restarts the replica with backoff
(``restart_max_attempts``, ``restart_backoff_s``) while queued jobs go to the model's other
replicas.  Cancellation: closing the stream makes llama-server abort that sequence and free its
slot.  ``close`` always stops the child (SIGTERM, SIGKILL after ``stop_timeout_s``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from llm_pool.backends.base import BackendKind, StreamTimer
from llm_pool.backends.decoding import engine_seed
from llm_pool.backends.engine_backend import EngineBackend, quote
from llm_pool.backends.engine_http import EngineConnectionLost, post_stream
from llm_pool.backends.engine_process import EngineProcess, engine_env
from llm_pool.backends.llama_common import (
    embedding_inputs,
    open_vocab,
    pool_embedding,
    set_prompt_model,
    tokenize,
    trained_context_bound,
)
from llm_pool.backends.prompts import Prompt, PromptPrep, Vocab
from llm_pool.pool.errors import invalid_request
from llm_pool.pool.jobs import GenerationRequest, GenerationStats, Job, TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from llm_pool.backends.base import BackendContext

log = logging.getLogger("llm_pool.llama_server")

#: Between two health probes while the engine starts.
HEALTH_POLL_S = 0.05
LISTENING = re.compile(r"listening on (https?://\S+?)/?$")
#: llama-server's placeholder for one image in a multimodal prompt (mtmd's ``mtmd_default_marker()``).
MEDIA_MARKER = "<__media__>"


def default_binary() -> Path:
    """The llama-server ``make install`` builds: the venv's ``bin/`` (beside this Python)."""
    return Path(sys.prefix) / "bin" / "llama-server"


class LlamaServerBackend(EngineBackend):
    """One replica: one llama-server child; see the module docstring."""

    engine_name = "llama-server"

    def __init__(self, ctx: BackendContext) -> None:
        super().__init__(ctx)
        self.prompts: PromptPrep[int] = PromptPrep(ctx.model, backend="llama_server")
        #: The GGUF file's tokenizer (``llama_cpp._internals.LlamaModel``, vocab only), kept
        #: across engine restarts.
        self._vocab: Any = None
        #: Context per slot, as the engine reports it once started.
        self.n_ctx = ctx.model.llama_server_n_ctx

    def describe(self) -> dict[str, object]:
        return {
            **self._process_facts(),
            "parallel": self.capability,
            "n_ctx": self.n_ctx,
            "n_threads": self.ctx.n_threads,
        }

    # ------------------------------------------------------------------ configuration
    def _binary(self) -> Path:
        configured = self.model.llama_server_binary
        return self._path(configured) if configured else default_binary()


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
        if m.embeddings:  # issue 16 §2: an embeddings model
            argv += ["--embeddings"]
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

        async def ready(engine: EngineProcess, client: httpx.AsyncClient) -> None:
            """Return once ``/health`` answers 200 (the engine printed where it listens)."""
            await listening.wait()
            self.base_url = found[0]
            while True:
                try:
                    r = await client.get(f"{self.base_url}/health")
                    if r.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(HEALTH_POLL_S)

        self.base_url = ""
        await self.start_engine(argv, env, key, ready, on_line=on_line)
        try:
            assert self._client is not None
            await self._read_props(self._client)
        except BaseException:
            await EngineBackend.close(self)
            raise
        engine = self.engine
        assert engine is not None
        log.info(
            "llama-server ready",
            extra={"fields": {"model": self.name, "replica": self.replica, "url": self.base_url, "pid": engine.pid,
                              "engine_pid": engine.engine_pid, "parallel": self.capability, "n_ctx": self.n_ctx}},
        )

    async def _read_props(self, client: httpx.AsyncClient) -> None:
        r = await client.get(f"{self.base_url}/props")
        if r.status_code != 200:
            raise RuntimeError(f"llama-server /props answered HTTP {r.status_code}: {quote(r.text)}")
        props = r.json()
        n_ctx = props.get("default_generation_settings", {}).get("n_ctx")
        if isinstance(n_ctx, int) and n_ctx > 0:
            self.n_ctx = n_ctx

    async def close(self) -> None:
        await super().close()
        vocab, self._vocab = self._vocab, None
        if vocab is not None:
            vocab.close()

    # ------------------------------------------------------------------ one job
    def _multimodal_prompt(self, prompt: Prompt, request: GenerationRequest) -> dict[str, Any]:
        assert self._vocab is not None and self.prompts.vocab is not None, "not loaded"
        return multimodal_prompt(
            prompt,
            request,
            self.prompts.vocab,
            trust_caller=self.model.allow_special_tokens_in_input,
            bos=self.prompts.bos,
            engine_adds_bos=bool(self._vocab.add_bos_token()),
        )

    async def _generate(self, job: Job, timer: StreamTimer) -> GenerationStats:
        req = job.request
        if req.embed_inputs is not None:
            return await self._embed(job, timer)
        d = req.decoding
        marker = MEDIA_MARKER if req.images else None
        prompt, tokens, stops = await self._prepare(job, media_marker=marker)
        timer.prompt_ready()
        greedy = d.greedy
        body: dict[str, Any] = {
            "prompt": tokens if marker is None else self._multimodal_prompt(prompt, req),
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
        if req.logprobs is not None:  # the engine reports at least one candidate per token
            body["n_probs"] = max(1, req.logprobs)
        if req.grammar is not None:  # structured output / forced tool call (issue 16)
            body["grammar"] = req.grammar
        finish = "length"
        final: dict[str, Any] | None = None
        predicted = 0
        try:
            async with post_stream(
                f"{self.base_url}/completion", json.dumps(body).encode(), api_key=self._api_key, sent=job.hand_over
            ) as reply:
                if reply.status != 200:
                    raise self._status_error(reply.status, await reply.read())
                async for data in reply:
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise self._engine_error(chunk["error"])
                    predicted = chunk.get("tokens_predicted", predicted)
                    text = chunk.get("content") or ""
                    lp = _logprobs(chunk, req.logprobs) if req.logprobs is not None else None
                    if text:
                        timer.token()
                        out, hit = stops.push(text)
                        job.emit(out, lp)
                        if hit:
                            finish = "stop"
                            break
                    if chunk.get("stop"):
                        final = chunk
                        finish = "stop" if chunk.get("stop_type") in ("eos", "word") else "length"
                        break
        except EngineConnectionLost as e:
            raise await self._lost(e) from None
        if finish != "stop":
            job.emit(stops.flush())
        stats = timer.stats(finish_reason=finish, prompt_tokens=len(tokens))
        stats.output_tokens = predicted or stats.output_tokens  # what the engine decoded, if it said
        if final is not None:
            _apply_timings(stats, final)
        return stats

    async def _embed(self, job: Job, timer: StreamTimer) -> GenerationStats:
        """An embeddings job: each input tokenized here as plain text (the model's own BOS/EOS,
        never a control token from caller text), sent as token ids to ``POST /embedding``
        (unnormalised), pooled and normalised as in-process GGUF does
        (:func:`~backends.llama_common.pool_embedding`)."""
        req = job.request
        inputs = req.embed_inputs or []
        vocab = self._vocab
        assert vocab is not None and self.prompts.vocab is not None and self._client is not None, "not loaded"
        ids = embedding_inputs(
            req.model, inputs, self.n_ctx, self.prompts.vocab.max_token_chars,
            lambda b: tokenize(vocab.vocab, b, add_bos=True, special=False),
        )
        timer.prompt_ready()
        job.hand_over()  # not a stream: its handler only waits for the result from here
        try:
            r = await self._client.post(f"{self.base_url}/embedding", json={"content": ids, "embd_normalize": -1})
        except httpx.TransportError as e:
            raise await self._lost(e) from None
        if r.status_code != 200:
            raise self._status_error(r.status_code, r.content)
        items = r.json()
        by_index = {item["index"]: item["embedding"] for item in items if isinstance(item, dict)}
        job.embeddings = [pool_embedding(by_index[i]) for i in range(len(ids))]
        stats = timer.stats(finish_reason="stop", prompt_tokens=sum(map(len, ids)))
        stats.output_tokens = 0
        return stats


def multimodal_prompt(
    prompt: Prompt, request: GenerationRequest, vocab: Vocab[int], *, trust_caller: bool, bos: str, engine_adds_bos: bool
) -> dict[str, Any]:
    """llama-server's multimodal ``prompt``: ``{"prompt_string", "multimodal_data"}``, the
    rendered text with :data:`MEDIA_MARKER` where each image goes and the images' base64, in order.

    llama-server tokenizes that string itself, special tokens parsed (``mtmd_tokenize``, no way
    to turn it off) and a BOS added where the vocabulary asks for one.  So, unless the model sets
    ``allow_special_tokens_in_input``, caller text holding a special token's text or the media
    marker is refused (400): it would become a control token, or take an image's place.  Only
    ``data:`` URLs reach here (``image_url_fetch`` is for remote models only)."""
    if not trust_caller:
        for text, trusted in prompt.segments:
            if trusted:
                continue
            hit = MEDIA_MARKER if MEDIA_MARKER in text else None
            if hit is None and vocab.pattern is not None and (found := vocab.pattern.search(text)):
                hit = found.group(0)
            if hit is not None:
                raise invalid_request(
                    f"model {request.model!r} is given images in a prompt its engine parses for control tokens;"
                    f" text that spells one ({hit!r}) cannot be sent with an image",
                    param="messages",
                    model=request.model,
                )
    text = prompt.text
    if engine_adds_bos and bos and text.startswith(bos):
        text = text[len(bos) :]  # the engine adds it
    return {"prompt_string": text, "multimodal_data": [image.url.partition(",")[2] for image in request.images]}


def _logprobs(chunk: dict[str, Any], k: int) -> list[TokenLogprob] | None:
    """The ``completion_probabilities`` of one stream chunk as :class:`~pool.jobs.TokenLogprob`
    (the engine's ``logprob`` is of its raw distribution, as in-process GGUF's), ``k`` candidates."""
    probs = chunk.get("completion_probabilities")
    if not isinstance(probs, list):
        return None

    def top(p: dict[str, Any]) -> TopLogprob:
        return TopLogprob(token=p["token"], logprob=float(p["logprob"]), bytes=list(p.get("bytes") or []))

    return [
        TokenLogprob(
            token=p["token"],
            logprob=float(p["logprob"]),
            bytes=list(p.get("bytes") or []),
            top=[top(c) for c in (p.get("top_logprobs") or [])[:k]],
        )
        for p in probs
        if isinstance(p, dict)
    ]


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
    # prompt cache (issue 16): the prompt tokens its slot's cache already held
    if isinstance(t.get("cache_n"), int):
        stats.cached_prompt_tokens = t["cache_n"]


KIND = BackendKind(
    name="llama_server",
    create=LlamaServerBackend,
    uses_gpu=lambda m: m.llama_server_n_gpu_layers != 0,
    seeded_sampling=True,
    token_logprobs=lambda m: True,
    embeddings=True,
    response_formats=("text", "json_object", "json_schema"),
    tools=True,
    # paths (the model, a projector, a draft model) are config only, never overrides
    overrides=(
        "llama_server_n_ctx",
        "llama_server_image_max_tokens",
        "llama_server_spec_type",
        "llama_server_spec_draft_n_max",
        "llama_server_spec_draft_p_min",
    ),
    file_bounds=trained_context_bound("llama_server_n_ctx"),
)
