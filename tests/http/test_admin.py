"""The runtime admin API (issue 3) from outside, through quart's in-memory client.

Tests that go through ``POST .../load`` without ``force`` (it reads the GPUs on a worker
thread), ``settings/reload`` (reads files on a worker thread) and ``gpu-memory`` run on the real
clock; the fake backend then takes milliseconds.  Drain and deadline timing runs under the
autojump clock and never touches a thread (``force: true`` skips the GPU read).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.replies import Reply, assert_error
from support.server import Pool, start_pool
from trio.testing import MockClock

import llm_pool.admin.gpu
from llm_pool.admin.gpu import GpuInfo
from llm_pool.config import load_settings

ROW_KEYS = {
    "name",
    "resolved_backend",
    "configured_enabled",
    "runtime_state",
    "is_loaded",
    "replicas",
    "replica_max",
    "loaded_replicas",
    "inflight_requests",
    "queue_depth",
    "runtime_inflight",
    "configured_target_inflight",
    "effective_target_inflight",
    "last_error",
    "vram_estimate_mib",
    "vram_estimate_replica_count",
    "vram_estimate_source",
    "load_constraints",
    "load_recommendations",
    "load_override",
    "definition",
}
GPU_MODEL_KEYS = [
    "name",
    "runtime_state",
    "is_loaded",
    "configured_target_inflight",
    "effective_target_inflight",
    "vram_estimate_mib",
    "vram_estimate_replica_count",
    "vram_estimate_source",
]
SECRET = "sk-secret-123"
REMOTE = {
    "backend": "openai_compatible",
    "remote_base_url": "http://127.0.0.1:9/v1",
    "remote_model": "gpt-test",
    "remote_api_key_env": "LLMPOOL_TEST_REMOTE_KEY",
}
CATALOG = {
    "g": {"model_path": "g.gguf", "replicas": 2, "replica_max": 3, "target_inflight": 4},
    "e": {"model_path": "e-exl3", "backend": "exllamav3", "enabled": False, "replica_max": 4},
    "r": REMOTE,
    "c": {"model_path": "c-ct2", "backend": "ct2", "enabled": False},
    "b": {"model_path": "b.gguf"},
}


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic on any machine: no GPU unless a test says otherwise."""
    monkeypatch.setattr(llm_pool.admin.gpu, "read_gpus", lambda: ([], "NVML unavailable (test)"))


@pytest.fixture
async def cat(nursery: trio.Nursery, control: FakeBackendFactory, monkeypatch: pytest.MonkeyPatch) -> Pool:
    monkeypatch.setenv("LLMPOOL_TEST_REMOTE_KEY", SECRET)
    control.configure("b", fail_load="cannot map b.gguf")
    return await start_pool(nursery, control, models=CATALOG)


def rows(reply: Reply) -> dict[str, dict[str, Any]]:
    assert reply.status == 200, reply.raw
    return {r["name"]: r for r in reply.json["models"]}


async def row(pool: Pool, name: str) -> dict[str, Any]:
    r = await pool.get(f"/v1/admin/models/{name}")
    assert r.status == 200, r.raw
    return r.json


# ------------------------------------------------------------------ GET /v1/admin/models
async def test_rows_in_config_order_with_every_key(cat: Pool) -> None:
    r = await cat.get("/v1/admin/models")
    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
    models = r.json["models"]
    assert [m["name"] for m in models] == ["g", "e", "r", "c", "b"]
    for m in models:
        assert ROW_KEYS <= set(m), ROW_KEYS - set(m)
    by = rows(r)
    g = by["g"]
    assert {k: g[k] for k in ROW_KEYS - {"load_constraints", "load_recommendations", "definition"}} == {
        "name": "g",
        "resolved_backend": "gguf",
        "configured_enabled": True,
        "runtime_state": "loaded",
        "is_loaded": True,
        "replicas": 2,
        "replica_max": 3,
        "loaded_replicas": 2,
        "inflight_requests": 0,
        "queue_depth": 0,
        "runtime_inflight": 0,
        "configured_target_inflight": 4,
        "effective_target_inflight": 1,  # the fake replica can honestly run one job at a time
        "last_error": None,
        "vram_estimate_mib": None,
        "vram_estimate_replica_count": None,
        "vram_estimate_source": "unavailable",
        "load_override": {},
    }
    assert g["definition"]["model_path"] == "g.gguf" and g["definition"]["target_inflight"] == 4
    assert g["definition"] == msgspec.to_builtins(cat.settings.engine.models["g"])

    e = by["e"]
    assert (e["resolved_backend"], e["configured_enabled"], e["runtime_state"], e["is_loaded"]) == ("exllamav3", False, "unloaded", False)
    assert (e["replicas"], e["loaded_replicas"], e["effective_target_inflight"]) == (1, 0, None)

    b = by["b"]
    assert (b["runtime_state"], b["is_loaded"], b["last_error"], b["loaded_replicas"]) == ("failed", False, "cannot map b.gguf", 0)

    assert by["r"]["resolved_backend"] == "openai_compatible"
    assert by["r"]["definition"]["remote_api_key_env"] == "LLMPOOL_TEST_REMOTE_KEY"
    assert by["c"]["resolved_backend"] == "ct2"


