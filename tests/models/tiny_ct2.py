"""Tiny, fully deterministic CTranslate2 test models built in code.

Nothing is downloaded and nothing is committed: each helper writes a complete
model folder (``model.bin``, ``config.json``, vocabulary, ``tokenizer.json``,
``tokenizer_config.json``) in well under a second, built with
``ctranslate2.specs`` and numpy weights chosen so that the next token is a
function of the last token only.

Vocabulary / tokenizer
----------------------
Both models use a byte-level tokenizer with *no merges* (GPT-2 style byte to
unicode mapping, like SmolLM2 / GPT-2 / Llama-3 tokenizers), so every byte of
UTF-8 text is exactly one token and token strings are the usual byte-level
strings: ``"a"`` is ``"a"``, a space is ``"Ġ"``, ``"\\n"`` is ``"Ċ"``.
Ids: ``<s>``=0, ``</s>``=1, ``<unk>``=2, ``<|im_start|>``=3, ``<|im_end|>``=4,
then the 256 byte tokens in byte order (id = 5 + byte value).  The translator
appends the language tokens ``__en__``, ``__fr__``, ``__de__``, ``__es__``.

Generator successor rule (:func:`successor`)
--------------------------------------------
* lowercase letters cycle ``a -> b -> ... -> z -> a``  (after "x": "yzabc...")
* digits ``0 -> 1 -> ... -> 9`` and ``9 -> </s>``     (after "5": "6789", stop)
* special tokens (``<s> </s> <unk> <|im_start|> <|im_end|>``) -> ``</s>``
* every other token (upper case, space, punctuation, ``\\n``, other bytes) -> "a"

So a ChatML prompt ending in ``"<|im_start|>assistant\\n"`` is answered with
``"abcdefghijklmnopqrstuvwxyzabc..."`` until ``max_length``; a prompt ending
in ``<|im_end|>`` gets an empty answer (EOS first).  The winning logit beats
every other by > 30, so sampling (top-k/top-p/temperature <= ~2) is
deterministic too.

Translator
----------
The encoder output is ignored (cross-attention weights are tiny); the decoder
uses the successor rule above plus a language rule: ``__en__ -> "3"``,
``__fr__ -> "5"``, ``__de__ -> "7"``, ``__es__ -> "9"`` (:data:`LANG_FIRST`).
With ``decoder_start_token="<s>"`` and the translator-only rule ``<s> -> "0"``:

* ``translate_batch([src], target_prefix=[["__fr__"]])`` ->
  ``hypotheses[0] == ["__fr__", "5", "6", "7", "8", "9"]``
* ``target_prefix=[["__de__"]]`` -> ``["__de__", "7", "8", "9"]``
* ``target_prefix=[["__es__"]]`` -> ``["__es__", "9"]``
* ``target_prefix=[["__en__"]]`` -> ``["__en__", "3", "4", ..., "9"]``
* no target prefix -> ``["0", "1", ..., "9"]``
* a prefix ending with a letter/digit continues that chain, e.g.
  ``["__fr__", "x"]`` -> ``["__fr__", "x", "y", "z", "a", ...]`` until
  ``max_decoding_length``.

See :func:`expected_translation`.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

import numpy as np

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, UNK, IM_START, IM_END]
LANG_TOKENS = ["__en__", "__fr__", "__de__", "__es__"]
#: First output token after each target-language token (then the digit chain).
LANG_FIRST = {"__en__": "3", "__fr__": "5", "__de__": "7", "__es__": "9"}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_HIDDEN = 64
_HEADS = 4
_FFN = 32
_LAYERS = 2
_EMB_SCALE = 4.0  # residual-stream magnitude of the class one-hot
_OUT_SCALE = 5.0  # logit of the winner is ~ _OUT_SCALE * sqrt(_HIDDEN) = 40
_NOISE = 0.02  # std of the random attention / FFN weights
_SEED = 1234


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
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


BYTE_TO_TOKEN = _bytes_to_unicode()
TOKEN_TO_BYTE = {v: k for k, v in BYTE_TO_TOKEN.items()}
#: Token string used for "\n" and " " by the byte-level tokenizer.
NEWLINE_TOKEN = BYTE_TO_TOKEN[ord("\n")]  # "Ċ"
SPACE_TOKEN = BYTE_TO_TOKEN[ord(" ")]  # "Ġ"


def vocabulary(extra: Iterable[str] = ()) -> list[str]:
    """The CT2 vocabulary (list index == token id)."""
    return SPECIAL_TOKENS + [BYTE_TO_TOKEN[b] for b in range(256)] + list(extra)


def successor(token: str, *, translator: bool = False) -> str:
    """Next token (CT2/tokenizer token string) predicted after ``token``.

    ``translator=True`` gives the tiny translator's decoder rule, which differs
    only for ``<s>`` (the decoder start token): ``<s> -> "0"``.
    """
    if translator and token == BOS:
        return "0"
    if token in SPECIAL_TOKENS:
        return EOS
    if token in LANG_FIRST:
        return LANG_FIRST[token]
    if len(token) == 1 and token in string.ascii_lowercase:
        return chr((ord(token) - ord("a") + 1) % 26 + ord("a"))
    if len(token) == 1 and token in string.digits:
        return EOS if token == "9" else str(int(token) + 1)
    return "a"


def expected_tokens(last_token: str, n: int, *, translator: bool = False) -> list[str]:
    """Up to ``n`` generated tokens after ``last_token``, stopping before EOS."""
    out: list[str] = []
    tok = last_token
    while len(out) < n:
        tok = successor(tok, translator=translator)
        if tok == EOS:
            break
        out.append(tok)
    return out


def expected_continuation(text: str, n: int) -> str:
    """Greedy output text of the tiny generator for a prompt ``text``.

    ``n`` is the maximum number of new tokens (= characters, since every
    generated token is a single ASCII letter or digit).  The result stops early
    when the digit chain reaches EOS.  A prompt ending in a special token
    (e.g. ``<|im_end|>``) yields ``""``.
    """
    if not text:
        raise ValueError("empty prompt")
    for special in SPECIAL_TOKENS + LANG_TOKENS:
        if text.endswith(special):
            return "".join(expected_tokens(special, n))
    last = BYTE_TO_TOKEN[text.encode("utf-8")[-1]]
    return "".join(expected_tokens(last, n))


def expected_translation(target_prefix: list[str], max_decoding_length: int = 256) -> list[str]:
    """Exact ``hypotheses[0]`` of the tiny translator for a target prefix.

    Matches CT2's ``translate_batch`` (prefix included in the hypothesis,
    ``max_decoding_length`` counting the prefix tokens).
    """
    target_prefix = list(target_prefix or [])
    last = target_prefix[-1] if target_prefix else BOS
    n = max_decoding_length - len(target_prefix)
    return target_prefix + expected_tokens(last, max(n, 0), translator=True)


# --------------------------------------------------------------------------
# tokenizer files


def _write_tokenizer(path: Path, vocab: list[str], extra_special: Iterable[str] = ()) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(vocab)},
            merges=[],
            unk_token=UNK,
        )
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS + list(extra_special)]
    )
    tok.save(str(path / "tokenizer.json"))
    tok_config = {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": [IM_START, IM_END] + list(extra_special),
        "chat_template": CHATML_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    special_map = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": EOS}
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# weights


def _class_tables(vocab: list[str], *, translator: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Embedding and output-projection matrices implementing :func:`successor`.

    Tokens are grouped into classes that share the same successor (one class
    per letter/digit/language token, one for specials, one for "other").
    Embedding = ``_EMB_SCALE`` * one-hot(class); the projection row of token
    ``s`` = ``_OUT_SCALE`` * sum of one-hots of the classes whose successor is ``s``.
    """
    index = {t: i for i, t in enumerate(vocab)}
    class_of: dict[str, str] = {}
    for tok in vocab:
        if translator and tok == BOS:
            class_of[tok] = tok
        elif tok in SPECIAL_TOKENS:
            class_of[tok] = "<special>"
        elif tok in LANG_FIRST or (
            len(tok) == 1 and (tok in string.ascii_lowercase or tok in string.digits)
        ):
            class_of[tok] = tok
        else:
            class_of[tok] = "<other>"
    classes = sorted(set(class_of.values()))
    if len(classes) > _HIDDEN:
        raise AssertionError("too many classes for the hidden size")
    dim = {c: i for i, c in enumerate(classes)}
    # the successor of a class, from any member
    class_succ = {
        c: successor(next(t for t in vocab if class_of[t] == c), translator=translator)
        for c in classes
    }

    emb = np.zeros((len(vocab), _HIDDEN), dtype=np.float32)
    for tok, i in index.items():
        emb[i, dim[class_of[tok]]] = _EMB_SCALE
    proj = np.zeros((len(vocab), _HIDDEN), dtype=np.float32)
    for c, s in class_succ.items():
        proj[index[s], dim[c]] = _OUT_SCALE
    return emb, proj


