"""What every llama.cpp-based backend shares (in-process, batched, and ``llama_server``, which
tokenizes here and sends the engine token ids): the quiet-load lock, the K/V cache types, and
a GGUF's vocabulary and prompt model.  ``llama_cpp`` is imported inside the functions only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args

from llm_pool.backends.prompts import PromptPrep, SpecialToken, Vocab
from llm_pool.config.settings import KvCacheType
from llm_pool.pool.errors import invalid_request
from llm_pool.pool.jobs import TokenLogprob, TopLogprob

if TYPE_CHECKING:
    from pathlib import Path


#: Held while llama-cpp-python builds a model or context with ``verbose=False``: it then silences
#: llama.cpp by ``dup2``-ing /dev/null over the *process's* fds 1 and 2 and restoring the copies
#: it saved.  Two replicas loading at once interleave that save/restore, and fds 1 and 2 stay on
#: /dev/null for good (every later log line of the server lost; found by tests/reliability).
#: Every construction of a ``Llama`` or ``_internals.LlamaModel``/``LlamaContext`` with
#: ``verbose=False`` must hold it (every backend of this family).
LLAMA_QUIET_LOAD_LOCK = threading.Lock()

#: K/V cache types an admin may ask for, by GGML name (lower case).
KV_CACHE_TYPES: tuple[str, ...] = get_args(KvCacheType)


def ggml_type(name: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if name.lower() not in KV_CACHE_TYPES or value is None:
        raise ValueError(f"unknown GGML cache type {name!r}; one of: {', '.join(KV_CACHE_TYPES)}")
    return int(value)


def trained_context_bound(key: str) -> Callable[[Path], dict[str, tuple[int, str]]]:
    """A GGUF kind's ``file_bounds``: ``key`` (its context per sequence) is bounded by the context
    the model was trained for (the GGUF header's ``n_ctx_train``): above it llama.cpp loads
    another context or spends tens of seconds failing."""

    def bounds(path: Path) -> dict[str, tuple[int, str]]:
        from llm_pool.backends.gguf_header import trained_context

        trained = trained_context(path)
        why = "the context model {model!r} was trained for ({bound}, n_ctx_train in its GGUF header)"
        return {key: (trained, why)} if trained is not None else {}

    return bounds


def tokenize(vocab: Any, text: bytes, *, add_bos: bool, special: bool) -> list[int]:
    """llama.cpp's tokens of ``text`` (``llama_vocab`` pointer ``vocab``).

    What llama-cpp-python's ``LlamaModel.tokenize`` does, with a buffer of the size ``text`` can
    need (a token per byte at most, plus BOS, EOS and a prefix space) instead of one of the
    model's training context per call: that allocates and zeroes 4 bytes × ``n_ctx_train`` each
    time (SmolLM2 32 KB, a 128k-context model 512 KB): 0.05 → 0.03 ms per call with SmolLM2
    here, and a chat prompt makes one call per run of text between special tokens (preparing a
    37-token prompt: 0.26 → 0.15 ms)."""
    import llama_cpp

    size = len(text) + 8
    buf = (llama_cpp.llama_token * size)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, size, add_bos, special)
    if n < 0:  # llama.cpp says how many it needs; the bound above should make this unreachable
        size = -n
        buf = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, size, add_bos, special)
        if n < 0:
            raise RuntimeError(f"llama.cpp could not tokenize a text of {len(text)} bytes")
    return buf[:n]


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
        llama_vocab(model.vocab, lambda text: tokenize(model.vocab, text.encode("utf-8"), add_bos=False, special=False)),
    )
    prompts.add_bos = bool(model.add_bos_token())


def grammar_sampler(vocab: Any, grammar: str, model: str) -> Any:
    """A llama.cpp grammar sampler for ``grammar`` (GBNF, root rule ``root``; issue 16), or a 400
    if llama.cpp cannot parse it (it then returns NULL, and a NULL in a sampler chain crashes)."""
    import llama_cpp

    from llm_pool.pool.errors import invalid_request

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    if not sampler:
        raise invalid_request("the requested output format gives a grammar llama.cpp cannot parse", model=model)
    return sampler


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


# --- logprobs and embeddings (issue 16 §2) ---------------------------------------------------
def token_logprob(logits: Any, token: int, k: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """The log probability of ``token`` under ``logits`` (the model's raw distribution, before
    any sampler setting: what OpenAI reports) and the ``k`` most likely tokens', most likely
    first; ``piece(t)`` is token ``t``'s bytes."""
    import numpy as np

    row = np.asarray(logits, dtype=np.float64)
    top = row.max()
    logprobs = row - (top + np.log(np.exp(row - top).sum()))

    def entry(t: int) -> TopLogprob:
        raw = piece(t)
        return TopLogprob(token=raw.decode("utf-8", "replace"), logprob=float(logprobs[t]), bytes=list(raw))

    best: list[int] = []
    if k > 0:
        k = min(k, row.shape[0])
        candidates = np.argpartition(-logprobs, k - 1)[:k]
        best = sorted((int(t) for t in candidates), key=lambda t: (-logprobs[t], t))
    chosen = entry(token)
    return TokenLogprob(token=chosen.token, logprob=chosen.logprob, bytes=chosen.bytes, top=[entry(t) for t in best])


def embedding_inputs(
    model: str, inputs: list[str], limit: int, max_token_chars: int, tokenize: Callable[[bytes], list[int]]
) -> list[list[int]]:
    """Each input of an embeddings job as token ids (``tokenize``: plain text, the model's own
    BOS/EOS, never a control token), or a 400 naming the input that is empty or longer than the
    ``limit`` tokens an embedding sees at once; characters are bounded first (``limit`` tokens of
    at most ``max_token_chars`` each), so the tokenizer's work is too."""
    most_chars = limit * max(1, max_token_chars)
    out: list[list[int]] = []
    for i, text in enumerate(inputs):
        if len(text) > most_chars:
            raise invalid_request(
                f"input[{i}] has {len(text)} characters; model {model!r} embeds at most {limit} tokens"
                f" at once, which hold at most {most_chars}",
                param=f"$.input[{i}]",
                model=model,
            )
        tokens = tokenize(text.encode("utf-8"))
        if not tokens or len(tokens) > limit:
            why = "is empty" if not tokens else f"has {len(tokens)} tokens; model {model!r} embeds at most {limit} at once"
            raise invalid_request(f"input[{i}] {why}", param=f"$.input[{i}]", model=model)
        out.append(tokens)
    return out


def pool_embedding(rows: Any) -> list[float]:
    """One L2-normalised vector (OpenAI's embeddings are unit length) from llama.cpp's output:
    a pooled vector as it is, per-token vectors (a model whose pooling is ``none``) averaged."""
    import numpy as np

    a = np.asarray(rows, dtype=np.float64)
    if a.ndim == 2:
        a = a.mean(axis=0)
    norm = float(np.linalg.norm(a))
    return [float(x) for x in (a / norm if norm > 0 else a)]
