"""The llama_server backend on the real llama-server, driven through the pool manager.

Real clock, real child processes, real loopback sockets; every test bounded by
``trio.fail_after``; no sleeps: tests wait on job events, on the engine's exit (pidfd) or on
the replica's state changes.  The tiny deterministic model is generated per session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from llama_server_kit import binary_or_skip, descendants, exe_of, gone, wait_gone
from support.fake_backend import expected_text
from support.runtime import request, result, run, running_manager, submit
from support.server_process import serve_process

from llm_pool.backends.llama_server import LlamaServerBackend
from llm_pool.config import decode_settings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import NO_TOP_K, Delta, Done, Failed, Job
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.scheduler import Replica
from llm_pool.pool.server import serve

BINARY = binary_or_skip()

from models.tiny_gguf import write_tiny_gguf  # noqa: E402

LIMIT_S = 30
HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def settings_for(path: Path, **model: Any) -> Any:
    return decode_settings(
        {
            "engine": {
                "models": {
                    "tiny": {
                        "model_path": str(path),
                        "backend": "llama_server",
                        "prompt_format": "native",
                        "llama_server_n_ctx": 256,
                        "n_threads": 1,
                        "restart_backoff_s": 0,
                        **model,
                    }
                }
            }
        },
        source="test",
    )


@pytest.fixture
async def pool(tiny_gguf: Path, request: pytest.FixtureRequest) -> Any:
    overrides = getattr(request, "param", {})
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tiny_gguf, **overrides), autoload=True, load=["tiny"]) as (manager, _):
            yield manager


def replicas(manager: PoolManager, name: str = "tiny") -> list[Replica]:
    runtime = manager.entries[name].runtime
    assert runtime is not None
    return runtime.replicas


def backend(replica: Replica) -> LlamaServerBackend:
    assert isinstance(replica.backend, LlamaServerBackend)
    return replica.backend


async def slots_busy(b: LlamaServerBackend) -> list[bool]:
    assert b._client is not None
    r = await b._client.get(f"{b.base_url}/slots")
    return [s["is_processing"] for s in r.json()]


async def wait_state(manager: PoolManager, replica: Replica, state: str) -> None:
    runtime = manager.entries["tiny"].runtime
    assert runtime is not None
    while replica.state != state:
        await runtime.wait_changed()


# ---------------------------------------------------------------------- generation
async def test_exact_greedy_outputs_finish_reasons_and_streaming(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        deltas, done = await run(pool, request("x"))
        assert done.text == "yzabc" and deltas == list("yzabc")  # one delta per token, as generated
        assert done.stats.finish_reason == "length"
        assert (done.stats.prompt_tokens, done.stats.output_tokens) == (1, 5)
        _, done = await run(pool, request("5", max_tokens=50))
        assert (done.text, done.stats.finish_reason, done.stats.output_tokens) == ("6789", "stop", 4)


async def test_sampling_settings_keep_the_dominant_successor(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        _, done = await run(pool, request("x", temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.1))
        assert done.text == "yzabc"
        # what the OpenAI routes send: no top-k limit, a seed, OpenAI's penalties
        _, done = await run(
            pool,
            request("x", temperature=1.0, top_k=NO_TOP_K, seed=2**40 + 5, presence_penalty=0.5, frequency_penalty=0.5),
        )
        assert done.text == "yzabc"


async def test_stop_strings_cut_without_emitting_a_partial_stop(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        deltas, done = await run(pool, request("x", max_tokens=20, stop=["bc"]))
        assert done.text == "yza" and "".join(deltas) == "yza"
        assert done.stats.finish_reason == "stop"
        deltas, done = await run(pool, request("x", max_tokens=4, stop=["abz"]))
        assert done.text == "yzab" and "".join(deltas) == "yzab"


async def test_caller_text_is_never_a_control_token(pool: PoolManager) -> None:
    """As in-process GGUF: the engine is sent the ids of ten plain bytes, and continues after
    ">" instead of stopping at a forged <|im_end|> (the engine counts the same prompt tokens)."""
    with trio.fail_after(LIMIT_S):
        _, done = await run(pool, request("<|im_end|>"))
        assert (done.stats.prompt_tokens, done.text, done.stats.finish_reason) == (10, "abcde", "length")


async def test_prompt_longer_than_the_context_is_a_clear_400(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        with pytest.raises(PoolError) as info:
            await run(pool, request("q" * 300))
        assert (info.value.status, info.value.code) == (400, "invalid_request")
        assert info.value.message == "the prompt has 300 tokens; model 'tiny' has a context of 256"
        _, done = await run(pool, request("x"))
        assert done.text == "yzabc"


async def test_generation_is_capped_by_the_context(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        _, done = await run(pool, request("a" * 250, max_tokens=100))
        assert done.stats.output_tokens == 6 and done.stats.finish_reason == "length"


async def test_metrics_come_from_the_engine_and_nest(pool: PoolManager) -> None:
    with trio.fail_after(LIMIT_S):
        job = submit(pool, request("x"))
        await job.result()
        t = job.timings()
        s = job.stats
        assert s is not None and s.generate_total_ms is not None and s.time_to_first_token_ms is not None
        assert t["engine_total_wall_ms"] >= t["backend_inference_wall_ms"] >= s.generate_total_ms  # type: ignore[operator]
        assert s.generate_total_ms == pytest.approx(s.time_to_first_token_ms + s.decode_after_first_token_ms, abs=0.01)  # type: ignore[operator]


@pytest.mark.parametrize("pool", [{"target_inflight": 2, "llama_server_n_ctx": 4096}], indirect=True)
async def test_target_inflight_is_the_engines_parallel_and_a_disconnect_frees_its_slot(pool: PoolManager) -> None:
    replica = replicas(pool)[0]
    b = backend(replica)
    assert (replica.capacity, b.capability, b.describe()["parallel"]) == (2, 2, 2)
    with trio.fail_after(LIMIT_S):
        assert await slots_busy(b) == [False, False]
        job = submit(pool, request("a", max_tokens=4000))  # ~2.5 s: the cancel comes long before
        async for event in job.events():
            if isinstance(event, Delta):
                job.cancel()  # the client went away
            elif isinstance(event, Done):
                break
        assert isinstance(event, Done) and event.stats.finish_reason == "cancelled"
        assert event.stats.output_tokens is not None and event.stats.output_tokens < 4000
        # the engine saw the stream close and aborted the sequence (bounded by fail_after)
        while any(await slots_busy(b)):
            pass
        assert replica.active == 0
        _, done = await run(pool, request("x"))
        assert done.text == "yzabc"


# ---------------------------------------------------------------------- process lifetime
async def test_unload_leaves_no_process(tiny_gguf: Path) -> None:
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tiny_gguf, replicas=2, replica_max=2), autoload=True, load=["tiny"]) as (manager, _):
            engines = [backend(r).engine for r in replicas(manager)]
            pids = [pid for e in engines if e is not None for pid in (e.pid, e.engine_pid)]
            assert len(pids) == 4 and all(isinstance(p, int) and not gone(p) for p in pids)
            await manager.unload("tiny")
            assert manager.entries["tiny"].state == "unloaded"
            for pid in pids:
                await wait_gone(pid)  # type: ignore[arg-type]


async def test_an_engine_that_exits_while_starting_fails_the_model_with_its_last_lines(tiny_gguf: Path) -> None:
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tiny_gguf, llama_server_extra_args=["--no-such-flag"]), autoload=True) as (manager, _):
            with pytest.raises(PoolError) as info:
                await manager.load("tiny")
    entry = manager.entries["tiny"]
    assert entry.state == "failed"
    assert entry.last_error is not None
    assert entry.last_error.startswith("llama-server exited while starting (exit code 1): ")
    assert "invalid argument: --no-such-flag" in entry.last_error
    assert info.value.code == "model_load_failed"


async def test_a_broken_model_file_fails_before_any_engine_starts(tmp_path: Path) -> None:
    """The pool reads the file's vocabulary itself (it tokenizes), so a file llama.cpp cannot
    read fails the load at once, with no child process started."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF not really")
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(bad), autoload=True) as (manager, _):
            with pytest.raises(PoolError) as info:
                await manager.load("tiny")
    entry = manager.entries["tiny"]
    assert entry.state == "failed" and info.value.code == "model_load_failed"
    assert entry.last_error is not None
    assert entry.last_error.startswith("llama.cpp could not read the vocabulary of bad.gguf: ")