async def test_load_constraints_and_recommendations(cat: Pool) -> None:
    """The seed's runtime-admin-api.md shapes, with llm-pool's extra keys (maximum, default,
    pattern) where it knows more."""
    by = rows(await cat.get("/v1/admin/models"))
    g, e = by["g"], by["e"]
    assert set(g["load_constraints"]) == {"replicas", "gguf_n_ctx", "gguf_flash_attn", "gguf_type_k", "gguf_type_v"}
    assert g["load_constraints"]["replicas"] == {"kind": "integer", "minimum": 1, "maximum": 3, "step": 1, "default": 2}
    assert g["load_constraints"]["gguf_flash_attn"] == {
        "kind": "enum",
        "allowed_values": ["on", "off", "auto"],
        "default": "auto",
        "examples": ["auto", "on", "off"],
    }
    assert g["load_constraints"]["gguf_n_ctx"] == {
        "kind": "integer", "minimum": 1, "maximum": 2**32 - 1, "step": 1, "default": 2048
    }
    for key in ("gguf_type_k", "gguf_type_v"):
        assert g["load_constraints"][key] == {
            "kind": "string_or_null",
            "format": "ggml_type_name",
            "default": "f16",  # configured null: llama.cpp's own type
            "null_means": "f16",
            "allowed_values": ["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"],
            "examples": ["f16", "q8_0", "q4_0"],
        }
    pairs = g["load_recommendations"]["gguf_cache_type_pairs"]
    assert set(g["load_recommendations"]) == {"gguf_cache_type_pairs"}
    assert (pairs["kind"], pairs["fields"]) == ("pair_presets", ["gguf_type_k", "gguf_type_v"])
    assert pairs["recommended_pairs"] == [
        {"label": "f16/f16", "gguf_type_k": "f16", "gguf_type_v": "f16"},
        {"label": "q8_0/q8_0", "gguf_type_k": "q8_0", "gguf_type_v": "q8_0"},
        {"label": "q4_0/q4_0", "gguf_type_k": "q4_0", "gguf_type_v": "q4_0"},
    ]
    assert pairs["notes"] and all(isinstance(n, str) for n in pairs["notes"])
    assert set(e["load_constraints"]) == {
        "replicas",
        "exllama_cache_size",
        "exllama_cache_k_bits",
        "exllama_cache_v_bits",
        "exllama_cache_quant",
        "exllama_max_rq_tokens",
    }
    assert e["load_constraints"]["exllama_cache_size"] == {"kind": "integer", "minimum": 256, "step": 256, "default": 8192}
    for key in ("exllama_cache_k_bits", "exllama_cache_v_bits"):
        assert e["load_constraints"][key] == {
            "kind": "integer_or_null",
            "minimum": 2,
            "maximum": 8,
            "step": 1,
            "default": None,
            "null_means": "fp16",
            "allowed_values": [2, 3, 4, 5, 6, 7, 8],
        }
    quant = e["load_constraints"]["exllama_cache_quant"]
    assert (quant["kind"], quant["format"], quant["null_means"]) == ("string_or_null", "<bits>|<k_bits>,<v_bits>", "fp16")
    assert e["load_constraints"]["exllama_max_rq_tokens"]["kind"] == "integer_or_null"
    bits = e["load_recommendations"]["exllama_cache_bit_pairs"]
    assert (bits["kind"], bits["fields"]) == ("pair_presets", ["exllama_cache_k_bits", "exllama_cache_v_bits"])
    assert [p["label"] for p in bits["recommended_pairs"]] == ["fp16", "8/8", "8/4"]
    assert bits["recommended_pairs"][2] == {"label": "8/4", "exllama_cache_k_bits": 8, "exllama_cache_v_bits": 4}
    for name in ("r", "c"):  # backends without load overrides
        assert by[name]["load_recommendations"] == {}
        assert set(by[name]["load_constraints"]) == {"replicas"}


async def test_single_row_and_unknown(cat: Pool) -> None:
    assert (await row(cat, "g"))["name"] == "g"
    assert_error(await cat.get("/v1/admin/models/zz"), 404, "unknown_model", "unknown model 'zz'", model="zz")


async def test_no_secret_anywhere(cat: Pool) -> None:
    assert os.environ["LLMPOOL_TEST_REMOTE_KEY"] == SECRET
    replies = [
        await cat.get("/v1/admin/models"),
        await cat.get("/v1/admin/models/r"),
        await cat.get("/v1/admin/gpu-memory"),
        await cat.post("/v1/admin/models/r/unload"),
        await cat.post("/v1/admin/models/r/load"),
        await cat.post("/v1/admin/models/r/load", {"gguf_n_ctx": 1}),
        await cat.respond({"model": "r", "input": "hello"}),
        await cat.respond({"model": "r", "input": "hello", "allow_remote": True}),
        await cat.get("/v1/models"),
    ]
    assert [x.status for x in replies] == [200, 200, 200, 200, 200, 400, 403, 200, 200]
    for x in replies:
        assert SECRET not in x.text


