"""The tiny in-code CTranslate2 models behave exactly as documented.

Also pins down the CTranslate2 behaviours a serving backend relies on
(streaming end, end tokens, batching semantics).

Note: a ``ctranslate2.Generator`` that has run a Python ``callback`` (which
``generate_tokens`` always does) and is still alive at interpreter exit makes
the process abort ("terminate called without an active exception").  The
fixtures below therefore drop every model explicitly at teardown.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import pytest

ctranslate2 = pytest.importorskip("ctranslate2")
tokenizers = pytest.importorskip("tokenizers")

from .tiny_ct2 import (  # noqa: E402
    BOS,
    EOS,
    IM_END,
    IM_START,
    LANG_TOKENS,
    NEWLINE_TOKEN,
    SPACE_TOKEN,
    expected_continuation,
    expected_tokens,
    expected_translation,
    successor,
    vocabulary,
    write_tiny_ct2_generator,
    write_tiny_ct2_translator,
)

CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nSay something<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory) -> Path:
    t0 = time.perf_counter()
    path = write_tiny_ct2_generator(tmp_path_factory.mktemp("tiny") / "gen")
    assert time.perf_counter() - t0 < 5.0
    return path


@pytest.fixture(scope="module")
def tr_dir(tmp_path_factory) -> Path:
    return write_tiny_ct2_translator(tmp_path_factory.mktemp("tiny") / "tr")


class _Models:
    """Creates CT2 models and deletes them explicitly at teardown."""

    def __init__(self) -> None:
        self._models: list = []

    def generator(self, path: Path, compute_type: str = "int8"):
        g = ctranslate2.Generator(str(path), device="cpu", compute_type=compute_type, intra_threads=1)
        self._models.append(g)
        return g

    def translator(self, path: Path, compute_type: str = "int8"):
        t = ctranslate2.Translator(str(path), device="cpu", compute_type=compute_type, intra_threads=1)
        self._models.append(t)
        return t

    def close(self) -> None:
        self._models.clear()
        gc.collect()


@pytest.fixture
def models():
    m = _Models()
    yield m
    m.close()


@pytest.fixture
def tok(gen_dir):
    return tokenizers.Tokenizer.from_file(str(gen_dir / "tokenizer.json"))


# ---------------------------------------------------------------------------
# files / tokenizer


def test_model_folder_is_small_and_complete(gen_dir, tr_dir):
    for d in (gen_dir, tr_dir):
        total = sum(f.stat().st_size for f in d.iterdir())
        assert total < 1_000_000, total
        for name in ("model.bin", "config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (d / name).is_file(), name
    assert json.loads((gen_dir / "vocabulary.json").read_text()) == vocabulary()
    assert json.loads((tr_dir / "shared_vocabulary.json").read_text()) == vocabulary(LANG_TOKENS)
    config = json.loads((gen_dir / "config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (BOS, EOS, "<unk>")


def test_tokenizer_matches_ct2_vocabulary(gen_dir, tok):
    vocab = vocabulary()
    for token in ["<s>", "</s>", "<unk>", IM_START, IM_END, "a", "z", "0", "9", "~", "!", NEWLINE_TOKEN, SPACE_TOKEN]:
        assert tok.token_to_id(token) == vocab.index(token), token
    enc = tok.encode("<|im_start|>user\nHi there<|im_end|>\n")
    assert enc.tokens == [IM_START, "u", "s", "e", "r", NEWLINE_TOKEN, "H", "i", SPACE_TOKEN,
                          "t", "h", "e", "r", "e", IM_END, NEWLINE_TOKEN]
    assert enc.ids == [vocab.index(t) for t in enc.tokens]
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>user\nHi there<|im_end|>\n"
    assert tok.decode(enc.ids) == "user\nHi there\n"
    # any UTF-8 text round-trips (one token per byte)
    assert tok.decode(tok.encode("héllo ✓").ids) == "héllo ✓"
    assert len(tok.encode("é").tokens) == 2


def test_tokenizer_config_has_chatml(gen_dir):
    import jinja2

    cfg = json.loads((gen_dir / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == EOS and cfg["bos_token"] == BOS
    text = jinja2.Environment().from_string(cfg["chat_template"]).render(
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say something"},
        ],
        add_generation_prompt=True,
    )
    assert text == CHAT_PROMPT


def test_expected_continuation_helper():
    assert expected_continuation("x", 5) == "yzabc"
    assert expected_continuation("5", 10) == "6789"
    assert expected_continuation("9", 10) == ""
    assert expected_continuation("Hello\n", 3) == "abc"
    assert expected_continuation(CHAT_PROMPT, 4) == "abcd"
    assert expected_continuation("hi<|im_end|>", 4) == ""
    assert successor("z") == "a" and successor("9") == EOS and successor("Q") == "a"
    assert successor(IM_END) == EOS


# ---------------------------------------------------------------------------
# Generator


@pytest.mark.parametrize("compute_type", ["int8", "float32"])
def test_generate_batch_greedy(gen_dir, models, tok, compute_type):
    g = models.generator(gen_dir, compute_type)
    res = g.generate_batch([["x"]], max_length=5, sampling_topk=1, include_prompt_in_result=False)
    assert res[0].sequences == [["y", "z", "a", "b", "c"]]
    assert tok.decode(res[0].sequences_ids[0]) == "yzabc"
    # digits stop on EOS; the EOS token is not part of the result by default
    res = g.generate_batch([["5"]], max_length=50, include_prompt_in_result=False)
    assert res[0].sequences == [["6", "7", "8", "9"]]
    res = g.generate_batch([["5"]], max_length=50, include_prompt_in_result=False, return_end_token=True)
    assert res[0].sequences == [["6", "7", "8", "9", EOS]]
    # EOS first: empty result
    assert g.generate_batch([["9"]], max_length=5, include_prompt_in_result=False)[0].sequences == [[]]


def test_chatml_prompt(gen_dir, models, tok):
    g = models.generator(gen_dir)
    tokens = tok.encode(CHAT_PROMPT).tokens
    res = g.generate_batch([tokens], max_length=8, include_prompt_in_result=False)
    text = tok.decode(res[0].sequences_ids[0])
    assert text == expected_continuation(CHAT_PROMPT, 8) == "abcdefgh"
    # a prompt ending with <|im_end|> is answered with EOS right away
    res = g.generate_batch([tok.encode("<|im_start|>user\nhi<|im_end|>").tokens], max_length=8,
                           include_prompt_in_result=False)
    assert res[0].sequences == [[]]


def test_sampling_is_deterministic_too(gen_dir, models):
    g = models.generator(gen_dir)
    res = g.generate_batch(
        [["x"]] * 4, max_length=6, sampling_topk=50, sampling_topp=0.95, sampling_temperature=1.5,
        include_prompt_in_result=False, return_scores=True,
    )
    for r in res:
        assert r.sequences == [["y", "z", "a", "b", "c", "d"]]
        assert r.scores[0] > -1e-3  # total log-prob ~ 0


def test_generate_tokens_streaming(gen_dir, models):
    g = models.generator(gen_dir)
    steps = list(g.generate_tokens(["5"], max_length=20, return_log_prob=True))
    # the end token is yielded as the final step, flagged is_last
    assert [s.token for s in steps] == ["6", "7", "8", "9", EOS]
    assert [s.is_last for s in steps] == [False, False, False, False, True]
    assert [s.step for s in steps] == [0, 1, 2, 3, 4]
    assert steps[-1].token_id == vocabulary().index(EOS)
    assert all(s.batch_id == 0 for s in steps)
    assert all(s.log_prob > -1e-3 for s in steps)
    # max_length reached: the last real token carries is_last
    steps = list(g.generate_tokens(["x"], max_length=3))
    assert [(s.token, s.is_last) for s in steps] == [("y", False), ("z", False), ("a", True)]
    # EOS first: a single step, the EOS itself
    steps = list(g.generate_tokens(["9"], max_length=3))
    assert [(s.token, s.is_last) for s in steps] == [(EOS, True)]


def test_generate_tokens_early_close(gen_dir, models):
    g = models.generator(gen_dir)
    it = g.generate_tokens(["a"], max_length=1000)
    got = [next(it).token for _ in range(3)]
    it.close()  # stops the background decoding (callback returns True)
    assert got == ["b", "c", "d"]
    # the model is still usable afterwards
    assert g.generate_batch([["x"]], max_length=2, include_prompt_in_result=False)[0].sequences == [["y", "z"]]


def test_end_token_handling(gen_dir, models):
    g = models.generator(gen_dir)
    kw = dict(max_length=10, include_prompt_in_result=False)
    assert g.generate_batch([["x"]], end_token="b", **kw)[0].sequences == [["y", "z", "a"]]
    assert g.generate_batch([["x"]], end_token="b", return_end_token=True, **kw)[0].sequences == [["y", "z", "a", "b"]]
    assert g.generate_batch([["x"]], end_token=["c", "b"], **kw)[0].sequences == [["y", "z", "a"]]
    # end_token replaces the default EOS: the digit chain no longer stops at 9
    assert g.generate_batch([["7"]], end_token="c", **kw)[0].sequences == [["8", "9", EOS, EOS, EOS, EOS, EOS, EOS, EOS, EOS]]
    assert g.generate_batch([["7"]], end_token=["c", EOS], **kw)[0].sequences == [["8", "9"]]
    # streaming yields the matched end token as the last step
    steps = list(g.generate_tokens(["x"], max_length=10, end_token="b"))
    assert [(s.token, s.is_last) for s in steps] == [("y", False), ("z", False), ("a", False), ("b", True)]


def test_batch_same_length_prompts(gen_dir, models):
    g = models.generator(gen_dir)
    prompts = [["x"], ["5"], [NEWLINE_TOKEN], ["9"], [IM_END], ["q"]]
    res = g.generate_batch(prompts, max_length=5, include_prompt_in_result=False)
    for p, r in zip(prompts, res, strict=True):
        assert r.sequences[0] == expected_tokens(p[-1], 5), p


def test_batch_mixed_length_prompts(gen_dir, models, tok):
    """Exact per-prompt answers for prompts of different lengths in one call.

    CT2 counts ``max_length`` from the *shortest* prompt of the batch, so use
    ``include_prompt_in_result=True``, ``max_length = n + (longest - shortest)``,
    then strip each prompt and cut to ``n``.
    """
    g = models.generator(gen_dir)
    texts = ["x", "5", "Hello world\n", CHAT_PROMPT, "ab<|im_end|>", "é"]
    prompts = [tok.encode(t).tokens for t in texts]
    lens = [len(p) for p in prompts]
    n = 5
    res = g.generate_batch(prompts, max_length=n + max(lens) - min(lens), include_prompt_in_result=True)
    for text, p, r in zip(texts, prompts, res, strict=True):
        seq = r.sequences[0]
        assert seq[: len(p)] == p
        got = seq[len(p):][:n]
        assert "".join(got) == expected_continuation(text, n), text


def test_ct2_quirk_mixed_length_without_prompt_in_result(gen_dir, models):
    """With include_prompt_in_result=False only the shortest prompt length is
    forwarded at once; the rest of longer prompts is *returned* as output
    (and counts against max_length).  Backends must not batch that way."""
    g = models.generator(gen_dir)
    res = g.generate_batch([["x"], ["H", "e", "l", "l", "o"]], max_length=5, include_prompt_in_result=False)
    assert res[0].sequences[0] == ["y", "z", "a", "b", "c"]
    assert res[1].sequences[0] == ["e", "l", "l", "o", "p"]  # prompt tail, then "o" -> "p"


def test_callback_streams_whole_batch(gen_dir, models):
    g = models.generator(gen_dir)
    seen: list[tuple[int, str, bool]] = []

    def cb(step):
        seen.append((step.batch_id, step.token, step.is_last))
        return False

    res = g.generate_batch([["x"], ["5"]], max_length=6, include_prompt_in_result=False, callback=cb)
    assert [r.sequences[0] for r in res] == [["y", "z", "a", "b", "c", "d"], ["6", "7", "8", "9"]]
    assert [(t, last) for b, t, last in seen if b == 0] == [
        ("y", False), ("z", False), ("a", False), ("b", False), ("c", False), ("d", True)]
    assert [(t, last) for b, t, last in seen if b == 1] == [
        ("6", False), ("7", False), ("8", False), ("9", False), (EOS, True)]


# ---------------------------------------------------------------------------
# Translator


def test_translator_target_prefix(tr_dir, models):
    tr = models.translator(tr_dir)
    tok = tokenizers.Tokenizer.from_file(str(tr_dir / "tokenizer.json"))
    assert tok.encode("__fr__").tokens == ["__fr__"]
    src = tok.encode("Hello world").tokens
    prefixes = [["__fr__"], ["__de__"], ["__es__"], ["__en__"], ["__fr__", "x"]]
    res = tr.translate_batch([src] * len(prefixes), target_prefix=prefixes, max_decoding_length=10)
    got = [r.hypotheses[0] for r in res]
    assert got == [expected_translation(p, 10) for p in prefixes]
    assert got[0] == ["__fr__", "5", "6", "7", "8", "9"]
    assert got[1] == ["__de__", "7", "8", "9"]
    assert got[2] == ["__es__", "9"]
    assert got[4] == ["__fr__", "x", "y", "z", "a", "b", "c", "d", "e", "f"]
    # without a prefix the decoder starts from <s> -> "0"
    res = tr.translate_batch([src], max_decoding_length=20)
    assert res[0].hypotheses[0] == expected_translation([], 20) == list("0123456789")
    # output does not depend on the source
    res = tr.translate_batch([tok.encode("x").tokens, src], target_prefix=[["__de__"], ["__de__"]])
    assert [r.hypotheses[0] for r in res] == [["__de__", "7", "8", "9"]] * 2


def test_translator_float32_and_streaming(tr_dir, models):
    tr = models.translator(tr_dir, "float32")
    res = tr.translate_batch([["a", "b"]], target_prefix=[["__en__"]], beam_size=2)
    assert res[0].hypotheses[0] == ["__en__", "3", "4", "5", "6", "7", "8", "9"]
    # Translator.generate_tokens also yields the target prefix tokens, then the EOS
    steps = list(tr.generate_tokens(["a", "b"], target_prefix=["__de__"]))
    assert [s.token for s in steps] == ["__de__", "7", "8", "9", EOS]
    assert steps[-1].is_last