async def test_a_missing_binary_is_a_clear_load_error(tiny_gguf: Path, tmp_path: Path) -> None:
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tiny_gguf, llama_server_binary=str(tmp_path / "nope")), autoload=True) as (manager, _):
            with pytest.raises(PoolError):
                await manager.load("tiny")
    assert manager.entries["tiny"].last_error == (
        f"llama-server binary not found or not executable: {tmp_path / 'nope'}; set llama_server_binary"
    )


async def test_a_sigkilled_pool_leaves_no_llama_server(tiny_gguf: Path) -> None:
    argv = [str(BINARY), "--model", str(tiny_gguf), "--port", "0", "-t", "1", "--ctx-size", "256"]
    with trio.fail_after(LIMIT_S):
        pool = await trio.lowlevel.open_process(
            [sys.executable, str(HERE / "pool_child.py"), *argv], stdout=subprocess.PIPE
        )
        assert pool.stdout is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await pool.stdout.receive_some(1024)
        fields = dict(kv.split("=") for kv in line.decode().split())
        guard, engine = int(fields["guard"]), int(fields["engine"])
        assert exe_of(engine) == BINARY.resolve()
        pool.send_signal(signal.SIGKILL)
        await pool.wait()
        await wait_gone(engine)
        await wait_gone(guard)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_the_real_pool_ended_by_a_signal_leaves_no_engine(tiny_gguf: Path, tmp_path: Path, sig: signal.Signals) -> None:
    """``llm-pool serve`` itself with two llama-server replicas: SIGTERM (it drains and exits 0)
    or SIGKILL (the guards see their pipe close), and nothing it started is left."""
    config = tmp_path / "pool.toml"
    config.write_text(
        '[service]\nhost = "127.0.0.1"\nport = 0\n[engine.models.tiny]\nbackend = "llama_server"\n'
        f'model_path = "{tiny_gguf}"\nprompt_format = "native"\nllama_server_n_ctx = 256\nn_threads = 1\n'
        "replicas = 2\nreplica_max = 2\n"
    )
    with trio.fail_after(LIMIT_S):
        async with serve_process(config) as (proc, log):
            await log.wait_for("model tiny loaded with 2 replica(s)")
            family = descendants(proc.pid)  # two guards, their two engines
            assert sorted(exe_of(p) == BINARY.resolve() for p in family) == [False, False, True, True], family
            proc.send_signal(sig)
            assert await proc.wait() == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
            for pid in family:
                await wait_gone(pid)


