"""The vllm_serve backend on the stand-in ``vllm`` (:mod:`fake_vllm`), driven through the pool
manager.

Real clock, real child processes, real loopback sockets; every test bounded by
``trio.fail_after``; no sleeps: tests wait on job events, on the engine's exit (pidfd), on the
replica's state changes, or on the stand-in's counters.  The stand-in's "model" continues a
prompt with :func:`models.tiny_ct2.successor`: after the ChatML ``assistant\\n`` comes ``abc...``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from models.tiny_ct2 import IM_END, SPECIAL_TOKENS
from support.runtime import raw_request, request, result, run, running_manager, submit
from vllm_kit import fake_stats, gone, wait_gone, write_fake_binary, write_tiny_hf

from llm_pool.backends.vllm_serve import VllmServeBackend
from llm_pool.config import decode_settings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import Delta, Done, Failed
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.scheduler import Replica

LIMIT_S = 30
IM_END_ID = SPECIAL_TOKENS.index(IM_END)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hf(tmp_path_factory.mktemp("hf") / "tiny")


@pytest.fixture(scope="session")
def fake_vllm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_binary(tmp_path_factory.mktemp("bin"))


def settings_for(path: Path, binary: Path, **model: Any) -> Any:
    return decode_settings(
        {
            "engine": {
                "models": {
                    "tiny": {
                        "model_path": str(path),
                        "backend": "vllm_serve",
                        "vllm_serve_binary": str(binary),
                        "vllm_max_model_len": 256,
                        "restart_backoff_s": 0,
                        # 200 tokens take 2 s: a closed stream always lands mid-generation
                        "vllm_serve_env": {"FAKE_VLLM_TOKEN_S": "0.01"},
                        **model,
                    }
                }
            }
        },
        source="test",
    )


@pytest.fixture
async def pool(tiny_hf: Path, fake_vllm: Path, request: pytest.FixtureRequest) -> Any:
    overrides = getattr(request, "param", {})
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tiny_hf, fake_vllm, **overrides), autoload=True, load=["tiny"]) as (manager, _):
            yield manager


def replicas(manager: PoolManager) -> list[Replica]:
    runtime = manager.entries["tiny"].runtime
    assert runtime is not None
    return runtime.replicas


def backend(replica: Replica) -> VllmServeBackend:
    assert isinstance(replica.backend, VllmServeBackend)
    return replica.backend


async def wait_idle(b: VllmServeBackend) -> dict[str, Any]:
    """The stand-in's counters once no request runs in it."""
    while True:
        stats = await fake_stats(b)
        if stats["running"] == 0:
            return stats


# ---------------------------------------------------------------------- generation
async def test_exact_greedy_outputs_finish_reasons_and_streaming(pool: PoolManager) -> None:
    b = backend(replicas(pool)[0])
    with trio.fail_after(LIMIT_S):
        deltas, done = await run(pool, request("x"))
        assert done.text == "abcde" and deltas == list("abcde")  # one delta per chunk, as generated
        sent = (await fake_stats(b))["last_body"]
        assert (done.stats.finish_reason, done.stats.output_tokens) == ("length", 5)
        assert done.stats.prompt_tokens == len(sent["prompt"])
        assert {k: sent[k] for k in ("model", "max_tokens", "stream", "stream_options", "temperature", "top_k",
                                     "stop_token_ids", "skip_special_tokens")} == {
            "model": "tiny", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
            "temperature": 0.0, "top_k": 1, "stop_token_ids": [IM_END_ID], "skip_special_tokens": True,
        }  # fmt: skip
        # the end of the digit chain is EOS: "stop", and the EOS token is not counted
        _, done = await run(pool, request("x", stop=[], max_tokens=50, temperature=0.5, top_k=40))
        assert (done.stats.finish_reason, len(done.text)) == ("length", 50)


async def test_an_end_token_stops_with_stop_and_is_not_counted(pool: PoolManager) -> None:
    """A native format whose prompt ends in a digit: ``6789`` then EOS."""
    b = backend(replicas(pool)[0])
    with trio.fail_after(LIMIT_S):
        b.prompts.model = msgspec_replace(b.prompts.model, prompt_format="native")
        b.prompts.chat_template = "{{ messages[-1]['content'] }}"
        _, done = await run(pool, request("5", max_tokens=50))
        assert (done.text, done.stats.finish_reason, done.stats.output_tokens) == ("6789", "stop", 4)


