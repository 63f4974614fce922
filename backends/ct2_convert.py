"""Convert a llama-family GGUF file into a CTranslate2 model folder, with numpy only.

No torch and no ``transformers``: the GGUF tensors are read with :class:`gguf.GGUFReader`,
dequantized with :func:`gguf.quants.dequantize`, and written through ``ctranslate2.specs``.
The output folder holds what a CTranslate2 backend needs to serve it:

* ``model.bin``, ``config.json``, ``vocabulary.json`` (CTranslate2 ``Generator`` model),
* ``tokenizer.json`` (built from ``tokenizer.ggml.tokens``/``merges`` with ``tokenizers``;
  token strings are the byte-level BPE strings of the GGUF, identical to ``vocabulary.json``),
* ``tokenizer_config.json`` (``chat_template``, ``bos_token``, ``eos_token``, ...),
* ``special_tokens_map.json`` and ``generation_config.json`` (``eos_token_id``).

Layout notes (``general.architecture == "llama"``): llama.cpp's converter permutes the Q and K
projections of Llama models into the interleaved rotary layout (GGML "NORM" rope), so they are
used as stored with ``rotary_interleave=True``.  A missing ``output.weight`` means the output
projection is tied to the token embeddings (CTranslate2 aliases the two, stored once).

``ctranslate2``, ``gguf`` and ``tokenizers`` are imported inside the functions only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: ``progress(stage, done, total)``: ``read`` (0/1, 1/1), ``layers`` (each layer dequantized, of
#: all), ``write`` (0/1 before CTranslate2 quantizes and writes, 1/1 after the tokenizer files).
Progress = Callable[[str, int, int], None]

log = logging.getLogger("llm_pool.ct2_convert")

#: Architectures whose GGUF Q/K weights are stored in the interleaved rotary layout.
SUPPORTED_ARCHITECTURES = ("llama",)

# Pre-tokenizer regexes used by llama.cpp for some ``tokenizer.ggml.pre`` values.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2 regex preceded by splitting every digit (StarCoder family, SmolLM, ...).
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2_PRE = {"default", "gpt-2", "gpt2", "olmo", "jais", "poro-chat", "viking"}
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan"}


class GGUFConversionError(ValueError):
    """The GGUF file cannot be converted by this module."""


# ---------------------------------------------------------------------------
# GGUF metadata helpers


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception:  # pragma: no cover - unusual field layout
        return default


def _token_strings(reader: Any) -> list[str]:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise GGUFConversionError("GGUF file has no tokenizer.ggml.tokens")
    return list(tokens)


def _tensors(reader: Any) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


def _load(tensors: dict[str, Any], name: str):
    """Dequantized float32 array in PyTorch layout ([out, in] for matrices)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    t = tensors[name]
    if t.tensor_type == GGMLQuantizationType.F32:
        arr = np.asarray(t.data, dtype=np.float32)
    elif t.tensor_type == GGMLQuantizationType.F16:
        arr = np.asarray(t.data).astype(np.float32)
    else:
        arr = dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)


# ---------------------------------------------------------------------------
# tokenizer


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _LLAMA3_PRE or pre in _QWEN2_PRE:
        pattern = _LLAMA3_PATTERN if pre in _LLAMA3_PRE else _QWEN2_PATTERN
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_PRE and pre is not None:
        log.warning("unknown tokenizer.ggml.pre %r: using the GPT-2 pre-tokenizer", pre)
    return byte_level


def build_tokenizer(reader: Any):
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's gpt2-style BPE tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(
            f"tokenizer.ggml.model {model!r} is not supported (only gpt2-style byte-level BPE)"
        )
    tokens = _token_strings(reader)
    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")

    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None and unk_id < len(tokens) else None,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()

    # control tokens (3) are special; user-defined ones (4) are matched verbatim as well
    added = []
    for tok, kind in zip(tokens, types, strict=False):
        if kind == 3:
            added.append(AddedToken(tok, special=True, normalized=False))
        elif kind == 4:
            added.append(AddedToken(tok, special=False, normalized=False))
    if added:
        tokenizer.add_tokens(added)

    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _special(reader: Any, tokens: list[str], key: str) -> str | None:
    idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
    if idx is None or not 0 <= int(idx) < len(tokens):
        return None
    return tokens[int(idx)]


