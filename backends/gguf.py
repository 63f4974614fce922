"""GGUF models through llama-cpp-python, one job at a time per replica.

Everything here runs on the replica's one worker thread (see :mod:`backends.base`): llama.cpp's
OpenMP thread team belongs to the calling thread, and a second live calling thread costs ~3x in
tokens/s on small CPUs.  The prompt is rendered by :mod:`backends.prompts` and decoded with
``Llama.generate``, which reuses the KV cache for the prefix shared with the previous prompt (a
repeated system prompt costs one decode step), and which we can leave at any token: the stop flag
is checked once per token.

``llama_cpp`` is imported in :meth:`GGUFBackend.load` only.
"""

from __future__ import annotations

import codecs
import logging
from typing import TYPE_CHECKING, Any

from llm_pool.backends.base import BackendKind, SequentialBackend, StreamTimer
from llm_pool.backends.decoding import engine_seed
from llm_pool.backends.llama_common import (
    LLAMA_QUIET_LOAD_LOCK,
    embedding_inputs,
    ggml_type,
    grammar_sampler,
    pool_embedding,
    set_prompt_model,
    token_logprob,
    tokenize,
    trained_context_bound,
)
from llm_pool.backends.prompts import PromptPrep
from llm_pool.pool.jobs import GenerationStats, Job

if TYPE_CHECKING:
    from llm_pool.backends.base import BackendContext

log = logging.getLogger("llm_pool.gguf")


class GGUFBackend(SequentialBackend):
    """One llama.cpp context; see the module docstring."""

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.llm: Any = None
        self.prompts: PromptPrep[int] = PromptPrep(ctx.model, backend="gguf")

    def describe(self) -> dict[str, object]:
        return {"n_threads": self.ctx.n_threads, "n_ctx": self.ctx.model.gguf_n_ctx}

    def load(self) -> None:
        m = self.ctx.model
        path = self.ctx.model_path()  # a missing file is reported as such, library or not
        import llama_cpp

        kwargs: dict[str, Any] = {}
        if m.gguf_type_k:
            kwargs["type_k"] = ggml_type(m.gguf_type_k)
        if m.gguf_type_v:
            kwargs["type_v"] = ggml_type(m.gguf_type_v)
        # llama-cpp-python takes a bool; "auto" means on where layers run on a GPU.
        flash = m.gguf_flash_attn == "on" or (m.gguf_flash_attn == "auto" and m.gguf_n_gpu_layers != 0)
        try:
            with LLAMA_QUIET_LOAD_LOCK:
                self.llm = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=m.gguf_n_ctx,
                    n_batch=min(m.gguf_n_batch, m.gguf_n_ctx),
                    n_threads=self.ctx.n_threads,
                    n_threads_batch=self.ctx.n_threads,
                    n_gpu_layers=m.gguf_n_gpu_layers,
                    flash_attn=flash,
                    embedding=m.embeddings,
                    verbose=False,
                    **kwargs,
                )
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise RuntimeError(f"llama.cpp could not load {path.name}: {e}") from None
        set_prompt_model(self.prompts, self.llm._model)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def generate(self, job: Job) -> GenerationStats:
        import llama_cpp
        import numpy as np
        from llama_cpp.llama_grammar import LlamaGrammar

        llm = self.llm
        req = job.request
        if req.embed_inputs is not None:
            return self.embed(job)
        d = req.decoding
        timer = StreamTimer()
        n_ctx = llm.n_ctx()
        _, tokens, stops = self.prompts.prepare(job, n_ctx)
        timer.prompt_ready()
        budget = min(d.max_tokens, n_ctx - len(tokens))
        greedy = d.greedy
        # Llama keeps the seed between calls: every job sets its own (a random one when unseeded)
        llm.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if d.seed is None else engine_seed(d.seed))
        vocab = llm._model.vocab
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        want_logprobs = req.logprobs

        def piece(t: int) -> bytes:
            return bytes(llm.detokenize([t]))

        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        finish = "length"
        history = list(tokens)
        grammar = None
        if req.grammar is not None:  # structured output / forced tool call (issue 16)
            llama_cpp.llama_sampler_free(grammar_sampler(llm._model.vocab, req.grammar, req.model))  # 400 if unparsable
            grammar = LlamaGrammar.from_string(req.grammar, verbose=False)
        cached = _cached_prefix(llm, tokens)
        generator = llm.generate(
            tokens,
            top_k=1 if greedy else d.top_k,
            top_p=d.top_p,
            min_p=0.0,
            temp=0.0 if greedy else d.temperature,
            repeat_penalty=d.repetition_penalty,
            frequency_penalty=d.frequency_penalty,
            presence_penalty=d.presence_penalty,
            reset=True,
            grammar=grammar,
        )
        try:
            for token in generator:
                if job.should_stop():
                    finish = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                timer.token()
                lp = None
                if want_logprobs is not None:  # the logits that chose this token are still the last
                    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
                    lp = [token_logprob(logits, token, want_logprobs, piece)]
                text_bytes = llm.detokenize([token], prev_tokens=history)
                history.append(token)
                text, hit = stops.push(utf8.decode(text_bytes))
                job.emit(text, lp)
                if hit:
                    finish = "stop"
                    break
                if timer.tokens >= budget:
                    break
        finally:
            generator.close()
        if finish != "stop":
            job.emit(stops.push(utf8.decode(b"", final=True))[0] + stops.flush())
        stats = timer.stats(finish_reason=finish, prompt_tokens=len(tokens))
        stats.cached_prompt_tokens = cached
        return stats


    def embed(self, job: Job) -> GenerationStats:
        """An embeddings job: one vector per input (:func:`~backends.llama_common.pool_embedding`),
        each input tokenized as plain text with the model's own BOS/EOS, and refused (400) when it
        is empty or longer than a batch (an embedding sees a whole input at once)."""
        llm = self.llm
        req = job.request
        inputs = req.embed_inputs or []
        timer = StreamTimer()
        limit = min(llm.n_batch, llm.context_params.n_ubatch)
        assert self.prompts.vocab is not None
        ids = embedding_inputs(
            req.model, inputs, limit, self.prompts.vocab.max_token_chars,
            lambda b: tokenize(llm._model.vocab, b, add_bos=True, special=False),
        )
        total = sum(map(len, ids))
        timer.prompt_ready()
        # one input per call: llama-cpp-python's multi-sequence batches read per-token outputs
        # (pooling "none") at the wrong rows, so an input's vector would depend on its neighbours
        job.embeddings = []
        for text in inputs:
            if job.should_stop():
                return timer.stats(finish_reason="cancelled", prompt_tokens=total)
            job.embeddings.append(pool_embedding(llm.embed([text], truncate=False)[0]))
        stats = timer.stats(finish_reason="stop", prompt_tokens=total)
        stats.output_tokens = 0
        return stats

