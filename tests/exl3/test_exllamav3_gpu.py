"""The ExLlamaV3 backend on the REAL exllamav3 library and a CUDA GPU (marker ``gpu``).

Skipped, with the reason, where torch, CUDA or exllamav3 is missing.  Nothing is downloaded: the
model is written on the spot.  exllamav3 loads unquantized Hugging Face weights as they are
(``modules/linear.py``: ``Linear.load`` tries EXL3 tensors, then fp16 ``.weight``), so no
conversion is needed.

The model is a 2-layer Llama whose weights make it compute the same successor rule as the CPU
fake, with a wide margin: token embeddings are one-hot (``hidden_size`` ≥ vocabulary), every
attention and MLP output projection is zero (the residual stream stays the embedding), the final
RMSNorm scales the one-hot to ≈11.3, and ``lm_head`` maps dimension *t* to token successor(*t*).
So greedy outputs are exact — ``"x"`` → ``"yzabc"`` — on the GPU as on the CPU fake, and the
tokenizer is the fake model's real Hugging Face ``tokenizer.json``.

The first ``import exllamav3`` JIT-compiles its CUDA extension (minutes on a fresh machine); it
happens in a module fixture, outside the tests' time limits.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import support.runtime
import trio
from fakes.exllamav3_model import EOS_ID, VOCAB, write_fake_exl3_model
from support.runtime import result, submit

from llm_pool.config import decode_settings
from llm_pool.pool.jobs import GenerationRequest
from llm_pool.pool.manager import PoolManager

pytestmark = pytest.mark.gpu

LIMIT_S = 300
HIDDEN = 128  # >= len(VOCAB): one-hot embeddings
VOCAB_SIZE = 128
RAW_TEMPLATE = (
    "{% set ns = namespace(last='') %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = m['content'] %}{% endif %}{% endfor %}"
    "{{ ns.last }}"
)


@pytest.fixture(scope="module")
def real_exllamav3() -> ModuleType:
    try:
        import torch
    except Exception as e:
        pytest.skip(f"needs a CUDA GPU and torch: {type(e).__name__}: {e}")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU and torch: torch.cuda.is_available() is False")
    spec = importlib.util.find_spec("exllamav3")
    if spec is None or spec.origin is None:  # a bare namespace package is not the library
        pytest.skip("needs a CUDA GPU and torch: exllamav3 is not installed")
    try:
        import exllamav3
    except Exception as e:
        pytest.skip(f"needs a CUDA GPU and torch: exllamav3 does not import: {type(e).__name__}: {e}")
    return exllamav3


def successor(token: int) -> int:
    """The CPU fake's rule: a→b…z→a, 0→…→9, 9→EOS, anything else → a."""
    piece = VOCAB[token]
    if len(piece) == 1 and "a" <= piece <= "z":
        return VOCAB.index(chr((ord(piece) - ord("a") + 1) % 26 + ord("a")))
    if len(piece) == 1 and "0" <= piece <= "8":
        return VOCAB.index(str(int(piece) + 1))
    if piece == "9":
        return EOS_ID
    return VOCAB.index("a")