def _noise(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) * _NOISE).astype(np.float32)


def _set_norm(spec, rms: bool) -> None:
    spec.gamma = np.ones(_HIDDEN, dtype=np.float32)
    if not rms:
        spec.beta = np.zeros(_HIDDEN, dtype=np.float32)


def _save(spec, path: Path, quantization: str | None) -> Path:
    from ctranslate2.converters import Converter

    class _SpecConverter(Converter):
        def __init__(self, model_spec):
            self._spec = model_spec

        def _load(self):
            return self._spec

    _SpecConverter(spec).convert(str(path), quantization=quantization, force=True)
    return path


def write_tiny_ct2_generator(path: Path, *, quantization: str | None = None) -> Path:
    """Write the tiny decoder-only model (``ctranslate2.Generator``) to ``path``.

    Llama-like layout (pre-norm, RMSNorm, SwiGLU FFN, rotary attention,
    2 layers, 4 heads, hidden 64), ~0.33 MB in float32 (written in ~0.1 s).  ``path`` is created
    (or replaced).  Returns ``path``.
    """
    from ctranslate2.specs import common_spec, transformer_spec

    path = Path(path)
    vocab = vocabulary()
    emb, proj = _class_tables(vocab)
    rng = np.random.default_rng(_SEED)

    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        _LAYERS,
        _HEADS,
        pre_norm=True,
        activation=common_spec.Activation.SWISH,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=0,
        rotary_interleave=False,
    )
    dec = spec.decoder
    dec.scale_embeddings = False
    dec.embeddings.weight = emb
    _set_norm(dec.layer_norm, rms=True)
    dec.projection.weight = proj
    for layer in dec.layer:
        _set_norm(layer.self_attention.layer_norm, rms=True)
        layer.self_attention.linear[0].weight = _noise(rng, 3 * _HIDDEN, _HIDDEN)
        layer.self_attention.linear[1].weight = _noise(rng, _HIDDEN, _HIDDEN)
        _set_norm(layer.ffn.layer_norm, rms=True)
        layer.ffn.linear_0.weight = _noise(rng, _FFN, _HIDDEN)
        layer.ffn.linear_0_noact.weight = _noise(rng, _FFN, _HIDDEN)
        layer.ffn.linear_1.weight = _noise(rng, _HIDDEN, _FFN)

    spec.register_vocabulary(vocab)
    spec.config.bos_token = BOS
    spec.config.eos_token = EOS
    spec.config.unk_token = UNK
    spec.config.layer_norm_epsilon = 1e-5
    _save(spec, path, quantization)
    _write_tokenizer(path, vocab)
    return path


