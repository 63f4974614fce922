"""EXL3 models through exllamav3's dynamic generator: many jobs per replica, batched on one GPU.

One :class:`ExLlamaV3Backend` owns one ``exllamav3.Generator`` and drives it from the replica's
one worker thread (see :mod:`backends.base`).  The generator is not thread-safe and its asyncio
wrappers (``AsyncGenerator``/``AsyncJob``) cannot run under trio, so everything —
``enqueue``, ``iterate`` and ``cancel`` — happens on that thread, in this loop::

    ┌─▶ take every job waiting in the inbox (block on ``get`` only when nothing runs)
    │     render + tokenize its prompt, build an exllamav3 ``Job``, ``generator.enqueue``
    │   cancel jobs whose stop flag is set (``generator.cancel``; finish "cancelled")
    │   ``generator.iterate()``: each active job advances one token; stream each result's text
    └── finished jobs end with ``job.finish`` (EOS, stop string, max_tokens) or ``job.fail``

``capability`` is the model's ``target_inflight``: the pool sends that many jobs to the replica,
and they join the running batch as they arrive (``exllama_max_batch_size`` caps how many decode
at once; the rest wait inside the generator).

Prompts are rendered by :mod:`backends.prompts` for every format, the model's chat template read
from its folder (``tokenizer_config.json``, ``chat_template.jinja`` or ``chat_template.json``) —
not with ``Tokenizer.hf_chat_template``, which needs ``transformers``, a package exllamav3 does not
depend on.  Stop conditions are the model's EOS ids, the format's stops (as token ids when they are
one token, and as strings) and the request's stop strings; exllamav3 applies them itself and never
streams a stop string.

``exllamav3`` is imported in :meth:`ExLlamaV3Backend.load` only: importing it JIT-compiles its CUDA
extension (minutes on a fresh machine, on the worker thread) and fails on a machine without CUDA;
the model then becomes ``failed`` with "exllamav3 needs a CUDA GPU: <why>" while the rest of the
pool serves.

Cancellation: a job's stop flag is checked between ``iterate()`` calls (``generator.cancel`` must
never run while ``iterate`` does); the job ends "cancelled" after at most one more token.  ``None``
in the inbox cancels every job still held and returns.  If ``iterate()`` itself raises, the
generator is broken: every job it held fails with that error and ``serve`` re-raises, so the pool
marks the replica dead.
"""

from __future__ import annotations

import json
import logging
import queue
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_pool.backends.base import BackendKind, Inbox, OverrideError, StreamTimer
from llm_pool.backends.decoding import POSITIVE_PENALTY, engine_seed
from llm_pool.backends.prompts import PromptPrep, SpecialToken, Vocab
from llm_pool.pool.errors import backend_error
from llm_pool.pool.jobs import GenerationStats, Job

if TYPE_CHECKING:
    from llm_pool.backends.base import BackendContext
    from llm_pool.config import ExLlamaV3Model

log = logging.getLogger("llm_pool.exllamav3")

#: exllamav3's cache page; ``max_chunk_size`` below one page fails inside ``Generator``.
PAGE_SIZE = 256
#: How exllamav3's ``eos_reason`` maps to ours (``end_filter``/``loop_detected`` are stops too).
FINISH_REASONS = {"max_new_tokens": "length"}


def cache_bits(model: ExLlamaV3Model) -> tuple[int, int] | None:
    """The K/V cache bits to quantize to, or None for an fp16 cache.

    ``exllama_cache_quant`` is ``"K"`` (both) or ``"K,V"``, e.g. ``"8"`` or ``"8,4"``;
    ``exllama_cache_k_bits``/``exllama_cache_v_bits`` say the same thing in two keys.  The
    settings Struct already refused a malformed value, one key of a pair, and both forms at once
    (:meth:`ExLlamaV3Model.problems`)."""
    quant, k, v = model.exllama_cache_quant, model.exllama_cache_k_bits, model.exllama_cache_v_bits
    if quant is not None:
        parts = quant.split(",")
        return int(parts[0]), int(parts[-1])
    if k is not None and v is not None:
        return k, v
    return None