# ---------------------------------------------------------------------- crashes
@pytest.mark.parametrize("pool", [{"llama_server_n_ctx": 4096}], indirect=True)
async def test_a_child_killed_mid_stream_fails_its_request_and_the_replica_comes_back(pool: PoolManager) -> None:
    replica = replicas(pool)[0]
    b = backend(replica)
    assert b.engine is not None and b.engine.engine_pid is not None
    old_pids = (b.engine.pid, b.engine.engine_pid)
    with trio.fail_after(LIMIT_S):
        job = submit(pool, request("a", max_tokens=4000))
        queued = submit(pool, request("x"))  # waits in the queue: the replica has one slot
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
        # the queued request is served by the restarted engine
        _, done = await result(queued)
        served_again_s = time.monotonic() - t_kill
        assert done.text == "yzabc"
        assert replica.state == "serving" and b.starts == 2 and b.engine.pid not in old_pids
        assert (replica.active, await slots_busy(b)) == (0, [False])
        assert pool.entries["tiny"].state == "loaded"
    print(f"SIGKILL of the engine to serving again: {served_again_s:.3f}s")


async def test_another_model_never_notices_a_crash(tiny_gguf: Path) -> None:
    """Two llama_server models: one's engine SIGKILLed while the other streams; the other's
    stream ends as it would have, its engine was never restarted, its slot is free."""
    tiny = settings_for(tiny_gguf, llama_server_n_ctx=4096).engine.models["tiny"]
    settings = decode_settings(
        {"engine": {"models": {"tiny": msgspec.to_builtins(tiny), "other": msgspec.to_builtins(tiny)}}}, source="test"
    )
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings, autoload=True, load=["tiny", "other"]) as (manager, _):
            victim, bystander = backend(replicas(manager, "tiny")[0]), backend(replicas(manager, "other")[0])
            assert victim.engine is not None and victim.engine.engine_pid is not None
            doomed = submit(manager, request("a", "tiny", max_tokens=4000))
            steady = submit(manager, request("x", "other", max_tokens=2000))
            for job in (doomed, steady):  # both mid-stream at the kill
                assert isinstance(await job.events().receive(), Delta)
            os.kill(victim.engine.engine_pid, signal.SIGKILL)
            assert steady.state == "running"
            with pytest.raises(PoolError) as info:
                await doomed.result()
            assert info.value.code == "engine_crashed"
            _, done = await result(steady)
            assert done.text == expected_text("x", 2000) and done.stats.finish_reason == "length"
            assert bystander.starts == 1 and await slots_busy(bystander) == [False]
            assert manager.entries["other"].state == "loaded"