# ------------------------------------------------------------------ POST .../load
BAD_LOADS = [
    ("g", {"exllama_cache_size": 512}, "unsupported load override for gguf backend: exllama_cache_size"),
    ("g", {"exllama_cache_k_bits": 8, "exllama_cache_v_bits": 8}, "unsupported load override for gguf backend: exllama_cache_k_bits"),
    ("e", {"gguf_n_ctx": 1024}, "unsupported load override for exllamav3 backend: gguf_n_ctx"),
    ("c", {"gguf_flash_attn": "on"}, "unsupported load override for ct2 backend: gguf_flash_attn"),
    ("r", {"exllama_max_rq_tokens": 4}, "unsupported load override for openai_compatible backend: exllama_max_rq_tokens"),
    ("e", {"replicas": 5}, "replica count 5 exceeds replica_max 4 for model 'e'"),
    ("c", {"replicas": 2}, "replica count 2 exceeds replica_max 1 for model 'c'"),
    # the messages below are generated from GGUFModel's / ExLlamaV3Model's own annotations
    ("g", {"gguf_flash_attn": "maybe"}, 'invalid load override: $.gguf_flash_attn: expected one of "auto", "off", "on"'),
    ("g", {"gguf_flash_attn": ""}, 'invalid load override: $.gguf_flash_attn: expected one of "auto", "off", "on"'),
    ("g", {"gguf_type_k": "q7_0"}, 'invalid load override: $.gguf_type_k: expected one of "bf16", "f16", "f32", "iq4_nl", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0" or null'),
    ("g", {"gguf_type_v": "int8"}, 'invalid load override: $.gguf_type_v: expected one of "bf16", "f16", "f32", "iq4_nl", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0" or null'),
    ("e", {"exllama_cache_k_bits": 8}, "exllama_cache_k_bits and exllama_cache_v_bits must be provided together"),
    ("e", {"exllama_cache_v_bits": 4}, "exllama_cache_k_bits and exllama_cache_v_bits must be provided together"),
    ("e", {"exllama_cache_k_bits": 8, "exllama_cache_v_bits": None}, "exllama_cache_k_bits and exllama_cache_v_bits must both be null (fp16) or both set"),
    ("e", {"exllama_cache_k_bits": 9, "exllama_cache_v_bits": 8}, "invalid load override: $.exllama_cache_k_bits: expected an integer from 2 to 8 or null"),
    ("e", {"exllama_cache_k_bits": 8, "exllama_cache_v_bits": 1}, "invalid load override: $.exllama_cache_v_bits: expected an integer from 2 to 8 or null"),
    ("e", {"exllama_cache_quant": "9"}, "invalid load override: $.exllama_cache_quant: expected a string matching ^[2-8](,[2-8])?$ or null"),
    ("e", {"exllama_cache_quant": "8, 4"}, "invalid load override: $.exllama_cache_quant: expected a string matching ^[2-8](,[2-8])?$ or null"),
    (
        "e",
        {"exllama_cache_quant": "8", "exllama_cache_k_bits": 8, "exllama_cache_v_bits": 8},
        "exllama_cache_quant cannot be combined with exllama_cache_k_bits/exllama_cache_v_bits",
    ),
    ("e", {"exllama_cache_size": 300}, "invalid load override: $.exllama_cache_size: expected an integer >= 256 (a multiple of 256)"),
    ("e", {"exllama_cache_size": 0}, "invalid load override: $.exllama_cache_size: expected an integer >= 256 (a multiple of 256)"),
    ("e", {"exllama_cache_size": -256}, "invalid load override: $.exllama_cache_size: expected an integer >= 256 (a multiple of 256)"),
    ("g", {"replicas": 0}, "invalid load override: $.replicas: expected an integer >= 1"),
    ("g", {"gguf_n_ctx": 0}, "invalid load override: $.gguf_n_ctx: expected an integer from 1 to 4294967295"),
    ("e", {"exllama_max_rq_tokens": 0}, "invalid load override: $.exllama_max_rq_tokens: expected an integer >= 1 or null"),
    ("g", {"model_path": "/etc/passwd"}, "unsupported load override for gguf backend: model_path"),
    ("g", {"replicas": "2"}, "invalid load override: $.replicas: expected an integer >= 1"),
    ("g", [], "invalid request body: $: expected an object"),
]


@pytest.mark.parametrize(("name", "payload", "message"), BAD_LOADS, ids=[m for _, _, m in BAD_LOADS])
async def test_rejected_loads(nursery: trio.Nursery, control: FakeBackendFactory, name: str, payload: Any, message: str) -> None:
    pool = await start_pool(nursery, control, models=CATALOG, autoload=False)
    r = await pool.post(f"/v1/admin/models/{name}/load", payload)
    assert_error(r, 400, "invalid_load_request", message)
    assert pool.manager.entries[name].state == "unloaded"  # never left "loading"
    assert not control.contexts