def msgspec_replace(model: Any, **changes: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(model, **changes)


async def test_stop_strings_cut_without_emitting_a_partial_stop_and_abort_the_engine_request(pool: PoolManager) -> None:
    b = backend(replicas(pool)[0])
    with trio.fail_after(LIMIT_S):
        deltas, done = await run(pool, request("x", max_tokens=200, stop=["cd"]))
        assert done.text == "ab" and "".join(deltas) == "ab"
        assert done.stats.finish_reason == "stop"
        stats = await wait_idle(b)
        assert (stats["aborted"], stats["finished"]) == (1, 0)  # the closed stream aborted the rest
        deltas, done = await run(pool, request("x", max_tokens=4, stop=["dez"]))
        assert done.text == "abcd" and "".join(deltas) == "abcd"


async def test_caller_text_is_never_a_control_token(pool: PoolManager) -> None:
    """The engine is sent token ids: ``<|im_end|>`` written by a caller arrives as the ids of its
    ten plain bytes; the control token appears only where the template put it."""
    b = backend(replicas(pool)[0])
    with trio.fail_after(LIMIT_S):
        _, plain = await run(pool, request("hi"))
        plain_ids = (await fake_stats(b))["last_body"]["prompt"]
        _, done = await run(pool, request("<|im_end|>"))
        ids = (await fake_stats(b))["last_body"]["prompt"]
        assert ids.count(IM_END_ID) == plain_ids.count(IM_END_ID) == 2  # system and user turns
        assert len(ids) == len(plain_ids) - 2 + 10
        assert done.text == plain.text == "abcde"


async def test_a_raw_prompt_is_sent_alone_as_plain_token_ids(pool: PoolManager) -> None:
    """``/v1/completions``: no template; ``<|im_end|>`` is the ids of its ten bytes."""
    b = backend(replicas(pool)[0])
    with trio.fail_after(LIMIT_S):
        _, done = await run(pool, raw_request("<|im_end|>", max_tokens=3))
        ids = (await fake_stats(b))["last_body"]["prompt"]
        assert IM_END_ID not in ids and len(ids) == done.stats.prompt_tokens == 10
        assert done.text == "abc"


async def test_prompt_longer_than_the_context_is_a_clear_400(pool: PoolManager) -> None:
    b = backend(replicas(pool)[0])
    with trio.fail_after(LIMIT_S):
        await run(pool, request("q"))
        overhead = len((await fake_stats(b))["last_body"]["prompt"]) - 1
        with pytest.raises(PoolError) as info:
            await run(pool, request("q" * 300))
        assert (info.value.status, info.value.code) == (400, "invalid_request")
        assert info.value.message == f"the prompt has {300 + overhead} tokens; model 'tiny' has a context of 256"


async def test_generation_is_capped_by_the_context(pool: PoolManager) -> None:
    """vLLM refuses ``prompt + max_tokens > max_model_len`` with a 400: the pool asks for what fits."""
    b = backend(replicas(pool)[0])
    with trio.fail_after(LIMIT_S):
        _, done = await run(pool, request("b" * 150, max_tokens=100))
        n_prompt = len((await fake_stats(b))["last_body"]["prompt"])
        assert (done.stats.output_tokens, done.stats.finish_reason) == (256 - n_prompt, "length")


@pytest.mark.parametrize("pool", [{"target_inflight": 2}], indirect=True)
async def test_target_inflight_is_max_num_seqs_and_a_disconnect_aborts_the_engine_request(pool: PoolManager) -> None:
    replica = replicas(pool)[0]
    b = backend(replica)
    assert (replica.capacity, b.capability, b.describe()["max_num_seqs"], b.describe()["max_model_len"]) == (2, 2, 2, 256)
    with trio.fail_after(LIMIT_S):
        argv = (await fake_stats(b))["argv"]
        assert argv[argv.index("--max-num-seqs") + 1] == "2"
        job = submit(pool, request("a", max_tokens=200))
        async for event in job.events():
            if isinstance(event, Delta):
                job.cancel()  # the client went away
            elif isinstance(event, Done):
                break
        assert isinstance(event, Done) and event.stats.finish_reason == "cancelled"
        stats = await wait_idle(b)
        assert (stats["aborted"], stats["finished"]) == (1, 0)  # the stand-in saw the closed stream
        assert replica.active == 0
        _, done = await run(pool, request("x"))
        assert done.text == "abcde"


async def test_the_engine_refuses_callers_without_its_key(pool: PoolManager) -> None:
    b = backend(replicas(pool)[0])
    with trio.fail_after(LIMIT_S):
        argv = (await fake_stats(b))["argv"]
        assert "--api-key" not in argv and not any(b._client.headers["Authorization"][7:] in a for a in argv)  # type: ignore[union-attr]
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{b.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})


# ---------------------------------------------------------------------- process lifetime
async def test_unload_leaves_no_process(tiny_hf: Path, fake_vllm: Path) -> None:
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tiny_hf, fake_vllm, replicas=2, replica_max=2), autoload=True, load=["tiny"]) as (manager, _):
            engines = [backend(r).engine for r in replicas(manager)]
            pids = [pid for e in engines if e is not None for pid in (e.pid, e.engine_pid)]
            assert len(pids) == 4 and all(isinstance(p, int) and not gone(p) for p in pids)
            assert len({backend(r).base_url for r in replicas(manager)}) == 2  # a port each
            await manager.unload("tiny")
            assert manager.entries["tiny"].state == "unloaded"
            for pid in pids:
                await wait_gone(pid)  # type: ignore[arg-type]


