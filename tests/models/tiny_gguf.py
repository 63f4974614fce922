"""Generator of a tiny, real, deterministic llama-architecture GGUF model for tests.

``write_tiny_gguf(path)`` writes (in well under a second, ~0.8 MB, nothing is
committed to the repo) a GGUF file that llama.cpp / llama-cpp-python loads and
runs like any other model: 2 transformer layers, 4 query heads, 2 KV heads, a
byte-level GPT-2 BPE tokenizer and a chat template.  The weights are built so
that the next token is a function of the *last* token only:

* token embeddings are one-hot (scaled by ``sqrt(n_embd)`` so RMSNorm is the
  identity on them);
* attention and FFN weights are small seeded random values: every matmul of a
  real forward pass runs, but their contribution to the residual stream is
  ~1e-3 of the one-hot signal and cannot change the argmax;
* the output projection maps the one-hot of token ``t`` to a logit of
  ``~SUCCESSOR_LOGIT`` (≈100) for ``successor(t)`` and ~0 for everything else,
  so the successor wins by a huge margin under greedy decoding *and* under any
  sane sampling settings (temperature, top-k/top-p, min-p ...).

Vocabulary (260 tokens)
-----------------------
=========  =====================  ==========================================
id         text                   meaning
=========  =====================  ==========================================
0..255     GPT-2 byte-unicode     one token per byte value (id == byte value)
256        ``<|endoftext|>``      EOS (control)
257        ``<|im_start|>``       ChatML start (control)
258        ``<|im_end|>``         ChatML end (control, end-of-generation)
259        ``<|startoftext|>``    BOS (control; never added automatically)
=========  =====================  ==========================================

Every input character is one token per UTF-8 byte (the single BPE merge,
required by llama.cpp, can never fire), so for ASCII text one character == one
token.

Successor table (what the model predicts after the last token)
--------------------------------------------------------------
=============================================  ===========================
last token                                     next token
=============================================  ===========================
lowercase ``a``..``y``                         the next letter
``z``                                          ``a``   (cycle)
digit ``0``..``8``                             the next digit
``9``                                          EOS (generation stops)
``<|endoftext|>`` (EOS), ``<|im_end|>``        EOS
anything else (space, newline, punctuation,    ``a``
uppercase, other bytes, ``<|im_start|>``, BOS)
=============================================  ===========================

Examples: ``"x"`` continues ``"yzabc..."``; ``"5"`` gives ``"6789"`` and then
stops with finish_reason ``"stop"``; ``"Hi!"`` continues ``"abcd..."``; a
ChatML prompt ending in ``"<|im_start|>assistant\\n"`` continues ``"abc..."``.
``expected_continuation(text, n)`` computes this exactly.
"""

from __future__ import annotations

import pathlib

import numpy as np

__all__ = [
    "BOS_ID",
    "BOS_TOKEN",
    "CHATML_TEMPLATE",
    "EOS_ID",
    "EOS_TOKEN",
    "IM_END_ID",
    "IM_END_TOKEN",
    "IM_START_ID",
    "IM_START_TOKEN",
    "N_VOCAB",
    "RAW_TEMPLATE",
    "SPECIAL_TOKENS",
    "expected_continuation",
    "successor",
    "write_tiny_gguf",
]

# --------------------------------------------------------------------------- #
# Chat templates
# --------------------------------------------------------------------------- #

#: Renders ONLY the content of the last user message (no role markers, no
#: generation prompt), so the prompt's last token is the user's last character.
RAW_TEMPLATE = (
    "{% set ns = namespace(last='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set ns.last = m['content'] %}{% endif %}"
    "{% endfor %}"
    "{{ ns.last }}"
)

#: Standard ChatML (byte-identical to llama-cpp-python's CHATML_CHAT_TEMPLATE).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# --------------------------------------------------------------------------- #
# Vocabulary
# --------------------------------------------------------------------------- #

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
BOS_TOKEN = "<|startoftext|>"

EOS_ID = 256
IM_START_ID = 257
IM_END_ID = 258
BOS_ID = 259
N_VOCAB = 260

SPECIAL_TOKENS: dict[str, int] = {
    EOS_TOKEN: EOS_ID,
    IM_START_TOKEN: IM_START_ID,
    IM_END_TOKEN: IM_END_ID,
    BOS_TOKEN: BOS_ID,
}

