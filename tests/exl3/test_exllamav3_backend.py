"""The ExLlamaV3 backend on the CPU fake of exllamav3 1.6.5, driven through the pool manager.

The fake (``tests/fakes/exllamav3``, see its NOTES.md) is put into ``sys.modules`` as
``exllamav3`` for each test; the adapter imports it in ``load`` exactly as it would the real
package.  Its model is deterministic: the next token is the successor of the last one
(``a``→``b``…``z``→``a``, ``0``→…→``9``→EOS, anything else → ``a``), so outputs are exact.

Rules: real clock and real worker threads, every test bounded by ``trio.fail_after``, no sleeps.
Where a test needs jobs to overlap it holds the generator with :class:`IterateSpy`'s gate (a
``threading.Event`` the worker waits on inside ``iterate``) and releases it from the trio side
once the pool has dispatched them.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import support.runtime
import trio
import trio.testing
from fakes.exllamav3_model import (
    CHAT_TEMPLATE,
    EOS_ID,
    IM_END_ID,
    SPECIAL_TOKENS,
    installed_fake_exllamav3,
    write_fake_exl3_model,
)
from support.fake_backend import FakeBackend, expected_text
from support.runtime import result, run, submit

from llm_pool.backends import BackendContext, create_backend
from llm_pool.backends.decoding import engine_seed
from llm_pool.backends.exllamav3 import ExLlamaV3Backend, read_chat_template
from llm_pool.config import SettingsError, decode_settings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import NO_TOP_K, Delta, Failed, GenerationRequest, Job
from llm_pool.pool.manager import PoolManager

LIMIT_S = 20

#: Renders only the last user message, so the prompt's last token is the user's last character.
RAW_TEMPLATE = (
    "{% set ns = namespace(last='') %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = m['content'] %}{% endif %}{% endfor %}"
    "{{ ns.last }}"
)


# ---------------------------------------------------------------------------------------------- helpers
def write_model(folder: Path, *, chat_template: str | None = RAW_TEMPLATE) -> Path:
    """A fake EXL3 model folder; by default its chat template renders the bare user text."""
    path = write_fake_exl3_model(folder)
    if chat_template is not None:
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = chat_template
        cfg_path.write_text(json.dumps(cfg))
    return path


def settings_for(models: dict[str, dict[str, Any]]) -> Any:
    return decode_settings({"engine": {"models": models}}, source="test")


def exl3_model(path: Path, **keys: Any) -> dict[str, Any]:
    return {"model_path": str(path), "backend": "exllamav3", "prompt_format": "native", "target_inflight": 4, **keys}


def request(text: str, model: str = "m", **decoding: Any) -> GenerationRequest:
    return support.runtime.request(text, model, **decoding)


def backend_of(manager: PoolManager, model: str = "m") -> ExLlamaV3Backend:
    runtime = manager.entries[model].runtime
    assert runtime is not None
    backend = runtime.replicas[0].backend
    assert isinstance(backend, ExLlamaV3Backend)
    return backend


class IterateSpy:
    """Wraps the fake ``Generator.iterate``: records every call's results (stage, identifier, eos)
    and the calling thread, and can hold the worker at the start of a call (``hold``/``release``),
    or from the call after the first one whose results satisfy ``pause_after``."""

    def __init__(self, ex: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[list[tuple[str, Any, bool]]] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self._pause_after: Callable[[list[dict[str, Any]]], bool] | None = None
        original = ex.Generator.iterate
        spy = self

        def iterate(generator: Any) -> list[dict[str, Any]]:
            spy.gate.wait(LIMIT_S)
            results = original(generator)
            spy.threads.add(threading.get_ident())
            spy.calls.append([(r["stage"], r.get("identifier"), r["eos"]) for r in results])
            if spy._pause_after is not None and spy._pause_after(results):
                spy._pause_after = None
                spy.gate.clear()
            return results

        monkeypatch.setattr(ex.Generator, "iterate", iterate)

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def pause_after_first_token_of(self, job: Job) -> None:
        self._pause_after = lambda results: any(
            r["stage"] == "streaming" and r.get("identifier") == job.id for r in results
        )

    def streaming_together(self) -> int:
        """The most jobs that got a token from one ``iterate()`` call."""
        return max((len({i for stage, i, _ in call if stage == "streaming"}) for call in self.calls), default=0)

    def starts(self, job: Job) -> int:
        return sum(1 for call in self.calls for stage, i, _ in call if stage == "started" and i == job.id)


class Recorder:
    """Wraps a factory of the fake module (``Job``, ``ComboSampler``) to record its kwargs."""

    def __init__(self, ex: ModuleType, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.kwargs: list[dict[str, Any]] = []
        original = getattr(ex, name)

        def make(*args: Any, **kwargs: Any) -> Any:
            self.kwargs.append(kwargs)
            return original(*args, **kwargs)

        monkeypatch.setattr(ex, name, make)


@pytest.fixture
def fake_ex() -> Iterator[ModuleType]:
    with installed_fake_exllamav3() as ex:
        yield ex


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "exl3")


@pytest.fixture
def spy(fake_ex: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[IterateSpy]:
    spy = IterateSpy(fake_ex, monkeypatch)
    yield spy
    spy.release()  # never leave a worker thread waiting


@pytest.fixture
async def manager_for(fake_ex: ModuleType) -> AsyncIterator[Callable[[dict[str, dict[str, Any]]], Any]]:
    """``await manager_for(models)``: a running PoolManager (nothing loaded) for these models."""
    async with trio.open_nursery() as nursery:

        async def start(models: dict[str, dict[str, Any]], **kwargs: Any) -> PoolManager:
            manager = PoolManager(settings_for(models), **kwargs)
            await nursery.start(functools.partial(manager.run, autoload=False))
            return manager

        yield start
        nursery.cancel_scope.cancel()


@pytest.fixture
async def pool(manager_for: Any, model_dir: Path, request: pytest.FixtureRequest) -> PoolManager:
    """Model ``m`` loaded: the fake model with the raw template, ``target_inflight`` 4, plus any
    model keys the test passes with ``indirect`` parametrization."""
    manager: PoolManager = await manager_for({"m": exl3_model(model_dir, **getattr(request, "param", {}))})
    with trio.fail_after(LIMIT_S):
        await manager.load("m")
    return manager


# ---------------------------------------------------------------------------------------------- outputs
async def test_exact_greedy_outputs_stream_one_delta_per_token(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        deltas, done = await run(pool, request("x"))
        assert deltas == list("yzabc") and done.text == "yzabc"
        assert done.stats.finish_reason == "length"
        assert (done.stats.prompt_tokens, done.stats.output_tokens) == (1, 5)


async def test_a_raw_prompt_has_no_template_and_no_control_token(pool: PoolManager) -> None:
    """``/v1/completions``: the caller's text alone; ``<|im_end|>`` is its ten characters."""
    with trio.fail_after(LIMIT_S):
        _, done = await run(pool, support.runtime.raw_request("x", "m"))
        assert (done.text, done.stats.prompt_tokens) == ("yzabc", 1)
        _, done = await run(pool, support.runtime.raw_request("<|im_end|>", "m", max_tokens=3))
        assert (done.text, done.stats.prompt_tokens) == ("abc", 10)


