"""Every edge of every decoding field, against every backend, is a 200 or a 400 naming the
field: never a 5xx (issue 13 §5).  CTranslate2 with ``repetition_penalty: 0`` used to answer
502 ``backend_error`` with a traceback in the log.

The runtimes are real where they run on a CPU: llama.cpp (sequential and batched) on the tiny
GGUF, CTranslate2 on the tiny generator; ExLlamaV3 is its CPU fake; the remote backend talks to
the fake upstream.  Real clock and real worker threads, bounded by ``trio.fail_after``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fakes.exllamav3_model import installed_fake_exllamav3, write_fake_exl3_model
from models.tiny_ct2 import write_tiny_ct2_generator
from models.tiny_gguf import write_tiny_gguf
from support.fake_backend import FakeBackendFactory
from support.replies import assert_error
from support.server import Pool, start_pool
from support.upstream import FakeUpstream, serve_upstream

from llm_pool.backends import KINDS, create_backend

LIMIT_S = 120
KEY, KEY_ENV = "sk-edges-test", "LLM_POOL_TEST_EDGES_KEY"
MAX_TOKENS_LIMIT = 64
#: Each field's edges inside the API's ranges (``pool/api.py``), and one value between them.
EDGES: dict[str, list[Any]] = {
    "beam_size": [1, 16],
    "top_k": [1, 2, 200],
    "top_p": [1e-9, 0.5, 1.0],
    "temperature": [0.0, 1e-9, 2.0],
    "repetition_penalty": [0.0, 1e-9, 4.0],
    "max_tokens": [1, MAX_TOKENS_LIMIT],
    "stop": [[], ["zz"] * 4, ["zz"] * 5, ["zz"] * 16, ["z" * 2000]],
}
#: What each backend refuses, exactly: (field, value) → the 400's message.
REFUSED = {
    ("ct2", "repetition_penalty", 0.0): "model 'ct2' (ct2) does not accept repetition_penalty=0.0: "
    "repetition_penalty must be greater than 0",
    ("exl3", "repetition_penalty", 0.0): "model 'exl3' (exllamav3) does not accept repetition_penalty=0.0: "
    "repetition_penalty must be greater than 0",
    **{
        ("remote", "stop", n): f"model 'remote' (openai_compatible) does not accept {n} stop strings: "
        "stop must be at most 4 strings"
        for n in (5, 16)
    },
}


@pytest.fixture
def fake_exllamav3() -> Iterator[None]:
    with installed_fake_exllamav3():
        yield


def _key(name: str, field: str, value: Any) -> tuple[str, str, Any]:
    return (name, field, len(value) if isinstance(value, list) else value)


async def test_every_decoding_edge_on_every_backend_is_200_or_400(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_exllamav3: None
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    common = {"prompt_format": "generic", "n_threads": 1}
    up = FakeUpstream(api_key=KEY)
    await nursery.start(serve_upstream, up)
    models = {
        "gguf": {"model_path": str(gguf), "backend": "gguf", "gguf_n_ctx": 256, **common},
        "gguf_batched": {
            "model_path": str(gguf),
            "backend": "gguf",
            "gguf_n_ctx": 256,
            "gguf_batching": True,
            "target_inflight": 2,
            **common,
        },
        "ct2": {
            "model_path": str(write_tiny_ct2_generator(tmp_path / "ct2")),
            "backend": "ct2",
            "compute_type": "int8",
            **common,
        },
        "exl3": {
            "model_path": str(write_fake_exl3_model(tmp_path / "exl3")),
            "backend": "exllamav3",
            "prompt_format": "native",
        },
        "remote": {
            "backend": "openai_compatible",
            "remote_base_url": up.base_url,
            "remote_api_key_env": KEY_ENV,
            "remote_model": "up-model",
        },
    }
    raw = {"engine": {"max_tokens_limit": MAX_TOKENS_LIMIT, "models": models}}
    seen: dict[tuple[str, str, Any], int] = {}
    with trio.fail_after(LIMIT_S):
        pool = await start_pool(nursery, FakeBackendFactory.echo(), raw, factory=create_backend)
        assert {n: e.state for n, e in pool.manager.entries.items()} == dict.fromkeys(models, "loaded"), {
            n: e.last_error for n, e in pool.manager.entries.items()
        }
        for name in models:
            for field, values in EDGES.items():
                for value in values:
                    decoding = {"max_tokens": 4, field: value}
                    if field != "temperature":  # sampling on: greedy would skip top_k/top_p
                        decoding.setdefault("temperature", 1.0)
                    r = await pool.respond({"model": name, "input": "x", "allow_remote": True, "decoding": decoding})
                    key = _key(name, field, value)
                    seen[key] = r.status
                    if key in REFUSED:
                        assert_error(r, 400, "invalid_request", REFUSED[key], param=f"$.decoding.{field}", model=name)
                    else:
                        assert r.status == 200, (key, r.raw)
    assert len(seen) == len(models) * sum(map(len, EDGES.values()))
    assert {k for k, status in seen.items() if status == 400} == set(REFUSED)


async def test_a_refused_value_names_the_chat_field_too(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    models = {"ct2": {"model_path": str(write_tiny_ct2_generator(tmp_path / "ct2")), "backend": "ct2",
                      "compute_type": "int8", "prompt_format": "generic", "n_threads": 1}}
    with trio.fail_after(LIMIT_S):
        pool: Pool = await start_pool(nursery, FakeBackendFactory.echo(), {"engine": {"models": models}}, factory=create_backend)
        chat = {"model": "ct2", "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}
        r = await pool.post("/v1/chat/completions", chat)
        stream = await pool.respond({"model": "ct2", "input": "x", "stream": True, "decoding": {"repetition_penalty": 0}})
    message = REFUSED[("ct2", "repetition_penalty", 0.0)]
    assert_error(r, 400, "invalid_request", message, param="$.repetition_penalty", model="ct2")
    assert_error(stream, 400, "invalid_request", message, param="$.decoding.repetition_penalty", model="ct2")


def test_every_backend_kind_has_its_rules() -> None:
    assert {name: [r.field for r in kind.decoding_rules] for name, kind in KINDS.items()} == {
        "gguf": [],
        "ct2": ["repetition_penalty", "presence_penalty", "frequency_penalty"],
        "exllamav3": ["repetition_penalty"],
        "llama_server": [],
        "openai_compatible": ["stop"],
        "vllm_serve": ["repetition_penalty"],
    }


def test_every_backend_kind_says_whether_it_honours_a_seed() -> None:
    """A seed is never silently ignored: a kind either honours it (or passes it on) or refuses
    it at admission (CTranslate2: no per-request seed, see backends/decoding.py)."""
    assert {name: kind.seeded_sampling for name, kind in KINDS.items()} == {
        "gguf": True,
        "ct2": False,
        "exllamav3": True,
        "llama_server": True,
        "openai_compatible": True,
        "vllm_serve": True,
    }