def write_tiny_ct2_translator(path: Path, *, quantization: str | None = None) -> Path:
    """Write the tiny encoder-decoder model (``ctranslate2.Translator``) to ``path``.

    Standard pre-norm Transformer (LayerNorm, ReLU, sinusoidal positions,
    1+1 layers, 4 heads, hidden 64), shared source/target vocabulary with the
    language tokens of :data:`LANG_TOKENS`.  Output: see the module docstring
    and :func:`expected_translation`.  Returns ``path``.
    """
    from ctranslate2.specs import transformer_spec

    path = Path(path)
    vocab = vocabulary(LANG_TOKENS)
    emb, proj = _class_tables(vocab, translator=True)
    rng = np.random.default_rng(_SEED + 1)

    spec = transformer_spec.TransformerSpec.from_config((1, 1), _HEADS, pre_norm=True)
    enc, dec = spec.encoder, spec.decoder

    def attention(att, n_linear: int) -> None:
        _set_norm(att.layer_norm, rms=False)
        if n_linear == 2:  # self-attention: fused qkv, output
            shapes = [(3 * _HIDDEN, _HIDDEN), (_HIDDEN, _HIDDEN)]
        else:  # encoder-decoder attention: q, fused kv, output
            shapes = [(_HIDDEN, _HIDDEN), (2 * _HIDDEN, _HIDDEN), (_HIDDEN, _HIDDEN)]
        for lin, shape in zip(att.linear, shapes, strict=True):
            lin.weight = _noise(rng, *shape)
            lin.bias = np.zeros(shape[0], dtype=np.float32)

    def ffn(f) -> None:
        _set_norm(f.layer_norm, rms=False)
        f.linear_0.weight = _noise(rng, _FFN, _HIDDEN)
        f.linear_0.bias = np.zeros(_FFN, dtype=np.float32)
        f.linear_1.weight = _noise(rng, _HIDDEN, _FFN)
        f.linear_1.bias = np.zeros(_HIDDEN, dtype=np.float32)

    # scale_embeddings stays True (x sqrt(64) = 8): the class one-hot (4 * 8 = 32)
    # dwarfs the sinusoidal position encodings (|pe| <= 1).
    enc.embeddings[0].weight = emb.copy()
    _set_norm(enc.layer_norm, rms=False)
    for layer in enc.layer:
        attention(layer.self_attention, 2)
        ffn(layer.ffn)

    dec.embeddings.weight = emb
    _set_norm(dec.layer_norm, rms=False)
    dec.projection.weight = proj
    dec.projection.bias = np.zeros(len(vocab), dtype=np.float32)
    for layer in dec.layer:
        attention(layer.self_attention, 2)
        attention(layer.attention, 3)
        ffn(layer.ffn)

    spec.register_source_vocabulary(vocab)
    spec.register_target_vocabulary(vocab)
    spec.config.bos_token = BOS
    spec.config.eos_token = EOS
    spec.config.unk_token = UNK
    spec.config.decoder_start_token = BOS
    spec.config.layer_norm_epsilon = 1e-5
    _save(spec, path, quantization)
    _write_tokenizer(path, vocab, extra_special=LANG_TOKENS)
    return path


__all__ = [
    "BOS",
    "EOS",
    "UNK",
    "IM_START",
    "IM_END",
    "SPECIAL_TOKENS",
    "LANG_TOKENS",
    "LANG_FIRST",
    "CHATML_TEMPLATE",
    "NEWLINE_TOKEN",
    "SPACE_TOKEN",
    "vocabulary",
    "successor",
    "expected_tokens",
    "expected_continuation",
    "expected_translation",
    "write_tiny_ct2_generator",
    "write_tiny_ct2_translator",
]
