"""Behaviour of the CPU fake of exllamav3 1.6.5 (tests/fakes/exllamav3, see its NOTES.md). Bounded, no sleeps."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .exllamav3_model import EOS_ID, IM_END_ID, installed_fake_exllamav3, write_fake_exl3_model

MAX_ITERS = 2000


class Stack:
    """config/model/cache/tokenizer/generator built in the order the real library requires."""

    def __init__(self, ex: Any, model_dir: Path, cache_tokens: int = 4096, **gen_kwargs: Any):
        self.ex = ex
        self.config = ex.Config.from_directory(str(model_dir))
        self.model = ex.Model.from_config(self.config)
        self.cache = ex.Cache(self.model, max_num_tokens=cache_tokens, layer_type=ex.CacheLayer_quant, k_bits=4, v_bits=4)
        self.model.load(progressbar=False)
        self.tokenizer = ex.Tokenizer.from_config(self.config)
        self.generator = ex.Generator(model=self.model, cache=self.cache, tokenizer=self.tokenizer, **gen_kwargs)

    def job(self, prompt: str, **kwargs: Any) -> Any:
        return self.ex.Job(input_ids=self.tokenizer.encode(prompt), **kwargs)

    def drain(self) -> list[list[dict]]:
        """iterate() until no job remains; returns the results of every call."""
        rounds: list[list[dict]] = []
        for _ in range(MAX_ITERS):
            if not self.generator.num_remaining_jobs():
                return rounds
            rounds.append(self.generator.iterate())
        raise AssertionError("generator did not drain")


def texts_by_job(rounds: list[list[dict]]) -> dict[Any, str]:
    out: dict[Any, str] = {}
    for results in rounds:
        for r in results:
            if r["stage"] == "streaming":
                out[r["serial"]] = out.get(r["serial"], "") + r.get("text", "")
    return out


def final(rounds: list[list[dict]], serial: int) -> dict:
    ends = [r for results in rounds for r in results if r["serial"] == serial and r["eos"]]
    assert len(ends) == 1, ends
    return ends[0]


@pytest.fixture
def fake_exllamav3() -> Iterator[ModuleType]:
    with installed_fake_exllamav3() as mod:
        yield mod


@pytest.fixture
def fake_exl3_model_dir(tmp_path: Path) -> Path:
    return write_fake_exl3_model(tmp_path / "fake-exl3-model")


@pytest.fixture
def stack(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> Stack:
    return Stack(fake_exllamav3, fake_exl3_model_dir, max_batch_size=8)


# ---------------------------------------------------------------------------------------------------------------
# Installation and import surface


def test_install_puts_fake_and_submodules_in_sys_modules_and_removes_them() -> None:
    sentinel = types.ModuleType("exllamav3")
    sys.modules["exllamav3"] = sentinel
    try:
        with installed_fake_exllamav3() as ex:
            import exllamav3
            from exllamav3 import (  # noqa: F401
                Cache,
                CacheLayer_fp16,
                CacheLayer_quant,
                ComboSampler,
                Config,
                Generator,
                Job,
                Model,
                Tokenizer,
            )
            from exllamav3.cache.quant import CacheLayer_quant as quant_from_submodule
            from exllamav3.generator import Generator as gen_from_submodule
            from exllamav3.generator import Job as job_from_submodule
            from exllamav3.generator.job import Job as job_from_job_module
            from exllamav3.generator.sampler import ComboSampler as combo_from_submodule
            from exllamav3.generator.sampler.presets import ComboSampler as combo_from_presets
            from exllamav3.model.config import Config as config_from_submodule
            from exllamav3.tokenizer.tokenizer import Tokenizer as tok_from_submodule
            from exllamav3.version import __version__

            assert exllamav3 is ex and ex.FAKE_EXLLAMAV3
            assert quant_from_submodule is CacheLayer_quant
            assert combo_from_submodule is ComboSampler is combo_from_presets
            assert gen_from_submodule is Generator and job_from_submodule is Job is job_from_job_module
            assert config_from_submodule is Config and tok_from_submodule is Tokenizer
            assert __version__ == "1.6.5"
            assert "exllamav3.generator.generator" in sys.modules
        assert sys.modules["exllamav3"] is sentinel
        assert not [k for k in sys.modules if k.startswith("exllamav3.")]
    finally:
        del sys.modules["exllamav3"]


def test_model_dir_looks_like_an_exl3_model(fake_exl3_model_dir: Path) -> None:
    import json

    names = {p.name for p in fake_exl3_model_dir.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "fake_exllamav3.json"} <= names
    cfg = json.loads((fake_exl3_model_dir / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "exl3"


def test_tokenizer_json_is_a_real_hf_tokenizer(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(fake_exl3_model_dir / "tokenizer.json"))
    cfg = fake_exllamav3.Config.from_directory(str(fake_exl3_model_dir))
    tok = fake_exllamav3.Tokenizer.from_config(cfg)
    text = "Hi, there!\n\t<|im_end|>x é"
    assert tok.encode(text, encode_special_tokens=True).tolist()[0] == hf.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------------------------------------------------------
# Config / load / cache validation (same exception types as the real library)


def test_config_errors(fake_exllamav3: Any, tmp_path: Path) -> None:
    ex = fake_exllamav3
    with pytest.raises(FileNotFoundError):
        ex.Config.from_directory(str(tmp_path / "missing"))
    bad = write_fake_exl3_model(tmp_path / "bad", architecture="NoSuchForCausalLM")
    with pytest.raises(AssertionError, match="Unknown architecture NoSuchForCausalLM"):
        ex.Config.from_directory(str(bad))
    real_looking = write_fake_exl3_model(tmp_path / "real")
    (real_looking / "fake_exllamav3.json").unlink()
    with pytest.raises(AssertionError, match="not a fake exllamav3 model"):
        ex.Config.from_directory(str(real_looking))


def test_config_and_tokenizer_special_tokens(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    cfg = fake_exllamav3.Config.from_directory(str(fake_exl3_model_dir))
    tok = fake_exllamav3.Tokenizer.from_config(cfg)
    assert cfg.eos_token_id == EOS_ID and cfg.eos_token_id_list == [EOS_ID, IM_END_ID]
    assert tok.eos_token_id == EOS_ID and tok.eos_token == "</s>" and tok.bos_token_id == 1
    assert tok.single_id("<|im_end|>") == IM_END_ID
    ids = tok.encode("ab", add_bos=True)
    assert ids.shape == (1, 3) and ids.device.type == "cpu"
    assert tok.decode(ids[0]) == "ab"
    assert tok.decode(ids) == ["ab"]  # 2-D in -> list out, like the real one
    assert tok.decode(ids[0], decode_special_tokens=True) == "<s>ab"


def test_chat_template(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    cfg = fake_exllamav3.Config.from_directory(str(fake_exl3_model_dir))
    tok = fake_exllamav3.Tokenizer.from_config(cfg)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    ids = tok.hf_chat_template(msgs, add_generation_prompt=True)
    assert ids.shape[0] == 1
    assert tok.decode(ids[0], decode_special_tokens=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids.tolist()[0].count(IM_END_ID) == 2  # special tokens are parsed, not spelled out
    no_think = tok.hf_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert tok.decode(no_think[0], decode_special_tokens=True).endswith("assistant\n<think>\n\n</think>\n\n")


def test_cache_validation(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    ex = fake_exllamav3
    model = ex.Model.from_config(ex.Config.from_directory(str(fake_exl3_model_dir)))
    with pytest.raises(AssertionError, match="multiple of 256"):
        ex.Cache(model, max_num_tokens=1000)
    with pytest.raises(AssertionError, match="from 2 to 8 bits"):
        ex.Cache(model, max_num_tokens=1024, layer_type=ex.CacheLayer_quant, k_bits=9, v_bits=4)
    with pytest.raises(TypeError):
        ex.Cache(model, max_num_tokens=1024, layer_type=ex.CacheLayer_quant)  # k_bits/v_bits are required
    with pytest.raises(TypeError):
        ex.Cache(model, max_num_tokens=1024, k_bits=4, v_bits=4)  # fp16 layers take no bits


def test_cache_must_be_created_before_load(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    ex = fake_exllamav3
    cfg = ex.Config.from_directory(str(fake_exl3_model_dir))
    model = ex.Model.from_config(cfg)
    model.load()
    cache = ex.Cache(model, max_num_tokens=1024)
    gen = ex.Generator(model=model, cache=cache, tokenizer=ex.Tokenizer.from_config(cfg))
    with pytest.raises(AssertionError, match="Construct the Cache BEFORE calling model.load"):
        gen.iterate()


def test_unload_invalidates_cache_and_load_callback(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    ex = fake_exllamav3
    cfg = ex.Config.from_directory(str(fake_exl3_model_dir))
    model = ex.Model.from_config(cfg)
    cache = ex.Cache(model, max_num_tokens=1024)
    progress: list[tuple[int, int]] = []
    model.load(callback=lambda a, b: progress.append((a, b)))
    assert cache.initialized and progress[-1][0] == progress[-1][1] == len(progress) - 1
    gen = ex.Generator(model=model, cache=cache, tokenizer=ex.Tokenizer.from_config(cfg))
    assert gen.iterate() == []
    model.unload()
    with pytest.raises(AssertionError):
        gen.iterate()
    with pytest.raises(AssertionError):
        model.load(device="cuda:0", reserve_per_device=1.0)


def test_newer_generator_takes_over_cache(stack: Stack) -> None:
    ex = stack.ex
    ex.Generator(model=stack.model, cache=stack.cache, tokenizer=stack.tokenizer)
    with pytest.raises(RuntimeError, match="no longer owns its Cache"):
        stack.generator.iterate()


def test_generator_argument_checks(stack: Stack) -> None:
    ex = stack.ex
    with pytest.raises(AssertionError, match="shared_chunk_size"):
        ex.Generator(model=stack.model, cache=stack.cache, tokenizer=stack.tokenizer, max_chunk_size=100)


def test_sampler_argument_checks(fake_exllamav3: Any) -> None:
    ex = fake_exllamav3
    ex.ComboSampler(temperature=0.7, top_k=40, top_p=0.9, rep_p=1.1, min_p=0.05)
    ex.ComboSampler(temperature=0.0, top_p=5.0)  # greedy stack: top_p is never checked, like the real one
    with pytest.raises(AssertionError):
        ex.ComboSampler(temperature=0.7, top_p=1.5)
    with pytest.raises(AssertionError, match="top_k value must be integer"):
        ex.ComboSampler(top_k=2.5)


# ---------------------------------------------------------------------------------------------------------------
# Generation


def test_result_stages_and_keys_in_order(stack: Stack) -> None:
    job = stack.job("hello x", max_new_tokens=3, identifier="req-1")
    serial = stack.generator.enqueue(job)
    first = stack.generator.iterate()
    assert [r["stage"] for r in first] == ["started", "prefill", "streaming"]
    started, prefill, streaming = first
    assert list(started) == ["job", "stage", "eos", "serial", "identifier"]
    assert list(prefill) == ["job", "stage", "eos", "curr_progress", "max_progress", "serial", "identifier"]
    assert prefill["curr_progress"] == prefill["max_progress"] == 6
    assert list(streaming) == ["job", "stage", "eos", "serial", "text", "token_ids", "identifier"]
    assert streaming["job"] is job and streaming["serial"] == serial and streaming["text"] == "y"
    assert streaming["token_ids"].shape == (1, 1)
    rounds = [first] + stack.drain()
    last = final(rounds, serial)
    assert list(last) == [
        "job", "stage", "eos", "serial", "eos_reason", "text", "token_ids", "full_completion", "new_tokens",
        "prompt_tokens", "time_enqueued", "time_prefill", "time_generate", "cached_pages", "cached_tokens",
        "identifier",
    ]
    assert last["eos_reason"] == "max_new_tokens" and last["full_completion"] == "yza"
    assert last["new_tokens"] == 3 and last["prompt_tokens"] == 7
    assert all(last[k] >= 0.0 for k in ("time_enqueued", "time_prefill", "time_generate"))
    assert job.is_finished and stack.generator.num_remaining_jobs() == 0


def test_single_token_prompt_has_no_prefill_event(stack: Stack) -> None:
    stack.generator.enqueue(stack.job("x", max_new_tokens=1))
    assert [r["stage"] for r in stack.generator.iterate()] == ["started", "streaming"]


def test_true_batching_with_pending_queue(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    s = Stack(fake_exllamav3, fake_exl3_model_dir, max_batch_size=2)
    jobs = [s.job(p, max_new_tokens=n) for p, n in (("a", 4), ("m", 2), ("0", 3))]
    serials = s.generator.enqueue(jobs)
    assert serials == [0, 1, 2]
    assert (s.generator.num_pending_jobs(), s.generator.num_active_jobs()) == (3, 0)

    r1 = s.generator.iterate()
    assert [(r["stage"], r["serial"]) for r in r1] == [
        ("started", 0), ("started", 1), ("streaming", 0), ("streaming", 1)
    ]
    assert (s.generator.num_pending_jobs(), s.generator.num_active_jobs()) == (1, 2)
    r2 = s.generator.iterate()  # every active job advances by one token per call
    assert [(r["serial"], r.get("text"), r["eos"]) for r in r2] == [(0, "c", False), (1, "o", True)]
    assert (s.generator.num_pending_jobs(), s.generator.num_active_jobs()) == (1, 1)
    r3 = s.generator.iterate()  # the freed slot is taken by the pending job
    assert [(r["stage"], r["serial"]) for r in r3] == [("started", 2), ("streaming", 0), ("streaming", 2)]
    rounds = [r1, r2, r3] + s.drain()
    assert texts_by_job(rounds) == {0: "bcde", 1: "no", 2: "123"}


def test_stop_token_eos_and_held(stack: Stack) -> None:
    serial = stack.generator.enqueue(stack.job("7", max_new_tokens=10, stop_conditions=[stack.tokenizer.eos_token_id]))
    rounds = stack.drain()
    last = final(rounds, serial)
    assert last["eos_reason"] == "stop_token"
    assert last["eos_triggering_token_id"] == EOS_ID and last["eos_triggering_token_str"] == "</s>"
    assert "text" not in last and "token_ids" not in last  # the stop token is not emitted...
    assert last["held"]["token_ids"].tolist() == [[EOS_ID]]  # ...it is reported under "held"
    assert last["full_completion"] == "89" and last["new_tokens"] == 3


def test_eos_is_not_a_stop_condition_by_default(stack: Stack) -> None:
    serial = stack.generator.enqueue(stack.job("8", max_new_tokens=4))
    rounds = stack.drain()
    last = final(rounds, serial)
    assert last["eos_reason"] == "max_new_tokens"
    tokens = [t for res in rounds for r in res if "token_ids" in r for t in r["token_ids"].tolist()[0]]
    assert tokens[1] == EOS_ID  # "9" -> EOS, decoded as "" (special), then EOS -> "a"
    assert last["full_completion"] == "9ab"


def test_stop_string_holds_text_and_splits_it(stack: Stack) -> None:
    serial = stack.generator.enqueue(stack.job("a", max_new_tokens=20, stop_conditions=["def"]))
    rounds = stack.drain()
    streamed = [r for res in rounds for r in res if r["stage"] == "streaming"]
    assert [r.get("text") for r in streamed] == ["b", "c", None, None, None]  # "d", "de" held as partial match
    assert [r["eos"] for r in streamed] == [False, False, False, False, True]
    last = streamed[-1]
    assert last["eos_reason"] == "stop_string" and last["eos_triggering_string"] == "def"
    assert "text" not in last  # nothing precedes the stop string in the held text
    assert last["token_ids"].tolist() == [[stack.tokenizer.single_id("d"), stack.tokenizer.single_id("e"),
                                           stack.tokenizer.single_id("f")]]
    assert last["held"] == {"text": "def"}
    assert last["full_completion"] == "bc" and texts_by_job(rounds)[serial] == "bc"


def test_stop_string_false_start_is_released(stack: Stack) -> None:
    serial = stack.generator.enqueue(stack.job("a", max_new_tokens=5, stop_conditions=["bd"]))
    rounds = stack.drain()
    streamed = [r for res in rounds for r in res if r["stage"] == "streaming"]
    assert [r.get("text") for r in streamed] == [None, "bc", "d", "e", "f"]
    assert final(rounds, serial)["eos_reason"] == "max_new_tokens"


def test_min_new_tokens_masks_stop_tokens(stack: Stack) -> None:
    serial = stack.generator.enqueue(
        stack.job("8", max_new_tokens=5, min_new_tokens=3, stop_conditions=[EOS_ID, "zzz"])
    )
    rounds = stack.drain()
    assert final(rounds, serial)["full_completion"] == "9abcd"  # EOS masked at step 2 -> fallback "a"


def test_cancel_active_and_pending(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    s = Stack(fake_exllamav3, fake_exl3_model_dir, max_batch_size=1)
    a, b, c = (s.job(p, max_new_tokens=50) for p in ("a", "b", "c"))
    s.generator.enqueue([a, b, c])
    s.generator.iterate()
    assert s.generator.active_jobs == [a]
    s.generator.cancel(b)  # pending
    s.generator.cancel(a)  # active
    s.generator.cancel(a)  # unknown now: ignored
    assert s.generator.num_remaining_jobs() == 1
    nxt = s.generator.iterate()
    assert [(r["stage"], r["serial"]) for r in nxt] == [("started", 2), ("streaming", 2)]
    assert all(r["job"] is c for r in nxt)
    s.generator.cancel(c)
    assert s.generator.iterate() == []


def test_clear_queue(stack: Stack) -> None:
    stack.generator.enqueue([stack.job("a", max_new_tokens=9), stack.job("b", max_new_tokens=9)])
    stack.generator.iterate()
    stack.generator.clear_queue()
    assert stack.generator.num_remaining_jobs() == 0 and stack.generator.iterate() == []


def test_chunked_prefill(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    s = Stack(fake_exllamav3, fake_exl3_model_dir, max_chunk_size=256)
    s.generator.enqueue(s.job("q" * 600, max_new_tokens=2))
    rounds = s.drain()
    progress = [(r["curr_progress"], r["max_progress"]) for res in rounds for r in res if r["stage"] == "prefill"]
    assert progress == [(256, 599), (512, 599), (599, 599)]
    assert [r["stage"] for r in rounds[2]] == ["prefill", "streaming"]


def test_prefill_is_throttled_while_other_jobs_generate(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    s = Stack(fake_exllamav3, fake_exl3_model_dir, max_chunk_size=512)  # shared_chunk_size 256, cooldown 4
    short, long_ = s.job("a", max_new_tokens=40), s.job("k" * 600, max_new_tokens=1)
    s.generator.enqueue([short, long_])
    rounds = s.drain()
    prefill_at = [(i, r["curr_progress"]) for i, res in enumerate(rounds) for r in res if r["stage"] == "prefill"]
    assert prefill_at == [(0, 256), (5, 512), (10, 599)]
    assert all(len([r for r in res if r["serial"] == 0 and r["stage"] == "streaming"]) == 1 for res in rounds[:40])
    assert "identifier" not in rounds[0][0]  # only present when the Job was given one


def test_prompt_cache_reuses_full_pages(stack: Stack) -> None:
    prompt = "w" * 700  # two full 256-token pages before the last prompt token
    s1 = stack.generator.enqueue(stack.job(prompt, max_new_tokens=2))
    first = final(stack.drain(), s1)
    s2 = stack.generator.enqueue(stack.job(prompt, max_new_tokens=2))
    rounds = stack.drain()
    second = final(rounds, s2)
    assert (first["cached_pages"], first["cached_tokens"]) == (0, 0)
    assert (second["cached_pages"], second["cached_tokens"]) == (2, 512)
    prefill = [r for res in rounds for r in res if r["stage"] == "prefill"]
    assert [(r["curr_progress"], r["max_progress"]) for r in prefill] == [(699, 699)]
    assert stack.generator.get_cache_stats()["hit_rate"] == 0.5


def test_enqueue_capacity_checks(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    s = Stack(fake_exllamav3, fake_exl3_model_dir, cache_tokens=512)
    with pytest.raises(AssertionError, match="cannot be enqueued"):
        s.generator.enqueue(s.job("x" * 600, max_new_tokens=1))
    unlimited = s.job("x", max_new_tokens=None)
    s.generator.enqueue(unlimited)
    assert unlimited.max_new_tokens == 512 - 1 - 1
    capped = s.job("x", max_new_tokens=10_000)
    s.generator.enqueue(capped)
    assert capped.max_new_tokens == 510
    assert s.generator.job_serial == 2  # the rejected job took no serial


def test_jobs_wait_for_cache_pages(fake_exllamav3: Any, fake_exl3_model_dir: Path) -> None:
    s = Stack(fake_exllamav3, fake_exl3_model_dir, cache_tokens=512, max_batch_size=8)
    s.generator.enqueue([s.job("a", max_new_tokens=300), s.job("b", max_new_tokens=300)])  # 2 pages each
    s.generator.iterate()
    assert s.generator.num_active_jobs() == 1 and s.generator.num_pending_jobs() == 1
    rounds = s.drain()
    assert {r["serial"] for res in rounds for r in res if r["eos"]} == {0, 1}


def test_requeue_with_max_rq_tokens(stack: Stack) -> None:
    job = stack.job("a", max_new_tokens=300, max_rq_tokens=10, identifier=7)
    serial = stack.generator.enqueue(job)
    rounds = stack.drain()
    flagged = [r for res in rounds for r in res if r.get("requeue")]
    assert len(flagged) == 1 and flagged[0]["serial"] == serial and not flagged[0]["eos"]
    starts = [r for res in rounds for r in res if r["stage"] == "started"]
    assert [(r["serial"], r["identifier"], r["job"] is job) for r in starts] == [(serial, 7, True)] * 2
    last = final(rounds, serial)
    assert last["new_tokens"] == 300 and last["prompt_tokens"] == 1 and len(last["full_completion"]) == 300
    assert texts_by_job(rounds)[serial] == last["full_completion"]


def test_loop_detection(stack: Stack) -> None:
    serial = stack.generator.enqueue(stack.job("a", max_new_tokens=200, stop_on_loop=(60, 2)))
    last = final(stack.drain(), serial)
    assert last["eos_reason"] == "loop_detected" and last["new_tokens"] == 60


def test_injected_prefill_error_is_reaped(stack: Stack) -> None:
    bad = stack.job("FAKE_FAIL_PREFILL", max_new_tokens=3, identifier="bad")
    good = stack.job("x", max_new_tokens=3)
    stack.generator.enqueue([bad, good])
    results = stack.generator.iterate()
    err = [r for r in results if r["stage"] == "error"]
    assert len(err) == 1 and err[0]["job"] is bad and err[0]["eos"] is True
    assert list(err[0]) == ["job", "serial", "stage", "eos", "error"]  # no "identifier" on error results
    assert isinstance(err[0]["error"], RuntimeError)
    assert final([results] + stack.drain(), good.serial_number)["full_completion"] == "yza"


def test_injected_generator_error_escapes_iterate(stack: Stack) -> None:
    stack.generator.enqueue(stack.job("FAKE_FAIL_ITERATE", max_new_tokens=3))
    with pytest.raises(RuntimeError, match="injected generator failure"):
        stack.generator.iterate()


def test_return_probs(stack: Stack) -> None:
    serial = stack.generator.enqueue(stack.job("a", max_new_tokens=2, return_probs=True))
    rounds = stack.drain()
    assert final(rounds, serial)["token_probs"].tolist() == [[1.0]]


def test_job_argument_checks(stack: Stack) -> None:
    ex = stack.ex
    with pytest.raises(AssertionError, match="cannot be empty"):
        ex.Job(input_ids=stack.tokenizer.encode(""), max_new_tokens=1)
    with pytest.raises(AssertionError, match="max_new_tokens must be >= 1"):
        stack.job("a", max_new_tokens=0)
    with pytest.raises(ValueError, match="Unsupported type in stop_conditions"):
        stack.job("a", stop_conditions=[1.5])
    with pytest.raises(NotImplementedError):
        stack.job("a", banned_strings=["x"])


def test_generate_helper(stack: Stack) -> None:
    assert stack.generator.generate("x", max_new_tokens=3) == "xyza"
    assert stack.generator.generate(["a", "5"], max_new_tokens=9, stop_conditions=[EOS_ID],
                                    completion_only=True) == ["bcdefghij", "6789"]


# ---------------------------------------------------------------------------------------------------------------
# Fake-only helpers


def test_partial_strings_match_port(fake_exllamav3: Any) -> None:
    from exllamav3._fake import partial_strings_match

    assert partial_strings_match("hello world", ["wor"]) == 6
    assert partial_strings_match("hello wo", ["world"]) == -2
    assert partial_strings_match("hello", ["xyz"]) == -1
    assert partial_strings_match("abcab", ["bc", "ab"]) == 0
    assert partial_strings_match("xab", ["abc", "b"]) == -2  # partial "ab.." starts before full "b"


def test_fake_tensor_surface(fake_exllamav3: Any) -> None:
    from exllamav3._fake import FakeTensor

    t = FakeTensor.ids([5, 6, 7])
    assert t.shape == (1, 3) and t.ndim == 2 and t.dim() == 2 and t.numel() == 3 and len(t) == 1
    assert t[0].tolist() == [5, 6, 7] and t[0, -1].item() == 7 and t[:, 1:].tolist() == [[6, 7]]
    assert t.view(-1).tolist() == [5, 6, 7] and t.flatten().shape == (3,) and t.squeeze(0).shape == (3,)
    assert t[0].unsqueeze(0).shape == (1, 3) and t.reshape(3, 1).tolist() == [[5], [6], [7]]
    assert t.cpu() is t and t.to("cpu") is t and t.clone().tolist() == t.tolist() and t.device.type == "cpu"
    assert [row.tolist() for row in t] == [[5, 6, 7]] and t[:, 3:].shape == (1, 0)