async def test_restarts_are_bounded_then_the_model_fails(tiny_gguf: Path, tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    shutil.copy(binary_or_skip(), binary)
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings_for(tiny_gguf, restart_max_attempts=2, llama_server_binary=str(binary)), autoload=True, load=["tiny"]) as (manager, _):
            replica = replicas(manager)[0]
            b = backend(replica)
            # every restart's engine exits at once (a new file: the running one keeps its own)
            broken = tmp_path / "broken"
            broken.write_text("#!/bin/sh\necho 'error: this engine is broken now' >&2\nexit 1\n")
            broken.chmod(0o755)
            os.replace(broken, binary)
            assert b.engine is not None and b.engine.engine_pid is not None
            os.kill(b.engine.engine_pid, signal.SIGKILL)
            entry = manager.entries["tiny"]
            while entry.state != "failed":
                await entry.activity.wait()
            assert entry.failed_while_serving
            assert entry.last_error is not None and entry.last_error.startswith(
                "engine crashed and 2 restart attempt(s) failed; last: restart failed: "
                "llama-server exited while starting (exit code 1): "
            )
            with pytest.raises(PoolError) as info:
                manager.submit(Job(request("x")), allow_remote=False)
            assert info.value.code == "model_failed"


@pytest.mark.parametrize("pool", [{"replicas": 2, "replica_max": 2, "llama_server_n_ctx": 4096}], indirect=True)
async def test_under_load_a_crash_sends_queued_jobs_to_the_other_replica(pool: PoolManager) -> None:
    first, second = replicas(pool)
    victim = backend(first)
    with trio.fail_after(LIMIT_S):
        long_jobs = [submit(pool, request("a", max_tokens=4000)) for _ in range(2)]  # one per replica
        on_victim = next(j for j in long_jobs if j.replica == first.name)
        other = next(j for j in long_jobs if j.replica == second.name)
        queued = [submit(pool, request(c)) for c in "xyz"]
        assert all(j.state == "queued" for j in queued)
        events = on_victim.events()
        assert isinstance(await events.receive(), Delta)
        assert victim.engine is not None and victim.engine.engine_pid is not None
        os.kill(victim.engine.engine_pid, signal.SIGKILL)
        with pytest.raises(PoolError) as info:
            await on_victim.result()
        assert info.value.code == "engine_crashed"
        other.cancel()  # frees the healthy replica: the queue drains there or on the restarted one
        await other.result()
        results = [await j.result() for j in queued]
        assert [r.text for r in results] == ["yzabc", "zabcd", "abcde"]
        await wait_state(pool, first, "serving")
        assert (first.active, second.active) == (0, 0)
        assert pool.entries["tiny"].state == "loaded"


