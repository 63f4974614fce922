"""The tiny deterministic GGUF model really loads and runs in llama-cpp-python."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from .tiny_gguf import (
    BOS_ID,
    CHATML_TEMPLATE,
    EOS_ID,
    IM_END_ID,
    IM_START_ID,
    N_VOCAB,
    RAW_TEMPLATE,
    expected_continuation,
    successor,
    write_tiny_gguf,
)

# Every test must finish well within this (the whole file takes ~1 s).
TEST_BUDGET_S = 20.0


class _TestTimeout(Exception):
    pass


@pytest.fixture(autouse=True)
def _time_bound() -> Iterator[None]:
    """Bound each test: SIGALRM aborts a runaway Python-level loop (e.g. an
    endless stream), and the elapsed time is asserted afterwards."""

    def _on_alarm(signum, frame):  # pragma: no cover - only on a hang
        raise _TestTimeout(f"test exceeded {TEST_BUDGET_S}s")

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_BUDGET_S)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.perf_counter() - start
    assert elapsed < TEST_BUDGET_S, f"test took {elapsed:.1f}s"


# --------------------------------------------------------------------------- #
# Generator only (no llama_cpp needed)
# --------------------------------------------------------------------------- #


def test_expected_continuation_table() -> None:
    assert expected_continuation("x", 5) == "yzabc"
    assert expected_continuation("5", 10) == "6789"
    assert expected_continuation("9", 3) == ""
    assert expected_continuation("Hello, World!", 3) == "abc"
    assert expected_continuation("ab ", 2) == "ab"
    assert expected_continuation("z", 27) == "abcdefghijklmnopqrstuvwxyza"
    assert expected_continuation("<|im_start|>assistant\n", 3) == "abc"
    assert expected_continuation("hi<|im_end|>", 3) == ""
    assert expected_continuation("", 2) == "ab"  # empty prompt -> BOS -> "a"
    assert expected_continuation("café", 2) == "ab"  # last byte 0xA9 -> "a"


def test_writer_is_small_fast_and_readable(tmp_path) -> None:
    gguf = pytest.importorskip("gguf")
    start = time.perf_counter()
    path = write_tiny_gguf(tmp_path / "m.gguf")
    elapsed = time.perf_counter() - start
    assert path == tmp_path / "m.gguf"
    assert elapsed < 2.0
    assert path.stat().st_size < 2 * 1024 * 1024

    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.merges"].contents()  # must be non-empty
    assert len(fields["tokenizer.ggml.tokens"].data) == N_VOCAB
    assert fields["tokenizer.chat_template"].contents() == RAW_TEMPLATE
    assert fields["tokenizer.ggml.bos_token_id"].contents() == BOS_ID
    assert fields["tokenizer.ggml.eos_token_id"].contents() == EOS_ID

    # deterministic: same bytes every time
    again = write_tiny_gguf(tmp_path / "m2.gguf")
    assert again.read_bytes() == path.read_bytes()


# --------------------------------------------------------------------------- #
# Real llama-cpp-python
# --------------------------------------------------------------------------- #


def _load(path):
    llama_cpp = pytest.importorskip(
        "llama_cpp",
        reason="llama-cpp-python not installed; tiny GGUF runtime tests skipped",
    )
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "raw.gguf")
    model = _load(path)
    yield model
    model.close()


@pytest.fixture(scope="module")
def chatml_llm(tmp_path_factory):
    path = write_tiny_gguf(
        tmp_path_factory.mktemp("tiny") / "chatml.gguf", chat_template=CHATML_TEMPLATE
    )
    model = _load(path)
    yield model
    model.close()


def test_tokenizer(llm) -> None:
    assert llm.n_vocab() == N_VOCAB
    assert llm.token_eos() == EOS_ID
    assert llm.token_bos() == BOS_ID
    assert llm.tokenize(b"x", add_bos=True) == [ord("x")]  # single token, no BOS
    assert llm.tokenize(b"Hello, world 5!") == list(b"Hello, world 5!")
    assert llm.tokenize(b"\n\n") == [10, 10]  # the lone merge never fires
    assert llm.tokenize(b"abcd ab cd") == list(b"abcd ab cd")
    assert llm.tokenize("é".encode()) == list("é".encode())
    assert llm.tokenize(b"<|im_start|>a<|im_end|>", special=True) == [
        IM_START_ID,
        ord("a"),
        IM_END_ID,
    ]
    assert llm.detokenize([ord(c) for c in "abc xyz"]) == b"abc xyz"


def test_greedy_completion(llm) -> None:
    out = llm.create_completion("x", max_tokens=5, temperature=0)
    choice = out["choices"][0]
    assert choice["text"] == "yzabc" == expected_continuation("x", 5)
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 5,
        "total_tokens": 6,
    }


def test_digits_stop_at_eos(llm) -> None:
    out = llm.create_completion("5", max_tokens=10, temperature=0)
    choice = out["choices"][0]
    assert choice["text"] == "6789" == expected_continuation("5", 10)
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 4


def test_other_tokens_go_to_a(llm) -> None:
    for prompt in ("Hello!", "abc ", "Z", "<|im_start|>", "\n"):
        out = llm.create_completion(prompt, max_tokens=4, temperature=0)
        assert (
            out["choices"][0]["text"] == "abcd" == expected_continuation(prompt, 4)
        ), prompt


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0, "top_k": 40},
        {"temperature": 1.0, "top_k": 40, "seed": 7},
        {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
        {"temperature": 0.7, "top_p": 0.9, "repeat_penalty": 1.3},
    ],
)
def test_sampling_is_still_deterministic(llm, sampling) -> None:
    for seed in range(3):
        kwargs = {"seed": seed, **sampling}
        out = llm.create_completion("x", max_tokens=5, **kwargs)
        assert out["choices"][0]["text"] == "yzabc", kwargs
        out = llm.create_completion("5", max_tokens=10, **kwargs)
        assert out["choices"][0]["text"] == "6789", kwargs
        assert out["choices"][0]["finish_reason"] == "stop"


def test_streaming_one_char_per_token(llm) -> None:
    chunks = list(llm.create_completion("x", max_tokens=5, temperature=0, stream=True))
    texts = [c["choices"][0]["text"] for c in chunks]
    assert [t for t in texts if t] == ["y", "z", "a", "b", "c"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    chunks = list(llm.create_completion("5", max_tokens=10, temperature=0, stream=True))
    texts = [c["choices"][0]["text"] for c in chunks]
    assert [t for t in texts if t] == ["6", "7", "8", "9"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_every_token_logits_margin(tmp_path) -> None:
    """Decode the whole vocab (shuffled, one batch, so attention mixes 260
    different tokens): at every position the successor's logit dominates."""
    import numpy as np

    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python not installed"
    )
    path = write_tiny_gguf(tmp_path / "m.gguf")
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=512,
        n_batch=512,
        n_threads=1,
        logits_all=True,
        verbose=False,
    )
    try:
        tokens = [int(t) for t in np.random.default_rng(0).permutation(N_VOCAB)]
        llm.eval(tokens)
        logits = np.asarray(llm.scores[: len(tokens)])
        for pos, tok in enumerate(tokens):
            row = logits[pos]
            order = row.argsort()
            assert int(order[-1]) == successor(tok), (pos, tok)
            assert row[order[-1]] - row[order[-2]] > 50.0, (pos, tok)
    finally:
        llm.close()


def test_chat_completion_raw_template(llm) -> None:
    out = llm.create_chat_completion(
        messages=[
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ignored"},
            {"role": "user", "content": "x"},
        ],
        max_tokens=3,
    )
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "yza"
    assert choice["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == 1

    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": "7"}], max_tokens=9
    )
    assert out["choices"][0]["message"]["content"] == "89"
    assert out["choices"][0]["finish_reason"] == "stop"


def test_chat_completion_streaming(llm) -> None:
    chunks = list(
        llm.create_chat_completion(
            messages=[{"role": "user", "content": "x"}], max_tokens=3, stream=True
        )
    )
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert [p for p in pieces if p] == ["y", "z", "a"]


def test_chat_completion_chatml_template(chatml_llm) -> None:
    out = chatml_llm.create_chat_completion(
        messages=[{"role": "user", "content": "x"}], max_tokens=3
    )
    # the prompt ends with "<|im_start|>assistant\n"; "\n" -> "a"
    assert out["choices"][0]["message"]["content"] == "abc"
    assert out["choices"][0]["message"]["content"] == expected_continuation(
        "<|im_start|>assistant\n", 3
    )