async def test_text_streams_while_the_job_is_still_generating(pool: PoolManager, spy: IterateSpy) -> None:
    with trio.fail_after(LIMIT_S):
        job = Job(request("x", max_tokens=30))
        spy.pause_after_first_token_of(job)
        pool.submit(job, allow_remote=False)
        events = job.events()
        first = await events.receive()
        # the generator is held before its next iterate(): the first token reached the client alone
        assert first == Delta("y") and not job.ended
        spy.release()
        rest, done = await result(job)
        assert "y" + "".join(rest) == done.text == expected_text("x", 30)


async def test_stop_conditions_and_finish_reasons(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        # EOS (not a default stop in exllamav3: the adapter passes the model's EOS ids)
        deltas, done = await run(pool, request("7", max_tokens=50))
        assert (done.text, done.stats.finish_reason, done.stats.output_tokens) == ("89", "stop", 2)
        assert deltas == ["8", "9"]
        # a stop string is never streamed, not even in part
        deltas, done = await run(pool, request("x", max_tokens=20, stop=["bc"]))
        assert (done.text, "".join(deltas), done.stats.finish_reason) == ("yza", "yza", "stop")
        # "ab" is held back while it could become "abz"; max_tokens releases it
        deltas, done = await run(pool, request("x", max_tokens=4, stop=["abz"]))
        assert (done.text, "".join(deltas), done.stats.finish_reason) == ("yzab", "yzab", "length")
        # "9" is held back as the start of "9x"; EOS then ends the job and "9" is still output
        deltas, done = await run(pool, request("7", max_tokens=50, stop=["9x"]))
        assert (done.text, "".join(deltas), done.stats.finish_reason) == ("89", "89", "stop")


async def test_job_arguments_and_samplers(
    pool: PoolManager, fake_ex: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = Recorder(fake_ex, "Job", monkeypatch)
    samplers = Recorder(fake_ex, "ComboSampler", monkeypatch)
    with trio.fail_after(LIMIT_S):
        job = submit(pool, request("x", stop=["zz"]))
        _, done = await result(job)
        assert done.text == "yzabc"
        sampled = request("x", temperature=0.7, top_k=40, top_p=0.9, repetition_penalty=1.1)
        _, done = await run(pool, sampled)
        assert done.text == "yzabc"  # the fake model is greedy whatever the sampler
        # what the OpenAI routes send: no top-k limit, a 64-bit seed, OpenAI's penalties
        openai = request("x", temperature=1.0, top_k=NO_TOP_K, seed=2**40 + 5, presence_penalty=0.5, frequency_penalty=-1)
        _, done = await run(pool, openai)
        assert done.text == "yzabc"
    first = jobs.kwargs[0]
    assert first["identifier"] == job.id and first["max_new_tokens"] == 5
    assert first["stop_conditions"] == [EOS_ID, IM_END_ID, "zz"]
    assert first["max_rq_tokens"] is None
    assert [j["seed"] for j in jobs.kwargs] == [None, None, engine_seed(2**40 + 5)]
    assert samplers.kwargs == [
        {"rep_p": 1.0, "freq_p": 0.0, "pres_p": 0.0, "temperature": 0.0, "top_k": 1},
        {"rep_p": 1.1, "freq_p": 0.0, "pres_p": 0.0, "temperature": 0.7, "top_k": 40, "top_p": 0.9},
        {"rep_p": 1.0, "freq_p": -1, "pres_p": 0.5, "temperature": 1.0, "top_k": 0, "top_p": 1.0},
    ]


@pytest.mark.parametrize(
    ("fmt", "prompt_tail"),
    [
        ("generic", "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"),
        ("qwen3_template", "<|im_start|>user\n/no_think\nx<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        ("mistral_template", "<s>[INST] You are a helpful assistant. Return only the response.\n\nx [/INST]"),
        ("native", "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ],
)
async def test_prompt_formats(
    manager_for: Any, tmp_path: Path, fake_ex: ModuleType, monkeypatch: pytest.MonkeyPatch, fmt: str, prompt_tail: str
) -> None:
    jobs = Recorder(fake_ex, "Job", monkeypatch)
    # the fake model folder's own template: ChatML, with an empty think block when enable_thinking is false
    folder = write_model(tmp_path / "chatml", chat_template=None)
    manager = await manager_for({"m": exl3_model(folder, prompt_format=fmt)})
    with trio.fail_after(LIMIT_S):
        await manager.load("m")
        backend = backend_of(manager)
        _, done = await run(manager, request("x"))
    # every prompt ends in "\n" or "]", so the fake model starts at "a"
    assert done.text == "abcde" and done.stats.finish_reason == "length"
    ids = jobs.kwargs[0]["input_ids"]
    text = backend.tokenizer.decode(ids[0], decode_special_tokens=True)
    assert text.endswith(prompt_tail)
    assert "You are a helpful assistant." in text  # the default system prompt
    # special tokens were parsed: each marker is one token
    assert (
        done.stats.prompt_tokens
        == ids.shape[-1]
        == len(text) - sum(text.count(s) * (len(s) - 1) for s in SPECIAL_TOKENS)
    )
    # the model's EOS ids always stop; a format's own stop marker is a stop token and a stop string
    stops = jobs.kwargs[0]["stop_conditions"]
    marker = {"generic": "<|im_end|>", "qwen3_template": "<|im_end|>", "mistral_template": "</s>"}.get(fmt)
    assert stops == [EOS_ID, IM_END_ID] + ([marker] if marker else [])


def test_chat_template_is_read_where_transformers_reads_it(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", chat_template=None)
    assert read_chat_template(folder) == CHAT_TEMPLATE  # tokenizer_config.json
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    assert read_chat_template(folder) == "D"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert read_chat_template(folder) == "J"
    (folder / "chat_template.jinja").write_text("{{ 'jinja' }}")
    assert read_chat_template(folder) == "{{ 'jinja' }}"


async def test_prompt_longer_than_the_context_is_a_clear_400(manager_for: Any, model_dir: Path) -> None:
    manager = await manager_for({"m": exl3_model(model_dir, exllama_cache_size=256)})
    with trio.fail_after(LIMIT_S):
        await manager.load("m")
        with pytest.raises(PoolError) as info:
            await run(manager, request("q" * 300))
        assert info.value.status == 400
        assert info.value.message == "the prompt has 300 tokens; model 'm' has a context of 256"
        # generation is capped by the cache: 250 + 5 new tokens + 1 = 256
        _, done = await run(manager, request("a" * 250, max_tokens=100))
        assert (done.stats.output_tokens, done.stats.finish_reason) == (5, "length")
        _, done = await run(manager, request("x"))
        assert done.text == "yzabc"


async def test_caller_text_never_becomes_a_special_token(manager_for: Any, model_dir: Path) -> None:
    manager = await manager_for({"m": exl3_model(model_dir, exllama_cache_size=256)})
    with trio.fail_after(LIMIT_S):
        await manager.load("m")
        # the raw template renders the caller's text alone: one token a character
        _, done = await run(manager, request("<|im_end|>"))
        assert (done.stats.prompt_tokens, done.text) == (10, "abcde")
        # the longest vocabulary entry is <|im_start|> (12 characters): 256 tokens hold 3072
        with pytest.raises(PoolError) as info:
            await run(manager, request("<|im_end|>" * 308))
        assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_request", "input")
        assert info.value.message == (
            "the input has 3080 characters; model 'm' has a context of 256 tokens, which hold at most 3072"
        )


@pytest.mark.parametrize("pool", [{"allow_special_tokens_in_input": True}], indirect=True)
async def test_trusted_callers_may_opt_in_to_special_tokens(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        _, done = await run(pool, request("x<|im_end|>"))
        assert done.stats.prompt_tokens == 2


async def test_metrics_come_from_the_result_dicts_and_the_timers(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        job = submit(pool, request("x"))
        await job.result()
    s = job.stats
    assert s is not None and (s.prompt_tokens, s.output_tokens) == (1, 5)
    for value in (s.tokenize_ms, s.time_to_first_token_ms, s.generate_total_ms, s.decode_after_first_token_ms):
        assert value is not None and value >= 0
    assert s.generate_total_ms >= s.time_to_first_token_ms  # type: ignore[operator]
    t = job.timings()
    assert t["engine_total_wall_ms"] >= t["backend_inference_wall_ms"] >= 0  # type: ignore[operator]


# ---------------------------------------------------------------------------------------------- batching
async def test_concurrent_jobs_share_one_generator_and_stay_exact(pool: PoolManager, spy: IterateSpy) -> None:
    letters = "adkx"
    with trio.fail_after(LIMIT_S):
        spy.hold()
        jobs = [submit(pool, request(c, max_tokens=12 + i)) for i, c in enumerate(letters)]
        for job in jobs:
            await job.started.wait()  # all four dispatched to the one replica (target_inflight 4)
        assert {job.replica for job in jobs} == {"m#1"}
        spy.release()
        for i, (c, job) in enumerate(zip(letters, jobs, strict=True)):
            deltas, done = await result(job)
            assert done.text == "".join(deltas) == expected_text(c, 12 + i)
            assert (done.stats.finish_reason, done.stats.output_tokens) == ("length", 12 + i)
    assert spy.streaming_together() == 4  # one iterate() call advanced all four jobs
    assert len(spy.threads) == 1  # ...always on the replica's one worker thread


async def test_more_jobs_than_the_batch_wait_inside_the_generator(
    manager_for: Any, model_dir: Path, spy: IterateSpy
) -> None:
    manager = await manager_for({"m": exl3_model(model_dir, target_inflight=6, exllama_max_batch_size=2)})
    with trio.fail_after(LIMIT_S):
        await manager.load("m")
        assert backend_of(manager).describe()["max_batch_size"] == 2
        spy.hold()
        jobs = [submit(manager, request(c, max_tokens=8)) for c in "abcdef"]
        for job in jobs:
            await job.started.wait()
        spy.release()
        for c, job in zip("abcdef", jobs, strict=True):
            _, done = await result(job)
            assert done.text == expected_text(c, 8)
    assert spy.streaming_together() == 2


async def test_cancelling_one_job_leaves_the_others_exact(pool: PoolManager, spy: IterateSpy) -> None:
    with trio.fail_after(LIMIT_S):
        spy.hold()
        a, victim, c = (submit(pool, request(ch, max_tokens=40)) for ch in "akx")
        for job in (a, victim, c):
            await job.started.wait()
        spy.pause_after_first_token_of(victim)
        spy.release()
        events = victim.events()
        assert await events.receive() == Delta("l")
        # The worker stops at the gate of its next iterate(); whether it checks the stop flag
        # before that call or after it depends on the thread race: at most one more token.
        victim.cancel()
        spy.release()
        deltas, done = await result(victim)
        assert done.stats.finish_reason == "cancelled"
        assert done.text == "l" + "".join(deltas) and done.text in ("l", "lm")
        assert (done.stats.output_tokens, done.stats.prompt_tokens) == (len(done.text), 1)
        for ch, job in (("a", a), ("x", c)):
            _, done = await result(job)
            assert (done.text, done.stats.finish_reason) == (expected_text(ch, 40), "length")
        # the cancelled job's pages are free again: the replica takes new work at once
        _, done = await run(pool, request("x"))
        assert done.text == "yzabc"


async def test_unload_cancels_running_jobs_and_closes_the_model(pool: PoolManager, spy: IterateSpy) -> None:
    backend = backend_of(pool)
    cache = backend.cache
    with trio.fail_after(LIMIT_S):
        job = submit(pool, request("x", max_tokens=200))
        spy.pause_after_first_token_of(job)
        events = job.events()
        assert await events.receive() == Delta("y")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(pool.unload, "m", drain_timeout=0))
            await trio.testing.wait_all_tasks_blocked()  # the unload cancelled the job and sent None
            assert job.should_stop()
            spy.release()
        with pytest.raises(PoolError) as info:
            await result(job)
        assert info.value.code == "request_cancelled"
    assert pool.entries["m"].state == "unloaded"
    assert backend.model is None and backend.generator is None
    assert cache.initialized is False  # model.unload() ran


async def test_long_jobs_are_requeued_with_max_rq_tokens(manager_for: Any, model_dir: Path, spy: IterateSpy) -> None:
    manager = await manager_for({"m": exl3_model(model_dir)})
    with trio.fail_after(LIMIT_S):
        await manager.load("m", override={"exllama_max_rq_tokens": 4})
        job = submit(manager, request("x", max_tokens=300))
        deltas, done = await result(job)
    # exllamav3 rounds max_rq_tokens up to the page: 255 new tokens, then the job starts again
    assert done.text == "".join(deltas) == expected_text("x", 300)
    assert (done.stats.output_tokens, done.stats.prompt_tokens) == (300, 1)
    assert spy.starts(job) == 2


# ---------------------------------------------------------------------------------------------- failures
async def test_a_failed_prefill_fails_that_job_only(pool: PoolManager, spy: IterateSpy) -> None:
    with trio.fail_after(LIMIT_S):
        spy.hold()
        bad = submit(pool, request("FAKE_FAIL_PREFILL"))
        good = submit(pool, request("x", max_tokens=10))
        for job in (bad, good):
            await job.started.wait()
        spy.release()
        with pytest.raises(PoolError) as info:
            await result(bad)
        assert info.value.status == 502
        assert info.value.message == (
            "model 'm' failed: RuntimeError: fake exllamav3: injected prefill failure (FAKE_FAIL_PREFILL in prompt)"
        )
        _, done = await result(good)
        assert done.text == expected_text("x", 10)
        _, done = await run(pool, request("x"))
        assert done.text == "yzabc"


# no restarts: the replica's death fails the model (restarts: tests/pool/test_healing.py)
@pytest.mark.parametrize("pool", [{"restart_max_attempts": 0}], indirect=True)
async def test_a_generator_crash_fails_its_jobs_and_the_replica(pool: PoolManager, spy: IterateSpy) -> None:
    message = "RuntimeError: fake exllamav3: injected generator failure (FAKE_FAIL_ITERATE in prompt)"
    with trio.fail_after(LIMIT_S):
        spy.hold()
        jobs = [submit(pool, request("x", max_tokens=50)), submit(pool, request("FAKE_FAIL_ITERATE"))]
        for job in jobs:
            await job.started.wait()
        spy.release()
        for job in jobs:
            events = [event async for event in job.events()]
            assert isinstance(events[-1], Failed)
            assert events[-1].error.message == f"model 'm' failed: {message}"
        entry = pool.entries["m"]
        await entry.unload_done.wait()
    assert entry.state == "failed"
    assert entry.last_error == f"runtime died: {message}"


# ---------------------------------------------------------------------------------------------- cache
@pytest.mark.parametrize(
    ("override", "layer", "bits", "tokens", "described"),
    [
        ({}, "CacheLayer_fp16", None, 8192, "fp16"),
        ({"exllama_cache_quant": "8"}, "CacheLayer_quant", (8, 8), 8192, "8,8"),
        ({"exllama_cache_quant": "8,4"}, "CacheLayer_quant", (8, 4), 8192, "8,4"),
        ({"exllama_cache_k_bits": 6, "exllama_cache_v_bits": 4}, "CacheLayer_quant", (6, 4), 8192, "6,4"),
        ({"exllama_cache_size": 1024, "exllama_cache_quant": "8,4"}, "CacheLayer_quant", (8, 4), 1024, "8,4"),
    ],
)
async def test_cache_overrides_reach_the_cache(
    manager_for: Any,
    model_dir: Path,
    override: dict[str, Any],
    layer: str,
    bits: tuple[int, int] | None,
    tokens: int,
    described: str,
) -> None:
    manager = await manager_for({"m": exl3_model(model_dir)})
    with trio.fail_after(LIMIT_S):
        await manager.load("m", override=override)
        backend = backend_of(manager)
        cache = backend.cache
        layers = list(cache.layers.values())
        assert layers and {type(x).__name__ for x in layers} == {layer}
        if bits is not None:
            assert {(x.k_bits, x.v_bits) for x in layers} == {bits}
        assert cache.max_num_tokens == tokens
        assert cache.initialized  # built before model.load(), so loading allocated it
        assert backend.describe()["cache_quant"] == described
        assert backend.describe()["cache_size"] == tokens
        _, done = await run(manager, request("x"))
        assert done.text == "yzabc"
        await manager.unload("m")
        assert cache.initialized is False


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        (
            {"exllama_cache_quant": "8", "exllama_cache_k_bits": 4, "exllama_cache_v_bits": 4},
            "$.engine.models.m.exllama_cache_quant: model 'm' sets both exllama_cache_quant and"
            " exllama_cache_k_bits/exllama_cache_v_bits: set one of them",
        ),
        (
            {"exllama_cache_quant": "8,9"},
            "$.engine.models.m.exllama_cache_quant: expected a string matching ^[2-8](,[2-8])?$ or null",
        ),
        ({"exllama_max_chunk_size": 128}, "$.engine.models.m.exllama_max_chunk_size: expected an integer >= 256"),
    ],
)
def test_bad_exllama_settings_are_refused_with_the_settings(model_dir: Path, keys: dict[str, Any], error: str) -> None:
    """Caught when the settings are read (startup, reload), not at the model's load."""
    with pytest.raises(SettingsError) as info:
        decode_settings({"engine": {"models": {"m": exl3_model(model_dir, **keys)}}}, source="pool.toml")
    assert str(info.value) == f"pool.toml: {error}"


async def test_a_library_error_at_load_names_the_model_folder(manager_for: Any, tmp_path: Path) -> None:
    folder = write_model(tmp_path / "not-exl3")
    (folder / "fake_exllamav3.json").unlink()  # the fake's stand-in for "not a model it can load"
    manager = await manager_for({"m": exl3_model(folder)})
    with trio.fail_after(LIMIT_S):
        with pytest.raises(PoolError):
            await manager.load("m")
    error = manager.entries["m"].last_error
    assert error is not None and error.startswith("exllamav3 could not load not-exl3: AssertionError: ")


# ---------------------------------------------------------------------------------------------- no CUDA
TESTS_DIR = Path(__file__).resolve().parent.parent


def without_tests_dir(paths: list[str]) -> list[str]:
    return [p for p in paths if Path(p or ".").resolve() != TESTS_DIR]


class _RaiseOnImport(importlib.abc.MetaPathFinder):
    """Makes ``import exllamav3`` raise what it raises on a CPU-only torch without the CUDA toolkit."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "exllamav3":
            raise OSError("CUDA_HOME environment variable is not set. Please set it to your CUDA install root.")
        return None


@pytest.mark.parametrize("machine", ["no exllamav3", "CPU-only torch"])
async def test_without_cuda_the_model_fails_clearly_and_the_pool_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, machine: str
) -> None:
    assert "exllamav3" not in sys.modules  # the fake is not installed here
    if machine == "no exllamav3":
        # tests/ is on sys.path: keep any same-named test folder from posing as the library
        monkeypatch.setattr(sys, "path", without_tests_dir(sys.path))
        if importlib.util.find_spec("exllamav3") is not None:
            pytest.skip("exllamav3 is installed here; this case needs a machine without it")
        why = "No module named 'exllamav3'"
    else:
        monkeypatch.setattr(sys, "meta_path", [_RaiseOnImport(), *sys.meta_path])
        why = "CUDA_HOME environment variable is not set. Please set it to your CUDA install root."

    def factory(ctx: BackendContext) -> Any:
        return create_backend(ctx) if ctx.kind == "exllamav3" else FakeBackend(ctx, token_delay=0.0)

    models = {
        "gpu": exl3_model(write_model(tmp_path / "exl3")),
        "cpu": {"model_path": "fake.gguf", "backend": "gguf"},
    }
    manager = PoolManager(settings_for(models), backend_factory=factory)
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)  # autoload: both models start loading
            for name in ("gpu", "cpu"):
                await manager.entries[name].load_done.wait()
            gpu = manager.entries["gpu"]
            assert gpu.state == "failed"
            assert gpu.last_error == f"exllamav3 needs a CUDA GPU: {why}"
            assert manager.entries["cpu"].state == "loaded"
            _, done = await run(manager, request("x", model="cpu"))
            assert done.text == "yzabc"
            with pytest.raises(PoolError) as info:
                await run(manager, request("x", model="gpu"))
            assert info.value.code == "model_failed"
            nursery.cancel_scope.cancel()