def read_chat_template(folder: Path) -> str | None:
    """The model's Hugging Face chat template, from the files transformers reads it from."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    return None


def exllama_vocab(tokenizer: Any) -> Vocab[int]:
    """The :class:`~backends.prompts.Vocab` of an exllamav3 tokenizer: ``encode`` with
    ``encode_special_tokens=False`` tokenizes plain text; its special tokens are the
    ``extended_piece_to_id`` ones (the added tokens that ``encode_special_tokens=True`` parses)."""

    def encode(text: str) -> list[int]:
        return [int(t) for t in tokenizer.encode(text, encode_special_tokens=False)[0].tolist()]

    specials = [SpecialToken(text, int(token)) for text, token in tokenizer.extended_piece_to_id.items()]
    longest = max((len(p) for p in tokenizer.get_id_to_piece_list(True)), default=1)
    return Vocab(encode, specials, longest)


@dataclass(eq=False)
class _Running:
    """A pool job inside the generator."""

    job: Job
    ex_job: Any
    serial: int
    timer: StreamTimer
    prompt_tokens: int
    sampled: int = 0  # streaming results seen: one per sampled token


class ExLlamaV3Backend:
    """One exllamav3 generator shared by up to ``target_inflight`` jobs; see the module docstring."""

    threaded = True
    crashed = False  # no engine process of its own to die

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        m = ctx.model
        self.capability = m.target_inflight
        self.max_batch_size = m.exllama_max_batch_size or m.target_inflight
        self.ex: Any = None  # the exllamav3 module
        self.config: Any = None
        self.model: Any = None
        self.cache: Any = None
        self.tokenizer: Any = None
        self.generator: Any = None
        self._bits: tuple[int, int] | None = None
        self._context = m.exllama_cache_size
        self._eos_ids: list[int] = []
        self.prompts: PromptPrep[int] = PromptPrep(m, backend="exllamav3")

    def describe(self) -> dict[str, object]:
        m = self.ctx.model
        return {
            "cache_size": m.exllama_cache_size,
            "cache_quant": "fp16" if self._bits is None else f"{self._bits[0]},{self._bits[1]}",
            "max_batch_size": self.max_batch_size,
            "max_chunk_size": m.exllama_max_chunk_size,
            "gpu_split": m.exllama_gpu_split,
            "tensor_parallel": m.exllama_tensor_parallel,
            "tp_backend": m.exllama_tp_backend if m.exllama_tensor_parallel else None,
        }

    # ------------------------------------------------------------------ lifetime
    def load(self) -> None:
        try:
            import exllamav3

            # A same-named folder on sys.path imports as an empty namespace package: check the names.
            from exllamav3 import Cache, ComboSampler, Config, Generator, Job, Model, Tokenizer  # noqa: F401
        except Exception as e:  # no torch, no CUDA toolkit, no GPU, a failed extension build...
            raise RuntimeError(f"exllamav3 needs a CUDA GPU: {e}") from e
        m = self.ctx.model
        path = self.ctx.model_path()
        self._bits = cache_bits(m)
        self.ex = exllamav3
        try:
            self._load(path)
        except Exception as e:
            self.close()  # the pool calls close() only after a successful load
            raise RuntimeError(f"exllamav3 could not load {path.name}: {type(e).__name__}: {e}") from e

    def _load(self, path: Path) -> None:
        ex, m = self.ex, self.ctx.model
        self.config = ex.Config.from_directory(str(path))
        self.model = ex.Model.from_config(self.config)
        quant: dict[str, Any] = {}
        if self._bits is not None:
            quant = {"layer_type": ex.CacheLayer_quant, "k_bits": self._bits[0], "v_bits": self._bits[1]}
        # The cache must exist before model.load(): loading allocates the caches attached to the model.
        self.cache = ex.Cache(self.model, max_num_tokens=m.exllama_cache_size, **quant)
        load: dict[str, Any] = {
            "progressbar": False,
            "max_chunk_size": m.exllama_max_chunk_size,
            "max_batch_size": self.max_batch_size,
        }
        if m.exllama_gpu_split:
            load["use_per_device"] = list(m.exllama_gpu_split)
        if m.exllama_tensor_parallel:
            load.update(tensor_p=True, tp_backend=m.exllama_tp_backend)
        self.model.load(**load)
        # Tokenizer.from_config adds tokenizer_config/generation_config EOS ids to the config's list.
        self.tokenizer = ex.Tokenizer.from_config(self.config)
        self.generator = ex.Generator(
            model=self.model,
            cache=self.cache,
            tokenizer=self.tokenizer,
            max_batch_size=self.max_batch_size,
            max_chunk_size=m.exllama_max_chunk_size,
            max_q_size=m.exllama_max_q_size,
        )
        eos = [*self.config.eos_token_id_list, self.tokenizer.eos_token_id]
        self._eos_ids = [int(t) for t in dict.fromkeys(eos) if t is not None and t >= 0]
        self._context = min(m.exllama_cache_size, self.config.max_position_embeddings or m.exllama_cache_size)
        self.prompts.set_model(
            read_chat_template(path),
            getattr(self.tokenizer, "bos_token", None) or "",
            getattr(self.tokenizer, "eos_token", None) or "",
            exllama_vocab(self.tokenizer),
        )

    def close(self) -> None:
        generator, model = self.generator, self.model
        self.generator = self.tokenizer = self.cache = self.model = None
        if generator is not None and hasattr(generator, "close"):
            generator.close()
        if model is not None:
            model.unload()

    # ------------------------------------------------------------------ the loop
    def serve(self, inbox: Inbox) -> None:
        running: dict[int, _Running] = {}  # by the generator's serial number
        while True:
            block = not running  # an idle generator's iterate() returns at once: never spin on it
            while True:
                try:
                    job = inbox.get() if block else inbox.get_nowait()
                except queue.Empty:
                    break
                block = False
                if job is None:
                    for run in list(running.values()):
                        self._cancel(run, running)
                    return
                self._admit(job, running)
            for run in [r for r in running.values() if r.job.should_stop()]:
                self._cancel(run, running)
            if running:
                self._step(running)

    def _admit(self, job: Job, running: dict[int, _Running]) -> None:
        if job.should_stop():
            job.finish(GenerationStats(finish_reason="cancelled", output_tokens=0))
            return
        job.begin()
        timer = StreamTimer()
        try:
            ex_job, prompt_tokens = self._make_job(job)
            serial = self.generator.enqueue(ex_job)
        except Exception as e:  # a bad prompt (400) or a job the cache can never hold
            job.fail(e)
            return
        timer.prompt_ready()
        running[serial] = _Running(job, ex_job, serial, timer, prompt_tokens)

    def _make_job(self, job: Job) -> tuple[Any, int]:
        ex, m = self.ex, self.ctx.model
        req = job.request
        d = req.decoding
        # exllamav3 needs room for the prompt, one new token, and one more position.
        prompt, tokens, _ = self.prompts.prepare(job, self._context, reserve=1)
        # a (1, n) LongTensor without importing torch here: a tensor the tokenizer made, new_tensor
        ids = self.tokenizer.single_token(tokens[0]).new_tensor([tokens])
        n = len(tokens)
        stops: list[int | str] = list(self._eos_ids)
        for s in prompt.stop:
            token = self.tokenizer.single_id(s)
            if token is not None:  # a special token decodes to "" and would never match as text
                stops.append(int(token))
            stops.append(s)
        stops += [s for s in d.stop if s]  # the caller's: matched as text, never as token ids
        penalties = {"rep_p": d.repetition_penalty, "freq_p": d.frequency_penalty, "pres_p": d.presence_penalty}
        if d.greedy:
            sampler = ex.ComboSampler(**penalties, temperature=0.0, top_k=1)
        else:  # top_k 0 (NO_TOP_K) is ExLlamaV3's "no limit" too
            sampler = ex.ComboSampler(**penalties, temperature=d.temperature, top_k=max(0, d.top_k), top_p=d.top_p)
        ex_job = ex.Job(
            input_ids=ids,
            max_new_tokens=min(d.max_tokens, self._context - n - 1),
            sampler=sampler,
            seed=None if d.seed is None else engine_seed(d.seed),
            stop_conditions=list(dict.fromkeys(stops)),
            identifier=job.id,
            max_rq_tokens=m.exllama_max_rq_tokens,
        )
        return ex_job, n

    def _cancel(self, run: _Running, running: dict[int, _Running]) -> None:
        self.generator.cancel(run.ex_job)  # emits no result for that job
        running.pop(run.serial, None)
        run.timer.tokens = run.sampled
        run.job.finish(run.timer.stats(finish_reason="cancelled", prompt_tokens=run.prompt_tokens))

    def _step(self, running: dict[int, _Running]) -> None:
        try:
            results = self.generator.iterate()
        except BaseException as e:  # not reaped by exllamav3: the generator is broken
            for lost in running.values():
                lost.job.fail(e)
            running.clear()
            raise
        for r in results:
            run = running.get(r["serial"])
            if run is None:
                continue
            stage = r["stage"]
            if stage == "error":  # this job's page allocation or prefill failed; the others go on
                del running[r["serial"]]
                run.job.fail(r["error"])
            elif stage == "streaming":
                run.sampled += 1
                run.timer.token()
                if r.get("eos"):
                    self._end(run, r)
                    del running[r["serial"]]
                elif r.get("text"):
                    run.job.emit(r["text"])
        if running and not results and not self.generator.num_remaining_jobs():
            for lost in running.values():  # never spin on jobs the generator no longer holds
                lost.job.fail(backend_error(self.ctx.name, "the generator dropped the job"))
            running.clear()

    def _end(self, run: _Running, r: dict[str, Any]) -> None:
        reason = r.get("eos_reason", "stop_token")
        text = r.get("text", "")
        if reason == "stop_token":
            # Text held back as a possible start of a stop string is legitimate output when the
            # stop *token* ends the job; exllamav3 leaves it under "held", with the stop token's piece.
            held = r.get("held", {}).get("text", "")
            piece = self.tokenizer.get_id_to_piece_list(False)[r["eos_triggering_token_id"]]
            text += held[: -len(piece)] if piece and held.endswith(piece) else held
        run.job.emit(text)
        new_tokens = r.get("new_tokens", run.sampled)
        run.timer.tokens = new_tokens - 1 if reason == "stop_token" else new_tokens
        stats = run.timer.stats(finish_reason=FINISH_REASONS.get(reason, "stop"), prompt_tokens=r.get("prompt_tokens"))
        if r.get("time_generate") is not None:
            stats.decode_after_first_token_ms = round(r["time_generate"] * 1000.0, 3)
        run.job.finish(stats)


def _cache_overrides(given: dict[str, Any]) -> dict[str, Any]:
    """The K/V cache is set one way at a time: ``exllama_cache_k_bits`` with
    ``exllama_cache_v_bits`` (both set, or both null for fp16), or ``exllama_cache_quant``; the
    one given clears the other."""
    out = dict(given)
    has_k, has_v = "exllama_cache_k_bits" in out, "exllama_cache_v_bits" in out
    if has_k != has_v:
        raise OverrideError("exllama_cache_k_bits", "exllama_cache_k_bits and exllama_cache_v_bits must be provided together")
    if has_k:
        if (out["exllama_cache_k_bits"] is None) != (out["exllama_cache_v_bits"] is None):
            raise OverrideError(
                "exllama_cache_k_bits", "exllama_cache_k_bits and exllama_cache_v_bits must both be null (fp16) or both set"
            )
        if "exllama_cache_quant" in out:
            raise OverrideError(
                "exllama_cache_quant", "exllama_cache_quant cannot be combined with exllama_cache_k_bits/exllama_cache_v_bits"
            )
        out["exllama_cache_quant"] = None
    elif out.get("exllama_cache_quant") is not None:
        out["exllama_cache_k_bits"] = out["exllama_cache_v_bits"] = None
    return out


KIND = BackendKind(
    name="exllamav3",
    create=ExLlamaV3Backend,
    uses_gpu=lambda m: True,
    overrides=(
        "exllama_cache_size",
        "exllama_cache_k_bits",
        "exllama_cache_v_bits",
        "exllama_cache_quant",
        "exllama_max_rq_tokens",
    ),
    check_overrides=_cache_overrides,
    decoding_rules=(POSITIVE_PENALTY,),
    seeded_sampling=True,
    load_recommendations={
        "exllama_cache_bit_pairs": {
            "kind": "pair_presets",
            "fields": ["exllama_cache_k_bits", "exllama_cache_v_bits"],
            "recommended_pairs": [
                {"label": "fp16", "exllama_cache_k_bits": None, "exllama_cache_v_bits": None},
                {"label": "8/8", "exllama_cache_k_bits": 8, "exllama_cache_v_bits": 8},
                {"label": "8/4", "exllama_cache_k_bits": 8, "exllama_cache_v_bits": 4},
            ],
            "notes": [
                "Presets chosen by llm-pool; any K and V bits from 2 to 8 may be loaded.",
            ],
        }
    },
    load_constraint_notes={
        "exllama_cache_k_bits": {"null_means": "fp16", "allowed_values": [2, 3, 4, 5, 6, 7, 8]},
        "exllama_cache_v_bits": {"null_means": "fp16", "allowed_values": [2, 3, 4, 5, 6, 7, 8]},
        "exllama_cache_quant": {"format": "<bits>|<k_bits>,<v_bits>", "null_means": "fp16", "examples": ["8", "8,4"]},
    },
)
