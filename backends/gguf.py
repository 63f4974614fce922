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
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args

from llm_pool.backends.base import BackendKind, SequentialBackend, StreamTimer
from llm_pool.backends.prompts import PromptPrep, SpecialToken, Vocab
from llm_pool.config.settings import KvCacheType
from llm_pool.pool.jobs import GenerationStats, Job

if TYPE_CHECKING:
    from pathlib import Path

    from llm_pool.backends.base import BackendContext

log = logging.getLogger("llm_pool.gguf")

#: Held while llama-cpp-python builds a model or context with ``verbose=False``: it then silences
#: llama.cpp by ``dup2``-ing /dev/null over the *process's* fds 1 and 2 and restoring the copies
#: it saved.  Two replicas loading at once interleave that save/restore, and fds 1 and 2 stay on
#: /dev/null for good (every later log line of the server lost; found by tests/reliability).
#: Every construction of a ``Llama`` or ``_internals.LlamaModel``/``LlamaContext`` with
#: ``verbose=False`` must hold it (``backends.gguf_batched`` too).
LLAMA_QUIET_LOAD_LOCK = threading.Lock()

#: K/V cache types an admin may ask for, by GGML name (lower case).
KV_CACHE_TYPES: tuple[str, ...] = get_args(KvCacheType)


def ggml_type(name: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if name.lower() not in KV_CACHE_TYPES or value is None:
        raise ValueError(f"unknown GGML cache type {name!r}; one of: {', '.join(KV_CACHE_TYPES)}")
    return int(value)


def llama_vocab(vocab: Any, encode: Callable[[str], list[int]]) -> Vocab[int]:
    """The :class:`~backends.prompts.Vocab` of a llama.cpp vocabulary: ``encode`` tokenizes plain
    text (``special=False``); the special tokens are those llama.cpp parses only with
    ``special=True`` (control and unknown tokens), with their whitespace-eating attributes.
    One pass over the vocabulary (SmolLM2, 49k entries: ~50 ms)."""
    import llama_cpp

    hidden = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    specials: list[SpecialToken[int]] = []
    longest = 1
    for token in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        text = llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", "replace")
        longest = max(longest, len(text))
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if attr & hidden:
            lstrip = bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP)
            specials.append(SpecialToken(text, token, lstrip, bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP)))
    return Vocab(encode, specials, longest)


def set_prompt_model(prompts: PromptPrep[int], model: Any) -> None:
    """Hand ``prompts`` what a llama.cpp model (``llama_cpp._internals.LlamaModel``) knows of
    prompts: its chat template, BOS/EOS text and vocabulary.  One place for every GGUF-family
    backend (in-process, batched, and ``llama_server``, which tokenizes here and sends ids)."""

    def special_text(token: int) -> str:
        return "" if token < 0 else str(model.token_get_text(token))

    prompts.set_model(
        model.metadata().get("tokenizer.chat_template"),
        special_text(model.token_bos()),
        special_text(model.token_eos()),
        llama_vocab(model.vocab, lambda text: model.tokenize(text.encode("utf-8"), add_bos=False, special=False)),
    )


def open_vocab(path: Path) -> Any:
    """A GGUF file's tokenizer and metadata alone (llama.cpp ``vocab_only``: no weights, no
    context; SmolLM2: ~0.1 s), for a backend whose weights live in another process."""
    import llama_cpp
    from llama_cpp import _internals
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        with LLAMA_QUIET_LOAD_LOCK:
            return _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
    except ValueError as e:  # "Failed to load model from file"
        raise RuntimeError(f"llama.cpp could not read the vocabulary of {path.name}: {e}") from None


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

        llm = self.llm
        req = job.request
        d = req.decoding
        timer = StreamTimer()
        n_ctx = llm.n_ctx()
        _, tokens, stops = self.prompts.prepare(job, n_ctx)
        timer.prompt_ready()
        budget = min(d.max_tokens, n_ctx - len(tokens))
        greedy = d.temperature == 0 or d.top_k == 1
        vocab = llm._model.vocab
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        finish = "length"
        history = list(tokens)
        generator = llm.generate(
            tokens,
            top_k=1 if greedy else d.top_k,
            top_p=d.top_p,
            min_p=0.0,
            temp=0.0 if greedy else d.temperature,
            repeat_penalty=d.repetition_penalty,
            reset=True,
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
                piece = llm.detokenize([token], prev_tokens=history)
                history.append(token)
                text, hit = stops.push(utf8.decode(piece))
                job.emit(text)
                if hit:
                    finish = "stop"
                    break
                if timer.tokens >= budget:
                    break
        finally:
            generator.close()
        if finish != "stop":
            job.emit(stops.push(utf8.decode(b"", final=True))[0] + stops.flush())
        return timer.stats(finish_reason=finish, prompt_tokens=len(tokens))


def _create(ctx: BackendContext) -> Any:
    if ctx.model.gguf_batching:
        from llm_pool.backends.gguf_batched import BatchedGGUFBackend

        return BatchedGGUFBackend(ctx)
    return GGUFBackend(ctx)


#: Override values llama.cpp reads case-insensitively; we keep them lower case.
_LOWER_CASE = ("gguf_flash_attn", "gguf_type_k", "gguf_type_v")


def _normalise(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: v.lower() if k in _LOWER_CASE and isinstance(v, str) else v for k, v in overrides.items()}


def _file_bounds(path: Path) -> dict[str, tuple[int, str]]:
    """``gguf_n_ctx`` is bounded by the context the model was trained for (the GGUF header's
    ``n_ctx_train``): above it llama.cpp loads another context or spends tens of seconds failing."""
    from llm_pool.backends.gguf_header import trained_context

    trained = trained_context(path)
    why = "the context model {model!r} was trained for ({bound}, n_ctx_train in its GGUF header)"
    return {"gguf_n_ctx": (trained, why)} if trained is not None else {}


KIND = BackendKind(
    name="gguf",
    create=_create,
    uses_gpu=lambda m: m.gguf_n_gpu_layers != 0,
    overrides=("gguf_n_ctx", "gguf_flash_attn", "gguf_type_k", "gguf_type_v"),
    check_overrides=_normalise,
    file_bounds=_file_bounds,
    load_recommendations={
        "kv_cache_presets": [{"label": f"{t}/{t}", "gguf_type_k": t, "gguf_type_v": t} for t in ("f16", "q8_0", "q4_0")]
    },
)
