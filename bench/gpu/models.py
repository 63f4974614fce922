"""The GPU run's models, written on the spot: models cannot travel (SmolLM2 alone is 98 MB).

Run: ``python -m bench.gpu.models {tiny,gguf,hf} OUT [shape flags]``.  Nothing here is downloaded.

* ``tiny``: the tiny deterministic GGUF of the exact-output tests (``tests/models/tiny_gguf.py``).
* ``gguf``: a random-weight Llama GGUF of a realistic shape, for speed only.  The default shape is
  Llama-3.2-1B's (2048 wide, 16 layers, 32 query and 8 KV heads, FFN 8192, 128,256 tokens, tied
  embeddings: 1.24 B parameters), in Q8_0 (1.3 GB) or F16 (2.5 GB).  The weights are a random
  block repeated, which costs no time to make and the same to run as any other; the tokenizer
  is byte-level (one token per byte, then filler tokens up to the vocabulary size), so any text
  tokenizes.  Only the printable-ASCII byte tokens have non-zero (tied) embedding rows: every
  other logit is 0, below the best of 95 random ones, so greedy runs never stop early at EOS and
  emit only text that tokenizes back to the same count (llama-cpp-python's ``usage`` counts
  tokens by re-tokenizing the text: a filler token ``t123`` would count as 4).  The output
  projection still multiplies the whole vocabulary, as a real model's does.
* ``hf``: a small random-weight Hugging Face Llama checkpoint (config.json, fp16 safetensors,
  a byte-level BPE ``tokenizer.json`` with ChatML tokens), for exllamav3's own converter.

The shape flags exist so the CPU test can write each kind at a tiny shape in well under a second.
This module imports numpy and gguf only (never torch; safetensors are written by hand): the same
code runs here and in CI.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Repeated to fill every tensor: big enough that no two rows of a layer look alike to a cache.
POOL_BLOCKS = 1 << 16
QK8_0 = 32  # values per Q8_0 block: an fp16 scale then 32 int8
WEIGHT_STD = 0.02


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what byte-level BPE vocabularies hold)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def byte_vocab(n_vocab: int) -> list[str]:
    """256 byte tokens, the specials, then fillers ``t<N>`` (printable ASCII, never produced by the
    tokenizer: there is no merge to build them) up to ``n_vocab``."""
    if n_vocab < 256 + len(SPECIALS):
        raise ValueError(f"n_vocab must be at least {256 + len(SPECIALS)}")
    b2u = _bytes_to_unicode()
    texts = [b2u[b] for b in range(256)] + SPECIALS
    return texts + [f"t{i}" for i in range(n_vocab - len(texts))]


# ------------------------------------------------------------------------------------- GGUF
def write_tiny(path: Path) -> Path:
    """The exact-output tests' model (tests/models/tiny_gguf.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from models.tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(path)


