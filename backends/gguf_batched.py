"""GGUF models through llama.cpp with continuous batching: one context, many sequences.

The one-at-a-time :mod:`backends.gguf` replica buys concurrency with more replicas, each with its
own copy of the model and a share of the cores.  Here one replica keeps every core and serves up
to ``target_inflight`` requests at once from one llama.cpp context, the way llama.cpp's own server
uses slots::

    inbox ──▶ admit (between steps, up to capability) ──▶ sequence slot 0..n-1
                                                              │
    step: one llama_batch = each decoding sequence's next token (first)
                          + prompt chunks of sequences still prefilling, oldest first
                            (PREFILL_PER_STEP tokens a step, never more than n_batch in all)
          llama_decode once ─▶ per sequence with an output row: its own sampler chain samples,
          the token is streamed (job.emit), EOS / stop strings / max_tokens / stop flag end it
                                                              │
    a sequence ends ─▶ its generated KV cells are removed (its prompt's stay: the slot's prefix
                       cache), its sampler freed, then finish/fail

Everything runs on the replica's one worker thread (see :mod:`backends.base`): ``load``,
``serve`` and ``close``.  ``serve`` blocks on the inbox only when no sequence is active; between
steps it takes new jobs with ``get_nowait``, so requests join and leave between decode steps.

Memory: the context has ``n_seq_max = capability`` sequences and a *non-unified* KV cache of
``gguf_n_ctx × capability`` cells, i.e. every sequence gets its own stream of ``gguf_n_ctx`` cells
(the same per-request context as the sequential backend, and attention only over its own cells).
The KV cache therefore costs ``capability`` times the sequential backend's.  Why not one unified
cache: attention would then span every sequence's cells (SmolLM2, 8 sequences at ~900 tokens each:
107 ms a step unified vs 65 ms split, here).  The price of split streams is llama.cpp's micro-batch
rule (consecutive seq ids only), which the slot policy handles: see :meth:`_compact`.

The request path mirrors :meth:`backends.gguf.GGUFBackend.generate` exactly (prompt rendering,
tokenisation, context checks, sampler chain, incremental UTF-8 decoding, stop strings, metrics),
so a request returns what it returns alone (exactly so with the tiny test model; with a real
model llama.cpp's kernels differ by batch size, so greedy text can part from a solo run at a
near tie, as in llama.cpp's own server).  Not done here: beam search.

Prefix reuse: like llama.cpp's server slots, a free slot keeps the KV cells of the prompt that last
ran in it, and a new request goes to the allowed slot whose cached prompt shares the longest
prefix with its own (a repeated system prompt, a conversation's earlier turns); only the rest of
its prompt is decoded.  The cache costs nothing extra: the cells are the slot's own stream.

Uses llama-cpp-python's low-level bindings only (``llama_cpp.llama_*`` and
``llama_cpp._internals.LlamaModel``); ``llama_cpp`` is imported in :meth:`load` only.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import queue
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llm_pool.backends.base import Inbox, StreamTimer
from llm_pool.backends.decoding import engine_seed
from llm_pool.backends.llama_common import (
    LLAMA_QUIET_LOAD_LOCK,
    ggml_type,
    grammar_sampler,
    set_prompt_model,
    token_logprob,
)
from llm_pool.backends.prompts import PromptPrep, StopMatcher
from llm_pool.pool.jobs import Decoding, GenerationStats, Job, TokenLogprob

if TYPE_CHECKING:
    from llm_pool.backends.base import BackendContext

log = logging.getLogger("llm_pool.gguf_batched")

#: llama.cpp's LLAMA_MAX_SEQ: a context cannot hold more sequences.
MAX_SEQUENCES = 256
#: What llama-cpp-python's ``Llama`` uses for the repeat-penalty window (``last_n_tokens_size``).
PENALTY_LAST_N = 64
#: llama-cpp-python's default physical batch (``Llama(n_ubatch=512)``).
N_UBATCH = 512
#: Prompt tokens decoded per step (chunked prefill), shared by the prefilling sequences oldest
#: first.  On a CPU a prompt token costs about as much as a generated one however they are batched,
#: so one big prefill step only delays every first token and stalls the running streams; small
#: chunks give first tokens in arrival order and bound the stall of a step.
PREFILL_PER_STEP = 64


@dataclass(eq=False)
class _Sequence:
    """One request in the batch: its slot (llama.cpp seq_id), prompt, sampler and stream state."""

    job: Job
    slot: int
    prompt: list[int]
    budget: int
    sampler: Any
    stops: StopMatcher
    timer: StreamTimer
    utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    #: Prompt tokens already sent to llama_decode.
    prefilled: int = 0
    #: Position of the next token in this sequence's KV stream.
    n_past: int = 0
    #: The last sampled token, to decode in the next step (None while prefilling).
    next_token: int | None = None
    #: Index of this sequence's output row in the current batch (-1: none this step).
    out: int = -1
    #: Prompt tokens its slot's cache already held (prefix reuse): not decoded again.
    cached: int = 0


class BatchedGGUFBackend:
    """One llama.cpp context serving up to ``capability`` sequences; see the module docstring."""

    threaded = True
    crashed = False  # no engine process of its own to die

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.capability = max(1, min(ctx.model.target_inflight, MAX_SEQUENCES))
        self.model: Any = None  # llama_cpp._internals.LlamaModel
        self._lctx: Any = None  # llama_context *
        self._mem: Any = None  # llama_memory_t
        self._vocab: Any = None
        self._batch: Any = None  # llama_batch
        self._n_batch = 0
        #: See PREFILL_PER_STEP (an attribute so benchmarks can try other values).
        self.prefill_per_step = PREFILL_PER_STEP
        self._n_ctx_seq = 0
        self._n_vocab = 0
        self._piece_buf = ctypes.create_string_buffer(64)
        self.prompts: PromptPrep[int] = PromptPrep(ctx.model, backend="gguf")
        self._free_slots: set[int] = set()
        #: Free slots whose KV stream still holds the prompt of the sequence that last ran there
        #: (positions 0..len-1): a new prompt with the same prefix starts after it.
        self._cached: dict[int, list[int]] = {}
        self._active: list[_Sequence] = []
        #: Prompt tokens not decoded again thanks to a cached prefix (diagnostics).
        self.reused_tokens = 0
        #: Diagnostics (read them from any thread; written by the worker thread only).
        self.steps = 0
        #: Most sequences that one llama_decode call has served (evidence of real batching).
        self.max_batch_sequences = 0
        self.max_batch_tokens = 0
        #: Sequences moved to a lower slot by _compact.
        self.moves = 0
        #: Most runs of consecutive slots in one step (1: every step was one micro-batch of decodes).
        self.max_slot_runs = 0

    def describe(self) -> dict[str, object]:
        return {
            "n_threads": self.ctx.n_threads,
            "n_ctx": self.ctx.model.gguf_n_ctx,
            "batching": True,
            "n_seq_max": self.capability,
            "n_batch": self._n_batch or None,
            "max_batch_sequences": self.max_batch_sequences,
            "slot_moves": self.moves,
        }

    # ------------------------------------------------------------------ load / close
    def load(self) -> None:
        import llama_cpp
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose

        m = self.ctx.model
        path = self.ctx.model_path()
        type_k = ggml_type(m.gguf_type_k) if m.gguf_type_k else None
        type_v = ggml_type(m.gguf_type_v) if m.gguf_type_v else None
        set_verbose(False)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0x7FFFFFFF if m.gguf_n_gpu_layers == -1 else m.gguf_n_gpu_layers
        try:
            with LLAMA_QUIET_LOAD_LOCK:  # verbose=False swaps the process's fds 1/2: one at a time
                self.model = _internals.LlamaModel(path_model=str(path), params=mparams, verbose=False)
        except ValueError as e:  # "Failed to load model from file"
            raise RuntimeError(f"llama.cpp could not load {path.name}: {e}") from None
        try:  # the scheduler does not call close() after a failed load
            self._load_context(path.name, type_k, type_v)
        except BaseException:
            self.close()
            raise

    def _load_context(self, name: str, type_k: int | None, type_v: int | None) -> None:
        import llama_cpp

        m = self.ctx.model
        n_seq = self.capability
        self._n_batch = max(m.gguf_n_batch, n_seq)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = m.gguf_n_ctx * n_seq
        cparams.n_batch = self._n_batch
        cparams.n_ubatch = min(self._n_batch, N_UBATCH)
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False  # one KV stream per sequence: attention over its own cells only
        cparams.n_threads = self.ctx.n_threads
        cparams.n_threads_batch = self.ctx.n_threads
        flash = m.gguf_flash_attn == "on" or (m.gguf_flash_attn == "auto" and m.gguf_n_gpu_layers != 0)
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if type_k is not None:
            cparams.type_k = type_k
        if type_v is not None:
            cparams.type_v = type_v
        self._lctx = llama_cpp.llama_init_from_model(self.model.model, cparams)
        if not self._lctx:
            raise RuntimeError(
                f"llama.cpp could not create a context of {n_seq} sequences × {m.gguf_n_ctx} tokens for {name}"
            )
        self._mem = llama_cpp.llama_get_memory(self._lctx)
        self._vocab = self.model.vocab
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        # llama.cpp may round the context up; never give a request more than the configured size.
        self._n_ctx_seq = min(llama_cpp.llama_n_ctx_seq(self._lctx), m.gguf_n_ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        self._free_slots = set(range(n_seq))
        set_prompt_model(self.prompts, self.model)

    def close(self) -> None:
        import llama_cpp

        for seq in self._active:  # only after a crash: serve ends every sequence it holds
            llama_cpp.llama_sampler_free(seq.sampler)
        self._active = []
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._lctx is not None:
            llama_cpp.llama_free(self._lctx)
            self._lctx = None
            self._mem = None
        if self.model is not None:
            self.model.close()
            self.model = None

    # ------------------------------------------------------------------ diagnostics
    def kv_positions(self) -> dict[int, tuple[int, int]]:
        """``{slot: (pos_min, pos_max)}`` of every sequence that holds KV cells right now.

        When the replica is idle this equals :meth:`cached_positions` unless cells leaked.  Reads
        llama.cpp state: call it only while the replica is idle (every job ended), e.g. from tests.
        """
        import llama_cpp

        held = {}
        for slot in range(self.capability):
            hi = llama_cpp.llama_memory_seq_pos_max(self._mem, slot)
            if hi >= 0:
                held[slot] = (llama_cpp.llama_memory_seq_pos_min(self._mem, slot), hi)
        return held

    def cached_positions(self) -> dict[int, tuple[int, int]]:
        """``{slot: (0, n-1)}`` for every free slot that keeps a prompt prefix of n tokens: what
        :meth:`kv_positions` must show when the replica is idle (nothing else may be held)."""
        return {slot: (0, len(tokens) - 1) for slot, tokens in self._cached.items()}

    # ------------------------------------------------------------------ serving
    def serve(self, inbox: Inbox) -> None:
        """Run the step loop until ``None`` arrives and every admitted job has ended.

        Cancellation: a job's stop flag is checked before every step; a flagged job ends
        ``cancelled`` before the next decode.  After ``None`` nothing new is admitted: running jobs
        whose stop flags are set (the pool sets them before it sends ``None``) end at the next
        step, any others run to their end as in the sequential backend, and jobs found behind
        ``None`` end ``cancelled`` without running.
        """
        closing = False
        try:
            while True:
                while not closing and len(self._active) < self.capability:
                    try:
                        job = inbox.get_nowait() if self._active else inbox.get()
                    except queue.Empty:
                        break
                    if job is None:
                        closing = True
                        self._drain(inbox)
                    else:
                        self._admit(job)
                for seq in [s for s in self._active if s.job.should_stop()]:
                    self._end(seq, "cancelled")
                if not self._active:
                    if closing:
                        return
                    continue
                self._compact()
                self._step()
        except BaseException as e:
            for seq in list(self._active):
                self._end(seq, error=e)
            raise

    @staticmethod
    def _drain(inbox: Inbox) -> None:
        while True:
            try:
                job = inbox.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.finish(GenerationStats(finish_reason="cancelled", output_tokens=0))

    def _admit(self, job: Job) -> None:
        """Render and check the prompt, build the job's sampler and give it a slot; or end it."""
        if job.should_stop():
            job.finish(GenerationStats(finish_reason="cancelled", output_tokens=0))
            return
        job.begin()
        try:
            seq = self._new_sequence(job)
        except BaseException as e:
            job.fail(e)
            if not isinstance(e, Exception):
                raise
            return
        self._active.append(seq)

    def _new_sequence(self, job: Job) -> _Sequence:
        req = job.request
        d = req.decoding
        timer = StreamTimer()
        n_ctx = self._n_ctx_seq
        _, tokens, stops = self.prompts.prepare(job, n_ctx)
        timer.prompt_ready()
        sampler = self._new_sampler(d, req.grammar, req.model)
        slot, reused = self._take_slot(tokens)
        return _Sequence(
            job=job,
            slot=slot,
            prompt=tokens,
            budget=min(d.max_tokens, n_ctx - len(tokens)),
            sampler=sampler,
            stops=stops,
            timer=timer,
            prefilled=reused,
            n_past=reused,
            cached=reused,
        )

    def _new_sampler(self, d: Decoding, grammar: str | None = None, model: str = "") -> Any:
        """The chain ``Llama.generate`` builds for the sequential backend's arguments.  Each
        sequence has its own chain, so a seeded request's random state is its own: the same seed
        gives the same draws whatever else is in the batch (the logits themselves can still
        differ by batch size, see the module docstring).  A request's grammar (issue 16) is the
        chain's own grammar sampler, so each sequence follows its own grammar; sampling through
        the chain accepts each token into it."""
        import llama_cpp

        constrain = grammar_sampler(self._vocab, grammar, model) if grammar is not None else None
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(chain, s)  # noqa: E731
        add(
            llama_cpp.llama_sampler_init_penalties(
                self._n_vocab, PENALTY_LAST_N, d.repetition_penalty, d.frequency_penalty, d.presence_penalty
            )
        )
        if constrain is not None:
            add(constrain)
        if d.greedy:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            add(llama_cpp.llama_sampler_init_top_k(d.top_k))
            add(llama_cpp.llama_sampler_init_typical(1.0, 1))
            add(llama_cpp.llama_sampler_init_top_p(d.top_p, 1))
            add(llama_cpp.llama_sampler_init_min_p(0.0, 1))
            add(llama_cpp.llama_sampler_init_temp(d.temperature))
            seed = llama_cpp.LLAMA_DEFAULT_SEED if d.seed is None else engine_seed(d.seed)
            add(llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _take_slot(self, prompt: list[int]) -> tuple[int, int]:
        """A free slot for ``prompt`` and how many of its tokens that slot's cache already holds.

        Allowed slots keep the active ones one run (see :meth:`_compact` for why): any slot when
        none is active, else a hole inside the run, else one next to it.  Among those, the one
        whose cached prompt shares the longest prefix with ``prompt`` wins (ties: the lowest);
        its cells past that prefix are dropped.  At least the last prompt token is decoded again:
        its logits give the first output token."""
        import llama_cpp

        busy = sorted(s.slot for s in self._active)
        if not busy:
            allowed = sorted(self._free_slots)
        else:
            holes = sorted(f for f in self._free_slots if busy[0] < f < busy[-1])
            allowed = holes or [f for f in (busy[0] - 1, busy[-1] + 1) if f in self._free_slots]

        def shared(slot: int) -> int:
            cached = self._cached.get(slot, ())
            n = 0
            for a, b in zip(cached, prompt[: len(prompt) - 1], strict=False):
                if a != b:
                    break
                n += 1
            return n

        slot = max(allowed, key=lambda f: (shared(f), -f))
        reused = shared(slot)
        self._free_slots.remove(slot)
        if self._cached.pop(slot, None) is not None:
            llama_cpp.llama_memory_seq_rm(self._mem, slot, reused, -1)
        self.reused_tokens += reused
        return slot, reused

    def _compact(self) -> None:
        """Keep the active slots one run of consecutive seq ids: move the top one into a hole.

        With one KV stream per sequence, llama.cpp puts only consecutive, increasing seq ids in
        one micro-batch, so slots 0, 1 and 3 cost two passes over the weights every step.  New
        requests fill holes first (:meth:`_take_slot`); when a sequence inside the run ends and
        none comes, the sequence in the highest slot moves into the hole: ``llama_memory_seq_cp``
        across streams copies the whole stream buffer (at the start of the next decode; the
        result is bit-exact), then ``llama_memory_seq_rm`` frees the old slot.  At most one copy
        per ended sequence, against an extra pass on every later step.
        """
        import llama_cpp

        while True:
            busy = sorted(self._active, key=lambda s: s.slot)
            if not busy or busy[-1].slot - busy[0].slot + 1 == len(busy):
                return
            top = busy[-1]
            hole = min(f for f in self._free_slots if busy[0].slot < f < top.slot)
            if self._cached.pop(hole, None) is not None:
                llama_cpp.llama_memory_seq_rm(self._mem, hole, -1, -1)
            if top.n_past:  # nothing to copy before its first prompt chunk
                llama_cpp.llama_memory_seq_cp(self._mem, top.slot, hole, -1, -1)
                llama_cpp.llama_memory_seq_rm(self._mem, top.slot, -1, -1)
                self.moves += 1
            self._free_slots.remove(hole)
            self._free_slots.add(top.slot)
            top.slot = hole

    def _step(self) -> None:
        """One llama_decode for every active sequence, then sample, stream and end sequences."""
        import llama_cpp

        # Plan: each decoding sequence sends its one token (a running stream never waits for a
        # prompt); prompt chunks share the step's prefill budget, oldest request first.
        plan: list[tuple[_Sequence, list[int]]] = []
        n = 0
        for seq in self._active:
            if seq.next_token is not None:
                plan.append((seq, [seq.next_token]))
                n += 1
        limit = min(self._n_batch, n + max(1, self.prefill_per_step))
        for seq in self._active:
            if seq.next_token is None and n < limit:
                chunk = seq.prompt[seq.prefilled : seq.prefilled + limit - n]
                seq.prefilled += len(chunk)
                plan.append((seq, chunk))
                n += len(chunk)
        # Written in slot order: with one KV stream per sequence, llama.cpp puts only consecutive,
        # increasing seq ids in one micro-batch (one pass over the weights), so sequences in
        # arrival order would cost a pass each.
        plan.sort(key=lambda p: p[0].slot)
        runs = 1 + sum(b[0].slot != a[0].slot + 1 for a, b in zip(plan, plan[1:], strict=False))
        self.max_slot_runs = max(self.max_slot_runs, runs)
        batch = self._batch
        token, pos, seq_ids, n_seq_id, logits = batch.token, batch.pos, batch.seq_id, batch.n_seq_id, batch.logits
        i = 0
        for seq, tokens in plan:
            for t in tokens:
                token[i], pos[i], seq_ids[i][0], n_seq_id[i], logits[i] = t, seq.n_past, seq.slot, 1, 0
                seq.n_past += 1
                i += 1
            if seq.next_token is not None or seq.prefilled == len(seq.prompt):
                logits[i - 1] = 1
                seq.out = i - 1
            else:
                seq.out = -1
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._lctx, batch)
        self.steps += 1
        self.max_batch_tokens = max(self.max_batch_tokens, n)
        self.max_batch_sequences = max(self.max_batch_sequences, len(plan))
        if rc != 0:
            error = RuntimeError(f"llama_decode returned {rc} for a batch of {n} tokens in {len(plan)} sequences")
            for seq, _ in plan:
                self._end(seq, error=error)
            return
        for seq, _ in plan:
            if seq.out < 0:
                continue
            try:
                tok = llama_cpp.llama_sampler_sample(seq.sampler, self._lctx, seq.out)
                finish = self._accept(seq, tok, self._logprobs(seq, tok))
            except Exception as e:
                self._end(seq, error=e)
                continue
            if finish is not None:
                self._end(seq, finish)

    def _logprobs(self, seq: _Sequence, tok: int) -> list[TokenLogprob] | None:
        """The sampled token's log probabilities from its row's logits, when its request asked
        (issue 16 §2; the sampler reads the same row without changing it)."""
        k = seq.job.request.logprobs
        if k is None:
            return None
        import llama_cpp
        import numpy as np

        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._lctx, seq.out), shape=(self._n_vocab,))
        return [token_logprob(row, tok, k, self._piece)]

    def _accept(self, seq: _Sequence, tok: int, logprobs: list[TokenLogprob] | None = None) -> str | None:
        """Stream one sampled token; the finish reason if the sequence ends with it."""
        import llama_cpp

        if llama_cpp.llama_vocab_is_eog(self._vocab, tok):
            return "stop"
        seq.timer.token()
        text, hit = seq.stops.push(seq.utf8.decode(self._piece(tok)))
        seq.job.emit(text, logprobs)
        if hit:
            return "stop"
        if seq.timer.tokens >= seq.budget:
            return "length"
        seq.next_token = tok
        return None

    def _piece(self, tok: int) -> bytes:
        import llama_cpp

        buf = self._piece_buf
        n = llama_cpp.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
        if n < 0:  # the buffer is too small: grow it and ask again
            buf = self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, tok, buf, len(buf), 0, False)
        return buf.raw[:n]

    def _end(self, seq: _Sequence, finish: str = "cancelled", *, error: BaseException | None = None) -> None:
        """Free the sequence's KV cells, sampler and slot first, then end its job."""
        import llama_cpp

        self._active.remove(seq)
        # keep the cells of the prompt (a later prompt with the same prefix starts after them);
        # drop the generated ones, and everything after an error
        keep = 0 if error is not None else min(seq.n_past, len(seq.prompt))
        llama_cpp.llama_memory_seq_rm(self._mem, seq.slot, keep, -1)
        if keep:
            self._cached[seq.slot] = seq.prompt[:keep]
        llama_cpp.llama_sampler_free(seq.sampler)
        self._free_slots.add(seq.slot)
        if error is not None:
            seq.job.fail(error)
            return
        try:
            if finish != "stop":
                seq.job.emit(seq.stops.push(seq.utf8.decode(b"", final=True))[0] + seq.stops.flush())
        finally:
            stats = seq.timer.stats(finish_reason=finish, prompt_tokens=len(seq.prompt))
            stats.cached_prompt_tokens = seq.cached
            seq.job.finish(stats)