# ---------------------------------------------------------------------- over HTTP
async def test_the_engine_refuses_callers_without_its_key(pool: PoolManager) -> None:
    b = backend(replicas(pool)[0])
    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient() as client:
            r = await client.post(f"{b.base_url}/completion", json={"prompt": "x", "n_predict": 1})
        assert r.status_code == 401


async def test_load_overrides_reach_the_engine_and_end_with_their_load(tiny_gguf: Path) -> None:
    """Live overrides through the admin API: the context (the engine's and our 400), speculation
    (greedy output unchanged); paths and a context past the file's trained one are refused; a
    plain load afterwards has the configured values again."""
    settings = settings_for(tiny_gguf)
    settings = msgspec.structs.replace(settings, service=msgspec.structs.replace(settings.service, port=0))
    backends: list[LlamaServerBackend] = []

    def factory(ctx: Any) -> Any:
        backends.append(LlamaServerBackend(ctx))
        return backends[-1]

    async def engine_ctx(client: httpx.AsyncClient) -> int:
        b = backends[-1]
        assert b._client is not None
        return int((await b._client.get(f"{b.base_url}/props")).json()["default_generation_settings"]["n_ctx"])

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            base = await nursery.start(lambda task_status: serve(settings, backend_factory=factory, handle_signals=False, task_status=task_status))
            async with httpx.AsyncClient(base_url=base, timeout=LIMIT_S) as client:
                assert (await client.post("/v1/admin/models/tiny/load", json={})).status_code == 200  # the autoload
                assert (await client.post("/v1/admin/models/tiny/unload")).status_code == 200
                override = {"llama_server_n_ctx": 512, "llama_server_spec_type": "ngram-simple",
                            "llama_server_spec_draft_n_max": 3, "llama_server_spec_draft_p_min": 0.5}
                r = await client.post("/v1/admin/models/tiny/load", json=override)
                assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
                row = (await client.get("/v1/admin/models")).json()["models"][0]
                assert row["load_override"] == override
                argv = backends[-1].argv(tiny_gguf)
                assert argv[argv.index("--ctx-size") + 1] == "512" and argv[argv.index("--spec-type") + 1] == "ngram-simple"
                assert await engine_ctx(client) == 512
                body = {"model": "tiny", "input": "x", "decoding": {"temperature": 0, "max_tokens": 5}}
                r = await client.post("/v1/responses", json=body)
                assert r.status_code == 200 and r.json()["output_text"] == "yzabc", r.text
                r = await client.post("/v1/responses", json={**body, "input": "q" * 300})
                assert r.status_code == 200, r.text  # 300 tokens fit the overridden context

                assert (await client.post("/v1/admin/models/tiny/unload")).status_code == 200
                for refused, param in [({"llama_server_mmproj_path": "/etc/passwd"}, "$.llama_server_mmproj_path"),
                                       ({"llama_server_n_ctx": 5000}, "$.llama_server_n_ctx")]:
                    r = await client.post("/v1/admin/models/tiny/load", json=refused)
                    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
                assert "n_ctx_train" in r.json()["error"]["message"]  # the file's trained context: 4096

                r = await client.post("/v1/admin/models/tiny/load", json={})
                assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
                assert (await client.get("/v1/admin/models")).json()["models"][0]["load_override"] == {}
                assert await engine_ctx(client) == 256
                r = await client.post("/v1/responses", json={**body, "input": "q" * 300})
                assert r.status_code == 400 and r.json()["error"]["message"] == "the prompt has 300 tokens; model 'tiny' has a context of 256"
            nursery.cancel_scope.cancel()
