"""The vllm_serve settings, the engine's command line and environment, and the load overrides
(no vLLM and no child process needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from llm_pool.admin.routes import validate_overrides
from llm_pool.backends import BackendContext, create_backend
from llm_pool.backends.vllm_serve import VllmServeBackend
from llm_pool.config import SettingsError, decode_settings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.manager import ModelEntry


def settings(**model: Any) -> Any:
    return decode_settings(
        {"engine": {"models": {"m": {"model_path": "m-hf", "backend": "vllm_serve", **model}}}},
        source="pool.toml",
        base_dir="/srv/pool",
    )


def backend(**model: Any) -> VllmServeBackend:
    s = settings(**model)
    ctx = BackendContext(name="m", replica_index=1, replicas=1, model=s.engine.models["m"], settings=s, kind="vllm_serve")
    b = create_backend(ctx)
    assert isinstance(b, VllmServeBackend)
    return b


def test_the_command_line_carries_every_key_and_no_secret() -> None:
    b = backend(
        target_inflight=6, vllm_serve_binary="bin/vllm", vllm_dtype="bfloat16", vllm_gpu_memory_utilization=0.85,
        vllm_kv_cache_memory_bytes=2_000_000_000, vllm_kv_cache_dtype="fp8", vllm_max_model_len=8192,
        vllm_tensor_parallel_size=2, vllm_pipeline_parallel_size=2, vllm_distributed_executor_backend="ray",
        vllm_ray_address="ray://head:10001", vllm_limit_mm_per_prompt={"image": 2, "video": 0},
        vllm_mm_processor_kwargs={"max_pixels": 1003520}, vllm_speculative_method="eagle3",
        vllm_speculative_model="/models/draft", vllm_num_speculative_tokens=3,
        vllm_serve_extra_args=["--enforce-eager"],
    )  # fmt: skip
    assert b.capability == 6
    assert b.argv("/models/m-hf", 41234) == [
        "/srv/pool/bin/vllm", "serve", "/models/m-hf", "--served-model-name", "m", "--host", "127.0.0.1",
        "--port", "41234", "--max-num-seqs", "6", "--dtype", "bfloat16", "--kv-cache-dtype", "fp8",
        "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2", "--max-model-len", "8192",
        "--gpu-memory-utilization", "0.85", "--kv-cache-memory-bytes", "2000000000",
        "--distributed-executor-backend", "ray", "--limit-mm-per-prompt", '{"image":2,"video":0}',
        "--mm-processor-kwargs", '{"max_pixels":1003520}',
        "--speculative-config", '{"method":"eagle3","model":"/models/draft","num_speculative_tokens":3}',
        "--enforce-eager",
    ]  # fmt: skip
    env = b.env("sekrit")
    assert (env["VLLM_API_KEY"], env["RAY_ADDRESS"]) == ("sekrit", "ray://head:10001")


def test_the_defaults_leave_vllm_its_own() -> None:
    b = backend()
    assert b.argv("/m", 1) == [
        str(b._binary()), "serve", "/m", "--served-model-name", "m", "--host", "127.0.0.1", "--port", "1",
        "--max-num-seqs", "1", "--dtype", "auto", "--kv-cache-dtype", "auto", "--tensor-parallel-size", "1",
        "--pipeline-parallel-size", "1",
    ]  # fmt: skip
    assert "RAY_ADDRESS" not in b.env("k") or b.env("k")["RAY_ADDRESS"] == __import__("os").environ["RAY_ADDRESS"]
    assert b.speculative_config() is None


def test_a_speculative_method_without_a_draft_model() -> None:
    b = backend(vllm_speculative_method="ngram", vllm_num_speculative_tokens=4)
    argv = b.argv("/m", 1)
    assert json.loads(argv[argv.index("--speculative-config") + 1]) == {"method": "ngram", "num_speculative_tokens": 4}


@pytest.mark.parametrize("flag", ["--port", "--max-num-seqs=4", "--speculative-config", "-tp", "--api-key"])
def test_extra_args_may_not_take_over_what_the_backend_or_a_key_sets(flag: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings(vllm_serve_extra_args=[flag, "1"])
    name = flag.split("=")[0]
    assert str(info.value) == (
        f"pool.toml: $.engine.models.m.vllm_serve_extra_args: model 'm' may not pass {name} in vllm_serve_extra_args:"
        " the vllm_serve backend or a vllm_* key sets it"
    )


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"vllm_ray_address": "ray://h:10001"},
         "$.engine.models.m.vllm_ray_address: model 'm' sets vllm_ray_address without"
         ' vllm_distributed_executor_backend = "ray"'),
        ({"vllm_speculative_method": "ngram"},
         "$.engine.models.m.vllm_speculative_method: model 'm' needs vllm_num_speculative_tokens with vllm_speculative_method"),
        ({"vllm_speculative_model": "/d"},
         "$.engine.models.m.vllm_speculative_model: model 'm' needs vllm_num_speculative_tokens with vllm_speculative_model"),
        ({"vllm_num_speculative_tokens": 2},
         "$.engine.models.m.vllm_num_speculative_tokens: model 'm' needs vllm_speculative_method or"
         " vllm_speculative_model with vllm_num_speculative_tokens"),
        ({"vllm_gpu_memory_utilization": 1.5},
         "$.engine.models.m.vllm_gpu_memory_utilization: expected a number > 0 and <= 1 or null"),
        ({"vllm_kv_cache_dtype": "int4"},
         '$.engine.models.m.vllm_kv_cache_dtype: expected one of "auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc"'),
        ({"vllm_distributed_executor_backend": "uni"},
         '$.engine.models.m.vllm_distributed_executor_backend: expected one of "mp", "ray" or null'),
        ({"vllm_limit_mm_per_prompt": {"image": -1}},
         "$.engine.models.m.vllm_limit_mm_per_prompt[...]: expected an integer >= 0"),
    ],
)  # fmt: skip
def test_inconsistent_or_out_of_range_settings_are_refused_with_their_key_path(model: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings(**model)
    assert str(info.value) == f"pool.toml: {message}"


# ---------------------------------------------------------------------- load overrides
def entry(**model: Any) -> ModelEntry:
    return ModelEntry("m", settings(**model).engine.models["m"])


def overrides(e: ModelEntry, body: dict[str, Any]) -> dict[str, Any]:
    given, _ = validate_overrides(e, body)
    return given


def test_the_overrides_vllm_serve_accepts() -> None:
    e = entry(vllm_speculative_model="/d", vllm_num_speculative_tokens=2)
    body = {"vllm_max_model_len": 4096, "vllm_kv_cache_dtype": "fp8_e5m2", "vllm_kv_cache_memory_bytes": 10**9,
            "vllm_speculative_method": "draft_model", "vllm_num_speculative_tokens": 5}
    assert overrides(e, body) == body
    # drafting switched off for one load: the trio goes together
    off = {"vllm_speculative_model": None, "vllm_num_speculative_tokens": None}
    assert overrides(e, off) == off
    assert overrides(entry(), {"vllm_max_model_len": None}) == {"vllm_max_model_len": None}


@pytest.mark.parametrize(
    ("model", "body", "param", "message"),
    [
        ({}, {"vllm_kv_cache_dtype": "int8"}, "$.vllm_kv_cache_dtype",
         'invalid load override: $.vllm_kv_cache_dtype: expected one of "auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc"'),
        ({}, {"vllm_speculative_model": "/etc/passwd", "vllm_num_speculative_tokens": 2}, "$.vllm_speculative_model",
         "vllm_speculative_model may only be null in a load override (a draft model is named in the settings files)"),
        ({}, {"vllm_speculative_method": "ngram"}, "$.vllm_speculative_method",
         "with these overrides, model 'm' needs vllm_num_speculative_tokens with vllm_speculative_method"),
        ({"vllm_speculative_method": "ngram", "vllm_num_speculative_tokens": 2}, {"vllm_speculative_method": None},
         "$.vllm_num_speculative_tokens",
         "with these overrides, model 'm' needs vllm_speculative_method or vllm_speculative_model with vllm_num_speculative_tokens"),
        ({}, {"vllm_speculative_method": ""}, "$.vllm_speculative_method",
         "invalid load override: $.vllm_speculative_method: expected a string of at least 1 character or null"),
        ({}, {"gguf_n_ctx": 512}, "$.gguf_n_ctx", "unsupported load override for vllm_serve backend: gguf_n_ctx"),
        ({}, {"vllm_max_model_len": 0}, "$.vllm_max_model_len",
         "invalid load override: $.vllm_max_model_len: expected an integer >= 1 or null"),
    ],
)  # fmt: skip
def test_refused_overrides_say_why_in_our_words(model: dict[str, Any], body: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(PoolError) as info:
        overrides(entry(**model), body)
    assert (info.value.status, info.value.code, info.value.param, info.value.message) == (
        400, "invalid_load_request", param, message
    )