async def test_load_bodies_that_are_not_json(nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool = await start_pool(nursery, control, models=CATALOG, autoload=False)
    for raw in (b"{", b"replicas=2", b'{"replicas": 2, "gguf_flash_attn": "\xff"}'):
        err = assert_error(await pool.post("/v1/admin/models/g/load", raw=raw), 400, "invalid_load_request")
        assert err["message"].startswith("invalid JSON body: "), err
    assert pool.manager.entries["g"].state == "unloaded"


async def test_load_unknown_model(cat: Pool) -> None:
    assert_error(await cat.post("/v1/admin/models/zz/load"), 404, "unknown_model", "unknown model 'zz'", model="zz")


async def test_load_with_overrides_is_runtime_only(nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool = await start_pool(nursery, control, models=CATALOG, autoload=False)
    r = await pool.post(
        "/v1/admin/models/g/load",
        {"replicas": 3, "gguf_n_ctx": 4096, "gguf_flash_attn": "ON", "gguf_type_k": "Q8_0", "gguf_type_v": None},
    )
    assert r.status == 200, r.raw
    g = r.json
    assert (g["runtime_state"], g["is_loaded"], g["replicas"], g["loaded_replicas"]) == ("loaded", True, 3, 3)
    assert g["load_override"] == {"gguf_n_ctx": 4096, "gguf_flash_attn": "on", "gguf_type_k": "q8_0", "gguf_type_v": None}
    assert g["definition"]["gguf_n_ctx"] == 2048  # the configuration is untouched
    assert g["definition"]["gguf_flash_attn"] == "auto"
    model = control.contexts[0].model  # what the backend was given
    assert (model.gguf_n_ctx, model.gguf_flash_attn, model.gguf_type_k, model.gguf_type_v) == (4096, "on", "q8_0", None)
    assert [c.replica_index for c in control.contexts] == [1, 2, 3]

    r = await pool.post(
        "/v1/admin/models/e/load", {"exllama_cache_k_bits": 8, "exllama_cache_v_bits": 4, "exllama_cache_size": 512}
    )
    assert r.status == 200, r.raw
    assert r.json["load_override"] == {
        "exllama_cache_size": 512,
        "exllama_cache_k_bits": 8,
        "exllama_cache_v_bits": 4,
        "exllama_cache_quant": None,
    }
    r = await pool.post("/v1/admin/models/c/load", {})
    assert r.status == 200 and r.json["load_override"] == {}

    # unload + plain load: back to the configuration (no override is active once unloaded)
    assert (await pool.post("/v1/admin/models/g/unload")).json["load_override"] == {}
    r = await pool.post("/v1/admin/models/g/load")
    assert (r.json["load_override"], r.json["replicas"]) == ({}, 2)


async def test_exllama_quant_string_clears_the_bits(nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool = await start_pool(nursery, control, models=CATALOG, autoload=False)
    r = await pool.post("/v1/admin/models/e/load", {"exllama_cache_quant": "8,4"})
    assert r.status == 200, r.raw
    assert r.json["load_override"] == {
        "exllama_cache_quant": "8,4",
        "exllama_cache_k_bits": None,
        "exllama_cache_v_bits": None,
    }
    await pool.post("/v1/admin/models/e/unload")
    r = await pool.post("/v1/admin/models/e/load", {"exllama_cache_k_bits": None, "exllama_cache_v_bits": None})
    assert r.status == 200, r.raw  # null + null = fp16
    assert r.json["load_override"]["exllama_cache_k_bits"] is None


async def test_loaded_model_plain_load_is_idempotent_overrides_are_not(cat: Pool) -> None:
    before = await row(cat, "g")
    for plain in (None, {}, {"force": True}):
        r = await cat.post("/v1/admin/models/g/load", plain)
        assert r.status == 200 and r.json == before
    for payload in ({"replicas": 1}, {"replicas": 2}, {"gguf_n_ctx": 512}):
        assert_error(
            await cat.post("/v1/admin/models/g/load", payload),
            400,
            "invalid_load_request",
            "model 'g' is loaded; overrides and replicas apply to a new load only: unload first",
            model="g",
        )
    assert await row(cat, "g") == before
    assert len([c for c in cat.control.contexts if c.name == "g"]) == 2  # nothing was reloaded


async def test_failed_load_is_500_and_leaves_failed(nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    control.configure("g", fail_load="out of memory while mapping g.gguf")
    pool = await start_pool(nursery, control, models=CATALOG, autoload=False)
    r = await pool.post("/v1/admin/models/g/load", {"replicas": 3})
    err = assert_error(
        r, 500, "model_load_failed", "model 'g' failed to load: out of memory while mapping g.gguf", model="g"
    )
    assert err["type"] == "server_error"
    g = await row(pool, "g")
    assert (g["runtime_state"], g["is_loaded"], g["loaded_replicas"], g["last_error"]) == (
        "failed", False, 0, "out of memory while mapping g.gguf",
    )
    assert sorted(control.closed) == []  # the fake's load raised: nothing was opened
    assert (await pool.get("/v1/models")).json["models"] == []
    assert_error(await pool.respond({"model": "g", "input": "x"}), 409, "model_failed")

    # the runtime recovers: a new load of a failed model works and clears last_error
    control.configure("g", fail_load=None)
    r = await pool.post("/v1/admin/models/g/load")
    assert r.status == 200
    assert (r.json["runtime_state"], r.json["last_error"]) == ("loaded", None)


async def test_partially_failed_load_closes_the_replicas_that_loaded(nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    class OneBad:
        def __init__(self) -> None:
            self.inner = control

        def __call__(self, ctx):  # type: ignore[no-untyped-def]
            backend = self.inner(ctx)
            if ctx.replica_index == 2:
                async def boom() -> None:
                    raise RuntimeError("replica 2 exploded")

                backend.load = boom  # type: ignore[method-assign]
            return backend

    pool = await start_pool(nursery, control, models=CATALOG, autoload=False, factory=OneBad())
    assert_error(await pool.post("/v1/admin/models/g/load", {"replicas": 3}), 500, "model_load_failed",
                 "model 'g' failed to load: replica 2 exploded")
    assert sorted(control.loaded) == sorted(control.closed) == ["g#1", "g#3"]  # nothing half-loaded
    assert pool.manager.entries["g"].state == "failed"


async def test_load_while_loading_waits_and_overrides_are_refused(nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    control.configure("g", load_delay=0.2)
    pool = await start_pool(nursery, control, models=CATALOG, wait=False)
    assert pool.manager.entries["g"].state == "loading"
    assert_error(
        await pool.post("/v1/admin/models/g/load", {"gguf_n_ctx": 8}),
        400,
        "invalid_load_request",
        "model 'g' is loading; overrides and replicas apply to a new load only: unload first",
    )
    assert_error(
        await pool.post("/v1/admin/models/g/unload"), 409, "model_loading", "model 'g' is loading; unload it once loaded"
    )
    with trio.fail_after(5):
        r = await pool.post("/v1/admin/models/g/load")
    assert r.status == 200 and r.json["runtime_state"] == "loaded"


# ------------------------------------------------------------------ GPU memory guard
def fake_gpus(free_mib: int = 100, total_mib: int = 1000) -> tuple[list[GpuInfo], None]:
    used = total_mib - free_mib
    return [GpuInfo(index=0, name="Fake GPU", used_mib=used, total_mib=total_mib, free_mib=free_mib,
                    used_over_total=f"{used}MiB / {total_mib}MiB")], None


async def test_insufficient_gpu_memory(nursery: trio.Nursery, control: FakeBackendFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm_pool.admin.gpu, "read_gpus", lambda: fake_gpus(free_mib=100))
    weights = tmp_path / "big-exl3"
    weights.mkdir()
    with (weights / "model.safetensors").open("wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GiB of size, no disk
    with (tmp_path / "cpu.gguf").open("wb") as f:
        f.truncate(2 * 2**30)
    models = {
        "big": {"model_path": "big-exl3", "backend": "exllamav3", "enabled": False, "replica_max": 2},
        "cpu": {"model_path": "cpu.gguf", "enabled": False},
    }
    pool = await start_pool(nursery, control, models=models, base_dir=tmp_path)
    big = await row(pool, "big")
    assert (big["vram_estimate_mib"], big["vram_estimate_replica_count"], big["vram_estimate_source"]) == (
        3072.0, 1, "model_artifact_size",
    )
    assert_error(
        await pool.post("/v1/admin/models/big/load"),
        409,
        "insufficient_gpu_memory",
        "model 'big' needs about 3072 MiB for 1 replica(s) but only 100 MiB of GPU memory is free; "
        "pass force=true to load anyway",
        model="big",
    )
    assert_error(
        await pool.post("/v1/admin/models/big/load", {"replicas": 2}),
        409,
        "insufficient_gpu_memory",
        "model 'big' needs about 6144 MiB for 2 replica(s) but only 100 MiB of GPU memory is free; "
        "pass force=true to load anyway",
    )
    assert pool.manager.entries["big"].state == "unloaded" and not control.contexts
    # a CPU model is never refused for GPU memory
    assert (await pool.post("/v1/admin/models/cpu/load")).status == 200
    r = await pool.post("/v1/admin/models/big/load", {"force": True})
    assert r.status == 200 and r.json["runtime_state"] == "loaded"

    mem = await pool.get("/v1/admin/gpu-memory")
    assert mem.status == 200
    assert mem.json["gpus"] == [
        {"index": 0, "name": "Fake GPU", "used_mib": 900, "total_mib": 1000, "used_over_total": "900MiB / 1000MiB"}
    ]
    assert mem.json["error"] is None


async def test_vram_estimate_from_the_observed_load_delta(nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool = await start_pool(nursery, control, models=CATALOG, autoload=False)
    readings = iter([1000.0, 1600.0])
    pool.manager.gpu_used_mib = lambda: next(readings)
    assert (await pool.post("/v1/admin/models/g/load", {"replicas": 2})).status == 200
    g = await row(pool, "g")
    assert (g["vram_estimate_mib"], g["vram_estimate_replica_count"], g["vram_estimate_source"]) == (600.0, 2, "observed_load_delta")
    g = (await pool.post("/v1/admin/models/g/unload")).json
    assert (g["vram_estimate_mib"], g["vram_estimate_source"]) == (600.0, "observed_load_delta")  # kept across unload


async def test_gpu_memory_without_a_gpu(nursery: trio.Nursery, control: FakeBackendFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real NVML reader
    pool = await start_pool(nursery, control, models=CATALOG)
    gpus, error = llm_pool.admin.gpu.read_gpus()
    r = await pool.get("/v1/admin/gpu-memory")
    assert r.status == 200
    body = r.json
    assert list(body) == ["gpus", "models", "error"]
    if gpus:  # a machine with an NVIDIA GPU
        assert body["error"] is None
        for g in body["gpus"]:
            assert list(g) == ["index", "name", "used_mib", "total_mib", "used_over_total"]
            assert g["used_over_total"] == f"{g['used_mib']}MiB / {g['total_mib']}MiB"
    else:
        assert body["gpus"] == []
        assert body["error"] == error
        assert body["error"].startswith("NVML unavailable (no NVIDIA GPU or driver): ")
    assert [m["name"] for m in body["models"]] == ["g", "e", "r", "c", "b"]
    for m in body["models"]:
        assert list(m) == GPU_MODEL_KEYS
    g = body["models"][0]
    assert (g["runtime_state"], g["is_loaded"], g["configured_target_inflight"], g["effective_target_inflight"]) == (
        "loaded", True, 4, 1,
    )


# ------------------------------------------------------------------ POST .../unload
async def test_unload_states(cat: Pool) -> None:
    assert_error(await cat.post("/v1/admin/models/zz/unload"), 404, "unknown_model", "unknown model 'zz'")
    e = await cat.post("/v1/admin/models/e/unload")  # never loaded: no-op
    assert e.status == 200 and e.json["runtime_state"] == "unloaded"
    b = await cat.post("/v1/admin/models/b/unload")  # failed: no-op, stays failed with its error
    assert b.status == 200 and (b.json["runtime_state"], b.json["last_error"]) == ("failed", "cannot map b.gguf")
    g = await cat.post("/v1/admin/models/g/unload")
    assert g.status == 200
    assert {k: g.json[k] for k in ("runtime_state", "is_loaded", "replicas", "loaded_replicas", "inflight_requests", "effective_target_inflight")} == {
        "runtime_state": "unloaded", "is_loaded": False, "replicas": 2, "loaded_replicas": 0, "inflight_requests": 0,
        "effective_target_inflight": None,
    }
    assert sorted(cat.control.closed) == ["g#1", "g#2"]
    assert (await cat.post("/v1/admin/models/g/unload")).json["runtime_state"] == "unloaded"  # again: no-op
    assert (await cat.get("/v1/models")).json["models"] == ["r"]


@pytest.mark.parametrize(("query", "message"), [
    ({"drain_timeout_s": "-1"}, "query parameter drain_timeout_s must be a number >= 0"),
    ({"drain_timeout_s": "soon"}, "query parameter drain_timeout_s must be a number >= 0"),
    ({"drain_timeout_s": "inf"}, "query parameter drain_timeout_s must be a number >= 0"),
    ({"drain_timeout_s": "nan"}, "query parameter drain_timeout_s must be a number >= 0"),
    ({"force": "maybe"}, "query parameter force must be true or false"),
])
async def test_unload_bad_query(cat: Pool, query: dict[str, str], message: str) -> None:
    param = next(iter(query))
    assert_error(await cat.post("/v1/admin/models/g/unload", query=query), 400, "invalid_request", message, param=param)
    assert cat.manager.entries["g"].state == "loaded"


async def test_unload_bad_body(cat: Pool) -> None:
    assert_error(
        await cat.post("/v1/admin/models/g/unload", {"drain_timeout_s": -1}),
        400, "invalid_request", "invalid request body: $.drain_timeout_s: expected a number >= 0 or null",
        param="$.drain_timeout_s",
    )
    assert cat.manager.entries["g"].state == "loaded"


async def busy_model(nursery: trio.Nursery, control: FakeBackendFactory, *, running: str, queued: int, stream: bool = False) -> tuple[Pool, list[Any]]:
    """Model ``m`` (1 replica, 1 slot) running ``running`` with ``queued`` requests waiting."""
    pool = await start_pool(nursery, control)
    replies: list[Any] = []

    async def call(text: str) -> None:
        if stream:
            replies.append((text, await pool.stream({"model": "m", "input": text, "stream": True})))
        else:
            replies.append((text, await pool.respond({"model": "m", "input": text})))

    nursery.start_soon(call, running)
    await pool.wait_until(lambda: control.started == [running])
    for i in range(queued):
        nursery.start_soon(call, f"queued {i}")
    await pool.wait_until(lambda: pool.manager.entries["m"].runtime.waiting == queued)  # type: ignore[union-attr]
    return pool, replies


async def test_counts_include_queued_requests(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool, _ = await busy_model(nursery, control, running="wait:5", queued=2)
    m = await row(pool, "m")
    assert (m["inflight_requests"], m["queue_depth"], m["runtime_inflight"]) == (3, 2, 1)


async def test_graceful_unload_under_load(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool, replies = await busy_model(nursery, control, running="wait:5", queued=3)
    t0 = trio.current_time()
    r = await pool.post("/v1/admin/models/m/unload")
    assert trio.current_time() - t0 == pytest.approx(5.0, abs=0.05)  # waited for the running job
    assert r.status == 200 and r.json["runtime_state"] == "unloaded"
    await pool.wait_until(lambda: len(replies) == 4)
    by = dict(replies)
    assert by["wait:5"].status == 200 and by["wait:5"].json["output_text"] == "waited"
    for i in range(3):
        assert_error(by[f"queued {i}"], 409, "model_unloading", "model 'm' is unloading", model="m")
    assert control.started == ["wait:5"]  # no queued job reached the backend
    assert control.closed == ["m#1"]
    # load afterwards serves again (force: skip the GPU read, which needs a thread)
    assert (await pool.post("/v1/admin/models/m/load", {"force": True})).json["runtime_state"] == "loaded"
    assert (await pool.respond({"model": "m", "input": "again"})).json["output_text"] == "again"


@pytest.mark.parametrize("how", ["query", "body"])
async def test_unload_drain_deadline(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory, how: str) -> None:
    pool, replies = await busy_model(nursery, control, running="wait:100", queued=1)
    t0 = trio.current_time()
    if how == "query":
        r = await pool.post("/v1/admin/models/m/unload", query={"drain_timeout_s": "3"})
    else:
        r = await pool.post("/v1/admin/models/m/unload", {"drain_timeout_s": 3})
    assert trio.current_time() - t0 == pytest.approx(3.0, abs=0.05)
    assert r.status == 200 and r.json["runtime_state"] == "unloaded"
    await pool.wait_until(lambda: len(replies) == 2)
    by = dict(replies)
    assert_error(
        by["wait:100"], 503, "request_cancelled",
        "request to model 'm' was cancelled: model unloaded; the request did not finish within the 3s drain",
        model="m",
    )
    assert_error(by["queued 0"], 409, "model_unloading")


async def test_unload_force_cancels_a_stream_at_once(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool, replies = await busy_model(nursery, control, running="wait:100", queued=0, stream=True)
    t0 = trio.current_time()
    r = await pool.post("/v1/admin/models/m/unload", query={"force": "true"})
    assert trio.current_time() - t0 < 0.05
    assert r.status == 200 and r.json["runtime_state"] == "unloaded"
    await pool.wait_until(lambda: len(replies) == 1)
    stream = replies[0][1]
    assert stream.status == 200
    events = stream.events()
    assert [e for e, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "error",
    ]
    assert events[-1][1]["code"] == "request_cancelled"
    assert events[-1][1]["sequence_number"] == 4


async def test_unload_while_unloading_waits_for_the_same_unload(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool, _ = await busy_model(nursery, control, running="wait:4", queued=0)
    first: list[Reply] = []
    nursery.start_soon(lambda: _append(first, pool.post("/v1/admin/models/m/unload")))
    await pool.wait_state("m", "unloading")
    assert_error(await pool.post("/v1/admin/models/m/load"), 409, "model_unloading", "model 'm' is unloading", model="m")
    second = await pool.post("/v1/admin/models/m/unload")
    assert second.status == 200 and second.json["runtime_state"] == "unloaded"
    await pool.wait_until(lambda: bool(first))
    assert first[0].json["runtime_state"] == "unloaded"


async def _append(out: list[Any], coro: Any) -> None:
    out.append(await coro)


# ------------------------------------------------------------------ POST .../replicas
async def test_resize_live(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    pool = await start_pool(nursery, control)  # m: 1 replica, replica_max 3
    results: list[Reply] = []

    async def traffic() -> None:
        async with trio.open_nursery() as inner:
            for i in range(40):
                inner.start_soon(_append, results, pool.respond({"model": "m", "input": f"r{i} a b"}))
                await trio.sleep(0.01)

    nursery.start_soon(traffic)
    await trio.sleep(0.05)
    r = await pool.post("/v1/admin/models/m/replicas", {"replicas": 3})
    assert r.status == 200
    assert (r.json["replicas"], r.json["loaded_replicas"], r.json["runtime_state"]) == (3, 3, "loaded")
    await trio.sleep(0.1)
    r = await pool.post("/v1/admin/models/m/replicas", {"replicas": 1})
    assert r.status == 200 and (r.json["replicas"], r.json["loaded_replicas"]) == (1, 1)
    await pool.wait_until(lambda: len(results) == 40)
    assert sorted(x.status for x in results) == [200] * 40  # nothing dropped by the resizes
    assert {c.replica_index for c in control.contexts} == {1, 2, 3}
    assert sorted(control.closed) == ["m#2", "m#3"]
    assert pool.settings.engine.models["m"].replicas == 1  # runtime only


async def test_resize_errors(autojump_clock: MockClock, nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    models = {"m": {"model_path": "m.gguf", "replica_max": 3}, "off": {"model_path": "o.gguf", "enabled": False}}
    pool = await start_pool(nursery, control, models=models)
    assert_error(
        await pool.post("/v1/admin/models/m/replicas", {"replicas": 4}),
        400, "invalid_request", "replica count 4 exceeds replica_max 3 for model 'm'", param="replicas",
    )
    assert_error(
        await pool.post("/v1/admin/models/m/replicas", {"replicas": 0}),
        400, "invalid_request", "invalid request body: $.replicas: expected an integer >= 1", param="$.replicas",
    )
    assert_error(
        await pool.post("/v1/admin/models/m/replicas"),
        400, "invalid_request", "invalid request body: $.replicas: required field is missing", param="$.replicas",
    )
    assert_error(
        await pool.post("/v1/admin/models/off/replicas", {"replicas": 1}),
        409, "model_not_loaded", "model 'off' is unloaded; only a loaded model can be resized",
    )
    assert_error(await pool.post("/v1/admin/models/zz/replicas", {"replicas": 1}), 404, "unknown_model")
    assert (await row(pool, "m"))["loaded_replicas"] == 1


# ------------------------------------------------------------------ POST /v1/admin/settings/reload
def model_toml(name: str, **fields: Any) -> str:
    def value(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    return f'[engine.models."{name}"]\n' + "".join(f"{k} = {value(v)}\n" for k, v in fields.items())


def catalog_toml(*models: str, service: str = "", decoding: str = "") -> str:
    return "[service]\nport = 8000\n" + service + "\n[engine.decoding]\n" + decoding + "\n" + "".join(models)


A = model_toml("a", model_path="a.gguf")
B = model_toml("b", model_path="b.gguf", enabled=False)
C = model_toml("c", model_path="c.gguf", enabled=False)


@pytest.fixture
async def files(nursery: trio.Nursery, control: FakeBackendFactory, tmp_path: Path) -> tuple[Pool, Path]:
    main = tmp_path / "pool.toml"
    main.write_text(catalog_toml(A, B, C))
    pool = await start_pool(nursery, control, settings=load_settings(main), config_path=str(main))
    return pool, main


async def names(pool: Pool) -> list[str]:
    return [r["name"] for r in (await pool.get("/v1/admin/models")).json["models"]]


async def test_reload_reports_the_catalog_change(files: tuple[Pool, Path]) -> None:
    pool, main = files
    d = model_toml("d", model_path="d.gguf")  # enabled, but a reload never loads anything
    main.write_text(catalog_toml(A, model_toml("b", model_path="b.gguf", enabled=False, prompt_format="native"), d))
    r = await pool.post("/v1/admin/settings/reload")
    assert r.status == 200, r.raw
    assert r.json == {
        "added_models": ["d"],
        "removed_models": ["c"],
        "updated_models": ["b"],
        "unchanged_models": ["a"],
        "service_restart_required": False,
    }
    assert await names(pool) == ["a", "b", "d"]
    by = rows(await pool.get("/v1/admin/models"))
    assert by["b"]["definition"]["prompt_format"] == "native"
    assert (by["a"]["runtime_state"], by["d"]["runtime_state"]) == ("loaded", "unloaded")
    assert (await pool.post("/v1/admin/settings/reload")).json == {  # again: nothing changed
        "added_models": [], "removed_models": [], "updated_models": [], "unchanged_models": ["a", "b", "d"],
        "service_restart_required": False,
    }


async def test_reload_reads_the_local_file_and_new_defaults(files: tuple[Pool, Path], control: FakeBackendFactory) -> None:
    pool, main = files
    (main.parent / "pool.local.toml").write_text("[engine.decoding]\ntemperature = 0.9\n[service]\nmax_body_bytes = 10\n")
    r = await pool.post("/v1/admin/settings/reload")
    assert r.json["service_restart_required"] is True and r.json["updated_models"] == []
    assert (await pool.respond({"model": "a", "input": "x"})).status == 200  # the old body limit still applies
    assert control.seen[-1].decoding.temperature == 0.9  # engine defaults apply at once


async def test_reload_rejects_a_bad_file_and_keeps_the_catalog(files: tuple[Pool, Path]) -> None:
    pool, main = files
    before = (await pool.get("/v1/admin/models")).json
    main.write_text(catalog_toml(A, B) + "typo_key = 1\n")
    assert_error(
        await pool.post("/v1/admin/settings/reload"),
        400,
        "invalid_settings",
        f"settings not reloaded: {main}: $.engine.models.b.typo_key: unknown field",
    )
    main.write_text(catalog_toml(A, model_toml("b", model_path="b.gguf", replicas=3)))
    assert_error(
        await pool.post("/v1/admin/settings/reload"),
        400,
        "invalid_settings",
        f"settings not reloaded: {main}: $.engine.models.b.replicas: model 'b' has replicas=3 greater than replica_max=1",
    )
    main.write_text("[engine\n")
    err = assert_error(await pool.post("/v1/admin/settings/reload"), 400, "invalid_settings")
    assert err["message"].startswith(f"settings not reloaded: {main}: invalid TOML: ")
    main.unlink()
    assert_error(await pool.post("/v1/admin/settings/reload"), 400, "invalid_settings", f"settings not reloaded: settings file not found: {main}")
    assert (await pool.get("/v1/admin/models")).json == before


async def test_reload_conflicts_with_loaded_models(files: tuple[Pool, Path]) -> None:
    pool, main = files
    before = (await pool.get("/v1/admin/models")).json
    message = (
        "settings not reloaded: these models are loaded and their definition changed or was removed; "
        "unload them first: a"
    )
    main.write_text(catalog_toml(model_toml("a", model_path="a.gguf", gguf_n_ctx=4096), B, C))  # changed
    assert_error(await pool.post("/v1/admin/settings/reload"), 409, "settings_reload_conflict", message)
    main.write_text(catalog_toml(B, C))  # removed
    assert_error(await pool.post("/v1/admin/settings/reload"), 409, "settings_reload_conflict", message)
    assert (await pool.get("/v1/admin/models")).json == before
    assert (await pool.post("/v1/admin/models/a/unload")).status == 200
    r = await pool.post("/v1/admin/settings/reload")
    assert r.status == 200 and r.json["removed_models"] == ["a"]
    assert await names(pool) == ["b", "c"]


# ------------------------------------------------------------------ odd names and missing libraries
async def test_model_names_with_slashes_are_addressable(nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    """Hugging Face style ids (``org/model``) are common model names; every admin route takes them."""
    models = {"org/m": {"model_path": "m.gguf", "replica_max": 2}, "org/m/load": {"model_path": "x.gguf", "enabled": False}}
    pool = await start_pool(nursery, control, models=models)
    assert (await row(pool, "org/m"))["runtime_state"] == "loaded"
    assert (await row(pool, "org/m/load"))["runtime_state"] == "unloaded"
    assert (await pool.respond({"model": "org/m", "input": "hi"})).json["output_text"] == "hi"
    assert (await pool.post("/v1/admin/models/org/m/replicas", {"replicas": 2})).json["loaded_replicas"] == 2
    assert (await pool.post("/v1/admin/models/org/m/unload")).json["runtime_state"] == "unloaded"
    assert (await pool.post("/v1/admin/models/org/m/load")).json["runtime_state"] == "loaded"
    assert (await pool.post("/v1/admin/models/org/m/load/load")).json["runtime_state"] == "loaded"
    assert (await pool.get("/v1/models")).json["models"] == ["org/m", "org/m/load"]
    assert_error(await pool.post("/v1/admin/models/org/zz/load"), 404, "unknown_model", "unknown model 'org/zz'")


async def test_a_backend_that_cannot_even_be_created_fails_the_load(nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    def factory(ctx):  # type: ignore[no-untyped-def]
        raise ImportError("No module named 'exllamav3'")

    pool = await start_pool(nursery, control, models=CATALOG, autoload=False, factory=factory)
    assert_error(
        await pool.post("/v1/admin/models/e/load"),
        500,
        "model_load_failed",
        "model 'e' failed to load: ImportError: No module named 'exllamav3'",
        model="e",
    )
    e = await row(pool, "e")
    assert (e["runtime_state"], e["last_error"]) == ("failed", "ImportError: No module named 'exllamav3'")