def write_successor_llama(folder: Path) -> Path:
    """An unquantized fp16 Llama checkpoint computing :func:`successor`; see the module docstring."""
    import torch
    from safetensors.torch import save_file

    write_fake_exl3_model(folder)  # tokenizer.json, tokenizer_config.json, generation_config.json
    for name in ("fake_exllamav3.json", "quantization_config.json", "model.safetensors"):
        (folder / name).unlink()
    heads, head_dim, inter = 2, 64, 256
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": head_dim,
        "num_hidden_layers": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": 1,
        "eos_token_id": [EOS_ID, VOCAB.index("<|im_end|>")],
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["chat_template"] = RAW_TEMPLATE
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2))

    f16 = torch.float16
    tensors: dict[str, Any] = {"model.embed_tokens.weight": torch.eye(VOCAB_SIZE, HIDDEN, dtype=f16)}
    for i in range(2):
        p = f"model.layers.{i}"
        tensors |= {
            f"{p}.input_layernorm.weight": torch.ones(HIDDEN, dtype=f16),
            f"{p}.self_attn.q_proj.weight": torch.zeros(heads * head_dim, HIDDEN, dtype=f16),
            f"{p}.self_attn.k_proj.weight": torch.zeros(heads * head_dim, HIDDEN, dtype=f16),
            f"{p}.self_attn.v_proj.weight": torch.zeros(heads * head_dim, HIDDEN, dtype=f16),
            f"{p}.self_attn.o_proj.weight": torch.zeros(HIDDEN, heads * head_dim, dtype=f16),
            f"{p}.post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=f16),
            f"{p}.mlp.gate_proj.weight": torch.zeros(inter, HIDDEN, dtype=f16),
            f"{p}.mlp.up_proj.weight": torch.zeros(inter, HIDDEN, dtype=f16),
            f"{p}.mlp.down_proj.weight": torch.zeros(HIDDEN, inter, dtype=f16),
        }
    head = torch.zeros(VOCAB_SIZE, HIDDEN, dtype=f16)
    for t in range(len(VOCAB)):
        head[successor(t), t] = 1.0
    tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=f16)
    tensors["lm_head.weight"] = head
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def model_dir(real_exllamav3: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_successor_llama(tmp_path_factory.mktemp("exl3-gpu") / "successor-llama")


def request(text: str, **decoding: Any) -> GenerationRequest:
    return support.runtime.request(text, "m", **decoding)


def expected(last: str, n: int) -> str:
    out, token = "", VOCAB.index(last)
    for _ in range(n):
        token = successor(token)
        if token == EOS_ID:
            break
        out += VOCAB[token]
    return out


@pytest.fixture
async def manager(model_dir: Path) -> AsyncIterator[PoolManager]:
    settings = decode_settings(
        {
            "engine": {
                "models": {
                    "m": {
                        "model_path": str(model_dir),
                        "backend": "exllamav3",
                        "prompt_format": "native",
                        "target_inflight": 8,
                        "exllama_cache_size": 8192,
                    }
                }
            }
        },
        source="test",
    )
    manager = PoolManager(settings)
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(manager.run, autoload=False))
        yield manager
        nursery.cancel_scope.cancel()


async def test_real_exllamav3_exact_outputs_and_stops(manager: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        await manager.load("m")
        deltas, done = await result(submit(manager, request("x")))
        assert (done.text, deltas, done.stats.finish_reason) == ("yzabc", list("yzabc"), "length")
        assert (done.stats.prompt_tokens, done.stats.output_tokens) == (1, 5)
        _, done = await result(submit(manager, request("7", max_tokens=50)))
        assert (done.text, done.stats.finish_reason, done.stats.output_tokens) == ("89", "stop", 2)
        _, done = await result(submit(manager, request("x", max_tokens=20, stop=["bc"])))
        assert (done.text, done.stats.finish_reason) == ("yza", "stop")


async def test_real_exllamav3_quantized_cache(manager: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        await manager.load("m", override={"exllama_cache_quant": "8,4"})
        _, done = await result(submit(manager, request("k", max_tokens=40)))
        assert done.text == expected("k", 40)


async def test_real_exllamav3_batches_and_tokens_per_second(
    manager: PoolManager, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    n_tokens = 256
    rates: dict[int, float] = {}
    with trio.fail_after(LIMIT_S):
        await manager.load("m")
        await result(submit(manager, request("x", max_tokens=16)))  # warm the kernels
        for concurrency in (1, 8):
            letters = "abcdefgh"[:concurrency]
            t0 = time.perf_counter()
            jobs = [submit(manager, request(c, max_tokens=n_tokens)) for c in letters]
            results = [await result(job) for job in jobs]
            wall = time.perf_counter() - t0
            for c, (_, done) in zip(letters, results, strict=True):
                assert done.text == expected(c, n_tokens)
                assert done.stats.output_tokens == n_tokens
            rates[concurrency] = concurrency * n_tokens / wall
    record_property("tokens_per_s", rates)
    with capsys.disabled():
        print(f"\nexllamav3 tokens/s (all jobs together): concurrency 1: {rates[1]:.1f}, concurrency 8: {rates[8]:.1f}")
    assert rates[8] > rates[1]  # eight jobs share each forward pass