def _cached_prefix(llm: Any, tokens: list[int]) -> int:
    """The prompt tokens ``Llama.generate(reset=True)`` will not decode again: the prefix they
    share with what the context holds (it decodes at least the last prompt token), as
    llama-cpp-python computes it."""
    held = llm._input_ids[: llm.n_tokens]
    n = 0
    for a, b in zip(held, tokens[:-1], strict=False):
        if a != b:
            break
        n += 1
    return n



def _create(ctx: BackendContext) -> Any:
    if ctx.model.gguf_batching and not ctx.model.embeddings:  # embeddings: one batch per job
        from llm_pool.backends.gguf_batched import BatchedGGUFBackend

        return BatchedGGUFBackend(ctx)
    return GGUFBackend(ctx)


#: Override values llama.cpp reads case-insensitively; we keep them lower case.
_LOWER_CASE = ("gguf_flash_attn", "gguf_type_k", "gguf_type_v")


def _normalise(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v.lower() if k in _LOWER_CASE and isinstance(v, str) else v for k, v in overrides.items()}


KIND = BackendKind(
    name="gguf",
    create=_create,
    uses_gpu=lambda m: m.gguf_n_gpu_layers != 0,
    overrides=("gguf_n_ctx", "gguf_flash_attn", "gguf_type_k", "gguf_type_v"),
    check_overrides=_normalise,
    file_bounds=trained_context_bound("gguf_n_ctx"),
    seeded_sampling=True,
    token_logprobs=lambda m: True,
    embeddings=True,
    response_formats=("text", "json_object", "json_schema"),
    tools=True,
    load_recommendations={
        "gguf_cache_type_pairs": {
            "kind": "pair_presets",
            "fields": ["gguf_type_k", "gguf_type_v"],
            "recommended_pairs": [
                {"label": f"{t}/{t}", "gguf_type_k": t, "gguf_type_v": t} for t in ("f16", "q8_0", "q4_0")
            ],
            "notes": [
                "Presets chosen by llm-pool; any pair of allowed cache types may be loaded.",
                "Prefer the same type for K and V: llama.cpp may not offload a mixed pair to the GPU.",
            ],
        }
    },
    load_constraint_notes={
        "gguf_flash_attn": {"examples": ["auto", "on", "off"]},
        # null: llama.cpp's own cache type, f16
        **{k: {"format": "ggml_type_name", "examples": ["f16", "q8_0", "q4_0"], "null_means": "f16", "default": "f16"}
           for k in ("gguf_type_k", "gguf_type_v")},
    },
)