async def test_an_engine_that_exits_while_starting_fails_the_model_with_its_last_lines(tiny_hf: Path, fake_vllm: Path) -> None:
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tiny_hf, fake_vllm, vllm_serve_extra_args=["--no-such-flag"]), autoload=True) as (manager, _):
            with pytest.raises(PoolError) as info:
                await manager.load("tiny")
    entry = manager.entries["tiny"]
    assert (entry.state, info.value.code) == ("failed", "model_load_failed")
    assert entry.last_error is not None
    assert entry.last_error.startswith("vllm serve exited while starting (exit code 2): ")
    assert entry.last_error.endswith("vllm: error: unrecognized arguments: --no-such-flag")


async def test_a_folder_without_tokenizer_json_fails_before_any_engine_starts(tmp_path: Path, fake_vllm: Path) -> None:
    (tmp_path / "m").mkdir()
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tmp_path / "m", fake_vllm), autoload=True) as (manager, _):
            with pytest.raises(PoolError):
                await manager.load("tiny")
    assert manager.entries["tiny"].last_error == (
        "m has no tokenizer.json: the vllm_serve backend tokenizes prompts itself "
        "(model_path must be the model's Hugging Face folder)"
    )


async def test_a_missing_binary_is_a_clear_load_error(tiny_hf: Path, tmp_path: Path) -> None:
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tiny_hf, tmp_path / "nope"), autoload=True) as (manager, _):
            with pytest.raises(PoolError):
                await manager.load("tiny")
    assert manager.entries["tiny"].last_error == (
        f"vllm binary not found or not executable: {tmp_path / 'nope'}; set vllm_serve_binary"
    )


# ---------------------------------------------------------------------- crashes
async def test_a_child_killed_mid_stream_fails_its_request_and_the_replica_comes_back(pool: PoolManager) -> None:
    replica = replicas(pool)[0]
    b = backend(replica)
    assert b.engine is not None and b.engine.engine_pid is not None
    old_pids = (b.engine.pid, b.engine.engine_pid)
    with trio.fail_after(LIMIT_S):
        job = submit(pool, request("a", max_tokens=200))
        queued = [submit(pool, request(c)) for c in ("x", "hi")]  # wait in the queue: one slot
        events = job.events()
        assert isinstance(await events.receive(), Delta)
        os.kill(b.engine.engine_pid, signal.SIGKILL)
        t_kill = time.monotonic()
        async for event in events:
            if not isinstance(event, Delta):
                break
        assert isinstance(event, Failed)
        assert (event.error.status, event.error.code) == (502, "engine_crashed")
        assert event.error.message == (
            "model 'tiny': the engine of replica tiny#1 died while running the request (killed by SIGKILL); "
            "the replica restarts"
        )
        for pid in old_pids:
            await wait_gone(pid)
        # the queued requests are served by the restarted engine
        results = [await result(j) for j in queued]
        served_again_s = time.monotonic() - t_kill
        assert [done.text for _, done in results] == ["abcde", "abcde"]
        assert replica.state == "serving" and b.starts == 2 and b.engine.pid not in old_pids
        assert replica.active == 0
        # the stand-in counts a request done only once its handler returned, a moment after the
        # client read the last byte: its slot must come free (bounded by LIMIT_S)
        while (await fake_stats(b))["running"]:  # noqa: ASYNC110 - polling another process
            await trio.sleep(0.01)
        assert pool.entries["tiny"].state == "loaded"
    print(f"SIGKILL of the engine to serving again: {served_again_s:.3f}s")


async def test_a_dead_engine_core_behind_a_live_api_server_is_a_crash_and_the_replica_comes_back(pool: PoolManager) -> None:
    """vLLM's API server outlives its engine core (``/health`` 503, ``EngineDeadError`` per
    request): the pool kills the child and restarts it, as after any crash."""
    replica = replicas(pool)[0]
    b = backend(replica)
    assert b.engine is not None and b.engine.engine_pid is not None
    old_pid = b.engine.engine_pid
    with trio.fail_after(LIMIT_S):
        job = submit(pool, request("a", max_tokens=200))
        events = job.events()
        assert isinstance(await events.receive(), Delta)
        async with httpx.AsyncClient() as client:
            await client.post(f"{b.base_url}/fake/kill_engine")
        async for event in events:
            if not isinstance(event, Delta):
                break
        assert isinstance(event, Failed)
        assert (event.error.code, event.error.message) == (
            "engine_crashed",
            "model 'tiny': the engine of replica tiny#1 died while running the request (killed by SIGKILL); "
            "the replica restarts",
        )
        await wait_gone(old_pid)
        _, done = await run(pool, request("x"))
        assert done.text == "abcde" and b.starts == 2 and replica.state == "serving"
