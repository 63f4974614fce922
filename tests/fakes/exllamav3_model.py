"""
Test helpers for the CPU fake of exllamav3 (tests/fakes/exllamav3/, see its NOTES.md).

- write_fake_exl3_model(path) writes a tiny EXL3-looking model directory the fake can load.
- installed_fake_exllamav3() puts the fake into sys.modules as `exllamav3` (with all submodules) and removes it
  afterwards, restoring whatever `exllamav3*` modules were there before.
- fake_exllamav3 / fake_exl3_model_dir are pytest fixtures built on those (import them into a test module or
  conftest.py to use them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

FAKE_PACKAGE_DIR = Path(__file__).resolve().parent / "exllamav3"
MARKER_FILENAME = "fake_exllamav3.json"

# Character-level vocabulary: special tokens first, then newline, tab and printable ASCII
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
UNK_ID, BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(5)
CHARS = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
VOCAB = SPECIAL_TOKENS + CHARS

# ChatML template; enable_thinking=False adds an empty think block like Qwen3's template
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


def _tokenizer_json() -> dict:
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {p: i for i, p in enumerate(VOCAB)}, "unk_token": "<unk>"},
    }


def write_fake_exl3_model(
    path: str | Path,
    *,
    architecture: str = "LlamaForCausalLM",
    max_position_embeddings: int = 4096,
    num_hidden_layers: int = 2,
    bits: float = 4.0,
) -> Path:
    """
    Write a fake EXL3 model directory: config.json (with an exl3 quantization_config, like the real converter
    writes), quantization_config.json, tokenizer.json (a real HF WordLevel char tokenizer), tokenizer_config.json
    (with a ChatML chat_template), generation_config.json, an empty-but-valid model.safetensors and the
    fake_exllamav3.json marker the fake requires. Returns the directory path.
    """
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    qcfg = {
        "quant_method": "exl3",
        "version": "1.6.5",
        "bits": bits,
        "head_bits": 6,
        "calibration": {"rows": 250, "cols": 2048},
        "out_scales": "auto",
    }
    config = {
        "architectures": [architecture],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_hidden_layers": num_hidden_layers,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": max_position_embeddings,
        "vocab_size": len(VOCAB),
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, IM_END_ID],
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "quantization_config": qcfg,
    }
    (d / "config.json").write_text(json.dumps(config, indent=4))
    (d / "quantization_config.json").write_text(json.dumps({**qcfg, "tensor_storage": {}}, indent=4))
    (d / "tokenizer.json").write_text(json.dumps(_tokenizer_json(), indent=2))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "model_max_length": max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }, indent=2))
    (d / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, IM_END_ID], "do_sample": True, "temperature": 0.7},
        indent=2,
    ))
    header = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    header += b" " * (-len(header) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    (d / MARKER_FILENAME).write_text(json.dumps({
        "fake_exllamav3": True,
        "format": 1,
        "rule": "next token = successor of the last token: a..z cycle, 0..8 -> next digit, 9 -> EOS, else 'a'",
    }, indent=2))
    return d


def _is_exllamav3_module(name: str) -> bool:
    return name == "exllamav3" or name.startswith("exllamav3.")


@contextlib.contextmanager
def installed_fake_exllamav3() -> Iterator[ModuleType]:
    """
    Install the fake as `exllamav3` in sys.modules for the duration of the block (`import exllamav3`,
    `from exllamav3.generator.sampler import ComboSampler`, ... all resolve to the fake) and yield the package.
    On exit every `exllamav3*` entry is removed and any previously imported modules of that name are restored.
    Objects created inside the block keep working after it; only new imports are affected.
    """
    saved = {k: v for k, v in sys.modules.items() if _is_exllamav3_module(k)}
    for k in saved:
        del sys.modules[k]
    spec = importlib.util.spec_from_file_location(
        "exllamav3", FAKE_PACKAGE_DIR / "__init__.py", submodule_search_locations=[str(FAKE_PACKAGE_DIR)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["exllamav3"] = module
    try:
        spec.loader.exec_module(module)
        for sub in ("version", "constants", "generator.loop_detect", "generator.pagetable"):
            importlib.import_module(f"exllamav3.{sub}")
        yield module
    finally:
        for k in [k for k in sys.modules if _is_exllamav3_module(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


try:
    import pytest
except ImportError:  # pragma: no cover - helpers stay usable without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def fake_exllamav3() -> Iterator[ModuleType]:
        with installed_fake_exllamav3() as mod:
            yield mod

    @pytest.fixture
    def fake_exl3_model_dir(tmp_path: Any) -> Path:
        return write_fake_exl3_model(tmp_path / "fake-exl3-model")