# Model shape.  n_embd must be >= N_VOCAB for one-hot embeddings.
N_EMBD = 320
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = 16  # decoupled from n_embd / n_head via attention.key_length
N_FF = 64
N_CTX_TRAIN = 4096
SEED = 1234
NOISE_STD = 0.01
SUCCESSOR_LOGIT = 100.0
INERT_MERGE = "ab cd"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _token_texts() -> list[str]:
    b2u = _bytes_to_unicode()
    texts = [b2u[b] for b in range(256)]
    specials = sorted(SPECIAL_TOKENS.items(), key=lambda kv: kv[1])
    assert [i for _, i in specials] == list(range(256, N_VOCAB))
    texts += [t for t, _ in specials]
    return texts


def successor(token_id: int) -> int:
    """The token id the model predicts after ``token_id`` (see module docstring)."""
    if token_id in (EOS_ID, IM_END_ID):
        return EOS_ID
    if ord("a") <= token_id <= ord("z"):
        return ord("a") + (token_id - ord("a") + 1) % 26
    if ord("0") <= token_id <= ord("8"):
        return token_id + 1
    if token_id == ord("9"):
        return EOS_ID
    return ord("a")


def _last_token(text: str) -> int:
    """Last prompt token llama.cpp produces for ``text`` (parsing specials).

    An empty prompt is treated as a lone BOS.  NB: llama-cpp-python 0.3.36 does
    not do that for this model (add_bos_token is false): ``create_completion("")``
    raises ``AssertionError`` in ``Llama.sample`` -- reject empty prompts."""
    if text == "":
        return BOS_ID
    for tok, tid in SPECIAL_TOKENS.items():
        if text.endswith(tok):
            return tid
    return text.encode("utf-8")[-1]


def expected_continuation(text: str, n: int) -> str:
    """What greedy (or any) decoding yields for at most ``n`` new tokens after
    the prompt ``text`` (stopping, without emitting anything, at EOS)."""
    out: list[str] = []
    tok = _last_token(text)
    for _ in range(n):
        tok = successor(tok)
        if tok == EOS_ID:
            break
        out.append(chr(tok))
    return "".join(out)


# --------------------------------------------------------------------------- #
# Writer
# --------------------------------------------------------------------------- #


def write_tiny_gguf(
    path: pathlib.Path, *, chat_template: str = RAW_TEMPLATE
) -> pathlib.Path:
    """Write the tiny model to ``path`` (parent dirs created) and return ``path``."""
    import gguf  # local import: only tests that build the model need it

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    def noise(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * NOISE_STD).astype(np.float16)

    scale = float(np.sqrt(N_EMBD))  # RMS of the one-hot row becomes 1

    # token_embd: numpy shape (n_vocab, n_embd) == ggml ne {n_embd, n_vocab}
    tok_embd = np.zeros((N_VOCAB, N_EMBD), dtype=np.float32)
    tok_embd[np.arange(N_VOCAB), np.arange(N_VOCAB)] = scale
    # output: logits = output @ rmsnorm(h); rmsnorm(one-hot_t * scale) has value
    # `scale` at position t, so put SUCCESSOR_LOGIT / scale at [successor(t), t].
    output = np.zeros((N_VOCAB, N_EMBD), dtype=np.float32)
    for t in range(N_VOCAB):
        output[successor(t), t] = SUCCESSOR_LOGIT / scale

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("llm-pool tiny deterministic test model")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_vocab_size(N_VOCAB)
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(_token_texts())
    w.add_token_types(
        [gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * (N_VOCAB - 256)
    )
    # A gpt2 tokenizer needs a non-empty merges array (GGUFWriter silently drops
    # empty arrays and llama.cpp then refuses the vocab).  The merge must never
    # fire: when llama.cpp merges a pair whose result is not in the vocab it
    # does NOT fall back to the byte tokens -- the text is silently dropped
    # (a merge "Ċ Ċ" made "\n\n" vanish).  BPE starts from single characters
    # and this is the only merge, so the multi-character parts "ab"/"cd" can
    # never exist and the merge is inert.
    w.add_token_merges([INERT_MERGE])
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template)

    f16 = np.float16
    w.add_tensor("token_embd.weight", tok_embd.astype(f16))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    w.add_tensor("output.weight", output.astype(f16))
    q_dim, kv_dim = N_HEAD * HEAD_DIM, N_HEAD_KV * HEAD_DIM
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "attn_q.weight", noise(q_dim, N_EMBD))
        w.add_tensor(p + "attn_k.weight", noise(kv_dim, N_EMBD))
        w.add_tensor(p + "attn_v.weight", noise(kv_dim, N_EMBD))
        w.add_tensor(p + "attn_output.weight", noise(N_EMBD, q_dim))
        w.add_tensor(p + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(p + "ffn_gate.weight", noise(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_up.weight", noise(N_FF, N_EMBD))
        w.add_tensor(p + "ffn_down.weight", noise(N_EMBD, N_FF))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