def write_random_llama_gguf(
    path: Path,
    *,
    n_embd: int = 2048,
    n_layer: int = 16,
    n_head: int = 32,
    n_head_kv: int = 8,
    n_ff: int = 8192,
    n_vocab: int = 128256,
    n_ctx_train: int = 8192,
    qtype: str = "q8_0",
    seed: int = 0,
) -> Path:
    """A random-weight Llama GGUF (see the module docstring); returns ``path``."""
    import gguf

    if qtype not in ("q8_0", "f16"):
        raise ValueError("qtype must be q8_0 or f16")
    if n_embd % n_head or n_embd % QK8_0 or n_ff % QK8_0:
        raise ValueError("n_embd must divide by n_head, and n_embd and n_ff by 32")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head_dim = n_embd // n_head
    special_ids = [256 + i for i in range(len(SPECIALS))]
    silent_rows = [i for i in range(n_vocab) if not 0x20 <= i <= 0x7E]  # see the module docstring

    if qtype == "q8_0":
        # One pool of Q8_0 blocks: 2 bytes of fp16 scale, 32 int8 of std ≈ 73, so weights ≈ N(0, 0.02).
        scale = np.float16(WEIGHT_STD / 73.3).tobytes()
        pool = np.empty((POOL_BLOCKS, 2 + QK8_0), dtype=np.uint8)
        pool[:, :2] = np.frombuffer(scale, dtype=np.uint8)
        pool[:, 2:] = rng.integers(-127, 128, size=(POOL_BLOCKS, QK8_0), dtype=np.int8).view(np.uint8)
        ftype, raw = gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0

        def weight(rows: int, cols: int, zero_rows: list[int] | None = None) -> np.ndarray:
            blocks = np.resize(pool, (rows * (cols // QK8_0), 2 + QK8_0)).reshape(rows, -1)
            if zero_rows:
                blocks[zero_rows] = 0
            return blocks
    else:
        pool16 = (rng.standard_normal(POOL_BLOCKS * QK8_0) * WEIGHT_STD).astype(np.float16)
        ftype, raw = gguf.LlamaFileType.MOSTLY_F16, None

        def weight(rows: int, cols: int, zero_rows: list[int] | None = None) -> np.ndarray:
            w = np.resize(pool16, (rows, cols))
            if zero_rows:
                w[zero_rows] = 0
            return w

    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"llm-pool random llama {n_layer}x{n_embd} {qtype}")
    w.add_file_type(ftype)
    w.add_vocab_size(n_vocab)
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(byte_vocab(n_vocab))
    types = [gguf.TokenType.NORMAL] * n_vocab
    for i in special_ids:
        types[i] = gguf.TokenType.CONTROL
    w.add_token_types(types)
    # llama.cpp refuses a gpt2 vocabulary without merges; this one can never fire ("ab" and "cd"
    # are not tokens, see tests/models/tiny_gguf.py).
    w.add_token_merges(["ab cd"])
    w.add_bos_token_id(special_ids[0])
    w.add_eos_token_id(special_ids[0])
    w.add_eot_token_id(special_ids[2])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
    )

    def add(name: str, rows: int, cols: int, zero_rows: list[int] | None = None) -> None:
        data = weight(rows, cols, zero_rows)
        if raw is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=raw)  # the byte shape gives the logical one

    add("token_embd.weight", n_vocab, n_embd, silent_rows)  # tied: also the output projection
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    kv_dim = n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add(p + "attn_q.weight", n_embd, n_embd)
        add(p + "attn_k.weight", kv_dim, n_embd)
        add(p + "attn_v.weight", kv_dim, n_embd)
        add(p + "attn_output.weight", n_embd, n_embd)
        w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        add(p + "ffn_gate.weight", n_ff, n_embd)
        add(p + "ffn_up.weight", n_ff, n_embd)
        add(p + "ffn_down.weight", n_embd, n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------- Hugging Face
def hf_tokenizer_json(n_vocab: int) -> dict[str, object]:
    """A byte-level BPE tokenizer.json: every byte is a token, no merges, ChatML specials."""
    vocab = byte_vocab(n_vocab)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": 256 + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(vocab)}, "merges": [],
        },
    }


def write_random_hf_llama(
    folder: Path,
    *,
    hidden: int = 512,
    layers: int = 4,
    heads: int = 8,
    kv_heads: int = 4,
    intermediate: int = 1536,
    vocab: int = 1024,
    seed: int = 0,
) -> Path:
    """A random fp16 Hugging Face Llama checkpoint in ``folder`` (exllamav3's converter input)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    eos = [256, 258]  # <|endoftext|>, <|im_end|>
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_hidden_layers": layers,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "vocab_size": vocab,
        "bos_token_id": 256,
        "eos_token_id": eos,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 256, "eos_token_id": eos}))
    (folder / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(vocab)))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "model_max_length": 8192, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": (
            "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
        ),
    }, indent=2))

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * WEIGHT_STD).astype(np.float16)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": np.ones(hidden, np.float16)}
    head = rand(vocab, hidden)
    head[256:259] = 0  # the specials' logits stay 0: greedy runs never stop early (module docstring)
    tensors["lm_head.weight"] = head
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": np.ones(hidden, np.float16),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float16),
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(intermediate, hidden),
            p + "mlp.up_proj.weight": rand(intermediate, hidden),
            p + "mlp.down_proj.weight": rand(hidden, intermediate),
        }
    write_safetensors(folder / "model.safetensors", tensors)
    return folder


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """The safetensors format by hand (8-byte header length, JSON header, raw little-endian data),
    so the generator needs no safetensors package where our lock has none (CI)."""
    dtypes = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with Path(path).open("wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t).astype(t.dtype.newbyteorder("<")).tobytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["tiny", "gguf", "hf"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--qtype", default="q8_0", choices=["q8_0", "f16"], help="gguf only")
    parser.add_argument("--n-embd", type=int)
    parser.add_argument("--n-layer", type=int)
    parser.add_argument("--n-head", type=int)
    parser.add_argument("--n-head-kv", type=int)
    parser.add_argument("--n-ff", type=int)
    parser.add_argument("--n-vocab", type=int)
    args = parser.parse_args()
    if args.kind == "tiny":
        print(write_tiny(args.out))
        return
    names = {"n_embd": "hidden", "n_layer": "layers", "n_head": "heads", "n_head_kv": "kv_heads",
             "n_ff": "intermediate", "n_vocab": "vocab"}
    shape = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if args.kind == "gguf":
        print(write_random_llama_gguf(args.out, qtype=args.qtype, **shape))
    else:
        print(write_random_hf_llama(args.out, **{names[k]: v for k, v in shape.items()}))


if __name__ == "__main__":
    main()
