"""Prompt cache (issue 16): ``engine_cached_prompt_tokens`` from each llama.cpp engine, and a
``prompt_cache_key`` that keeps a conversation on the replica whose cache holds it, on the tiny
generated GGUF with real llama.cpp (in-process and ``llama-server`` children).

Real clock, real threads and processes: every test is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from support.runtime import request, run, running_manager, submit
from support.settings import make_settings

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make install`)")

from models.tiny_gguf import write_tiny_gguf  # noqa: E402

LIMIT_S = 60
PROMPT = "abcdefghij" * 6


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("prompt-cache") / "tiny.gguf")


ENGINES = {
    "gguf": {"backend": "gguf", "gguf_n_ctx": 256},
    "gguf_batched": {"backend": "gguf", "gguf_n_ctx": 256, "gguf_batching": True, "target_inflight": 2},
    "llama_server": {"backend": "llama_server", "llama_server_n_ctx": 256, "target_inflight": 2},
}


@pytest.mark.parametrize("engine", list(ENGINES))
async def test_a_repeated_prompt_reports_the_tokens_its_cache_held(tiny_gguf: Path, engine: str) -> None:
    fields = {"model_path": str(tiny_gguf), "prompt_format": "native", "n_threads": 1, **ENGINES[engine]}
    with trio.fail_after(LIMIT_S):
        async with running_manager(make_settings({"tiny": fields}), load=["tiny"]) as (manager, _):
            _, first = await run(manager, request(PROMPT, max_tokens=3))
            _, again = await run(manager, request(PROMPT, max_tokens=3))
            _, longer = await run(manager, request(PROMPT + "xyz", max_tokens=3))
    n = first.stats.prompt_tokens
    assert n == len(PROMPT)  # one token per character on the tiny model
    assert first.stats.cached_prompt_tokens == 0
    # every prompt token but the last (decoded again for its logits) came from the cache
    assert again.stats.cached_prompt_tokens == n - 1
    assert longer.stats.cached_prompt_tokens == n


async def test_a_prompt_cache_key_keeps_its_requests_on_one_replica(tiny_gguf: Path) -> None:
    fields = {"model_path": str(tiny_gguf), "prompt_format": "native", "n_threads": 1, "replicas": 2,
              "replica_max": 2, "gguf_n_ctx": 256}
    replicas: list[str | None] = []
    with trio.fail_after(LIMIT_S):
        async with running_manager(make_settings({"tiny": fields}), load=["tiny"]) as (manager, _):
            # short prompts: shorter than PREFIX_MIN_CHARS, so only the key keeps them together
            # (without it, two idle replicas take turns)
            for text in ("one", "two", "three"):
                req = request(PROMPT[:10] + text, max_tokens=2)
                req.prompt_cache_key = "conversation-1"
                job = submit(manager, req)
                done = await job.result()
                replicas.append(job.replica)
                cached = done.stats.cached_prompt_tokens
            assert cached == 10 + len("t")  # "two" and "three" share "t" too
    assert len(set(replicas)) == 1
    with trio.fail_after(LIMIT_S):
        async with running_manager(make_settings({"tiny": fields}), load=["tiny"]) as (manager, _):
            unkeyed = [submit(manager, request(PROMPT[:10] + text, max_tokens=2)) for text in ("one", "two")]
            for job in unkeyed:
                await job.result()
    assert len({job.replica for job in unkeyed}) == 2