def _write_tokenizer_files(reader: Any, out_dir: Path, tokens: list[str]) -> dict[str, Any]:
    tokenizer = build_tokenizer(reader)
    tokenizer.save(str(out_dir / "tokenizer.json"))

    bos = _special(reader, tokens, "bos")
    eos = _special(reader, tokens, "eos")
    eot = _special(reader, tokens, "eot")
    unk = _special(reader, tokens, "unknown")
    pad = _special(reader, tokens, "padding")
    types = _field(reader, "tokenizer.ggml.token_type") or []
    control = [t for t, k in zip(tokens, types, strict=False) if k == 3]
    cfg: dict[str, Any] = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, f"{_field(reader, 'general.architecture')}.context_length", 2048)),
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": [t for t in control if t not in (bos, eos, unk, pad)],
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    special_map = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg[k]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    eos_ids = [tokens.index(t) for t in dict.fromkeys(x for x in (eos, eot) if x)]
    gen_cfg = {
        "bos_token_id": tokens.index(bos) if bos else None,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n", encoding="utf-8")
    return cfg


# ---------------------------------------------------------------------------
# model


def _build_spec(reader: Any, tokens: list[str], progress: Progress | None = None):
    import numpy as np
    from ctranslate2.specs import attention_spec, common_spec, transformer_spec

    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFConversionError(f"GGUF architecture {arch!r} is not supported: {SUPPORTED_ARCHITECTURES}")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    n_layers = int(meta("block_count"))
    hidden = int(meta("embedding_length"))
    n_heads = int(meta("attention.head_count"))
    n_heads_kv = int(meta("attention.head_count_kv", n_heads))
    head_dim = int(meta("attention.key_length", hidden // n_heads))
    rope_dim = int(meta("rope.dimension_count", head_dim))
    rope_base = float(meta("rope.freq_base", 10000.0))
    eps = float(meta("attention.layer_norm_rms_epsilon", 1e-5))

    tensors = _tensors(reader)
    if "rope_freqs.weight" in tensors:
        raise GGUFConversionError("GGUF files with rope_freqs (Llama 3.1 RoPE scaling) are not supported")
    scaling_type = meta("rope.scaling.type")
    rotary_scaling_type = None
    rotary_scaling_factor = 1.0
    if scaling_type == "linear":
        rotary_scaling_type = attention_spec.RotaryScalingType.Linear
        rotary_scaling_factor = float(meta("rope.scaling.factor", 1.0))
    elif scaling_type not in (None, "none"):
        raise GGUFConversionError(f"RoPE scaling {scaling_type!r} is not supported")

    spec = transformer_spec.TransformerDecoderModelSpec.from_config(
        n_layers,
        n_heads,
        pre_norm=True,
        activation=common_spec.Activation.SWISH,
        ffn_glu=True,
        rms_norm=True,
        rotary_dim=0 if rope_dim == head_dim else rope_dim,
        rotary_interleave=True,
        rotary_scaling_type=rotary_scaling_type,
        rotary_scaling_factor=rotary_scaling_factor,
        rotary_base=rope_base,
        num_heads_kv=None if n_heads_kv == n_heads else n_heads_kv,
        head_dim=None if head_dim * n_heads == hidden else head_dim,
    )
    dec = spec.decoder
    dec.scale_embeddings = False
    embeddings = _load(tensors, "token_embd.weight")
    if embeddings.shape[0] != len(tokens):
        raise GGUFConversionError(
            f"token_embd has {embeddings.shape[0]} rows but the vocabulary has {len(tokens)} tokens"
        )
    dec.embeddings.weight = embeddings
    dec.layer_norm.gamma = _load(tensors, "output_norm.weight")
    # tied output projection: the same array (CT2 stores it once, as an alias)
    dec.projection.weight = _load(tensors, "output.weight") if "output.weight" in tensors else embeddings

    for i, layer in enumerate(dec.layer):
        if progress is not None:
            progress("layers", i, n_layers)
        p = f"blk.{i}."
        att = layer.self_attention
        att.layer_norm.gamma = _load(tensors, p + "attn_norm.weight")
        att.linear[0].weight = np.concatenate(
            [_load(tensors, p + "attn_q.weight"), _load(tensors, p + "attn_k.weight"), _load(tensors, p + "attn_v.weight")]
        )
        biases = [p + f"attn_{x}.bias" for x in "qkv"]
        if all(b in tensors for b in biases):
            att.linear[0].bias = np.concatenate([_load(tensors, b) for b in biases])
        att.linear[1].weight = _load(tensors, p + "attn_output.weight")
        layer.ffn.layer_norm.gamma = _load(tensors, p + "ffn_norm.weight")
        layer.ffn.linear_0.weight = _load(tensors, p + "ffn_gate.weight")
        layer.ffn.linear_0_noact.weight = _load(tensors, p + "ffn_up.weight")
        layer.ffn.linear_1.weight = _load(tensors, p + "ffn_down.weight")
    if progress is not None:
        progress("layers", n_layers, n_layers)

    spec.register_vocabulary(tokens)
    return spec, eps


def convert_gguf_to_ct2(
    gguf_path: Path, out_dir: Path, *, quantization: str = "int8", progress: Progress | None = None
) -> Path:
    """Convert a llama-family GGUF file into a CTranslate2 model folder at ``out_dir``.

    ``quantization`` is the CTranslate2 weight type (``int8``, ``int8_float32``, ``float16``,
    ``float32``, ...).  The folder is written next to ``out_dir`` first and then renamed into
    place, replacing any previous content.  Raises :class:`GGUFConversionError` for files this
    converter does not handle.  Returns ``out_dir``.  ``progress`` (see :data:`Progress`) hears
    of each stage: a 1B model takes minutes, mostly dequantizing layers and quantizing them again.
    """
    from ctranslate2.converters import Converter
    from gguf import GGUFReader

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    report = progress or (lambda stage, done, total: None)
    report("read", 0, 1)
    reader = GGUFReader(str(gguf_path))
    tokens = _token_strings(reader)
    report("read", 1, 1)
    spec, eps = _build_spec(reader, tokens, report)

    tok_names = {key: _special(reader, tokens, key) for key in ("bos", "eos", "unknown")}
    spec.config.bos_token = tok_names["bos"] or tokens[0]
    spec.config.eos_token = tok_names["eos"] or tokens[0]
    spec.config.unk_token = tok_names["unknown"] or ""
    spec.config.layer_norm_epsilon = eps

    class _GGUFConverter(Converter):
        def _load(self):
            return spec

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        report("write", 0, 1)
        _GGUFConverter().convert(str(tmp), quantization=quantization, force=True)
        _write_tokenizer_files(reader, tmp, tokens)
        report("write", 1, 1)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s to %s (%s) in %.1f s", gguf_path.name, out_dir, quantization, time.perf_counter() - t0)
    return out_dir


__all__ = ["GGUFConversionError", "SUPPORTED_ARCHITECTURES", "build_tokenizer", "convert_gguf_to_ct2"]
