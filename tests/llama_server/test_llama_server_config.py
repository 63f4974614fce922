"""The llama_server settings and the engine's command line (no llama-server needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from llm_pool.admin.routes import validate_overrides
from llm_pool.backends import BackendContext, create_backend
from llm_pool.backends.llama_server import LlamaServerBackend, default_binary
from llm_pool.config import SettingsError, decode_settings, machine
from llm_pool.pool.errors import PoolError
from llm_pool.pool.manager import ModelEntry


def settings(**model: Any) -> Any:
    return decode_settings(
        {"engine": {"models": {"m": {"model_path": "m.gguf", "backend": "llama_server", **model}}}},
        source="pool.toml",
        base_dir="/srv/pool",
    )


def backend(**model: Any) -> LlamaServerBackend:
    s = settings(**model)
    ctx = BackendContext(name="m", replica_index=1, replicas=1, model=s.engine.models["m"], settings=s, kind="llama_server")
    b = create_backend(ctx)
    assert isinstance(b, LlamaServerBackend)
    return b


def test_the_command_line_carries_the_settings_and_no_secret() -> None:
    b = backend(target_inflight=3, llama_server_n_ctx=1024, n_threads=2, llama_server_n_gpu_layers=-1,
                llama_server_flash_attn="on", llama_server_spec_type="ngram-simple", llama_server_spec_draft_n_max=4,
                llama_server_spec_draft_p_min=0.5, llama_server_reasoning="off",
                llama_server_extra_args=["--cache-ram", "0"])
    assert b.capability == 3
    assert b.argv(Path("/models/m.gguf")) == [
        str(default_binary()),
        "--model", "/models/m.gguf", "--host", "127.0.0.1", "--port", "0", "--parallel", "3",
        "--ctx-size", "3072", "--threads", "2", "--threads-batch", "2", "--n-gpu-layers", "-1",
        "--flash-attn", "on", "--log-jsonl", "--no-webui", "--spec-type", "ngram-simple",
        "--spec-draft-n-max", "4", "--spec-draft-p-min", "0.5", "--reasoning", "off", "--cache-ram", "0",
    ]  # fmt: skip


def test_default_threads_share_the_cores_this_process_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``n_threads`` a replica's ``--threads`` is its share of the cores the pool may run
    on (``config.machine``: its affinity and CPU quota), never of the host's: more threads than
    cores make llama.cpp's spinning workers crawl (a 2-thread SmolLM2 beside a busy process on one
    core: over 120 s for what one thread did in 5)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3, 5}, raising=False)
    monkeypatch.setattr(machine, "PROC_CGROUP", Path("/nonexistent"))  # no CPU quota (tests/config/test_machine.py)

    def threads(replicas: int, **engine: Any) -> str:
        s = decode_settings(
            {"engine": {**engine, "models": {"m": {"model_path": "m.gguf", "backend": "llama_server"}}}}, source="test"
        )
        ctx = BackendContext(name="m", replica_index=1, replicas=replicas, model=s.engine.models["m"], settings=s, kind="llama_server")
        argv = create_backend(ctx).argv(Path("/m.gguf"))  # type: ignore[attr-defined]
        return argv[argv.index("--threads") + 1]

    assert (threads(1), threads(2), threads(4)) == ("3", "1", "1")
    assert threads(2, cpu_cores=8) == "4"  # engine.cpu_cores, when set, is what the models share


def test_a_configured_binary_is_resolved_against_the_settings_folder() -> None:
    assert backend(llama_server_binary="bin/llama-server").describe()["binary"] == "/srv/pool/bin/llama-server"


def test_a_missing_draft_model_is_named() -> None:
    with pytest.raises(FileNotFoundError, match=r"^llama_server_draft_model_path 'draft.gguf': no such file or directory: /srv/pool/draft.gguf$"):
        backend(llama_server_draft_model_path="draft.gguf").argv(Path("/m.gguf"))


def test_a_fixed_port_needs_a_single_replica() -> None:
    with pytest.raises(SettingsError) as info:
        settings(llama_server_port=8081, replica_max=2)
    assert str(info.value) == (
        "pool.toml: $.engine.models.m.llama_server_port: model 'm' sets llama_server_port with replica_max=2;"
        " each replica needs its own port: leave llama_server_port unset (a free port per replica)"
    )
    assert settings(llama_server_port=8081).engine.models["m"].llama_server_port == 8081


@pytest.mark.parametrize("flag", ["--port", "--api-key=x", "-np"])
def test_extra_args_may_not_take_over_what_the_backend_sets(flag: str) -> None:
    with pytest.raises(SettingsError) as info:
        settings(llama_server_extra_args=[flag, "1"])
    assert str(info.value) == (
        f"pool.toml: $.engine.models.m.llama_server_extra_args: model 'm' may not pass {flag.split('=')[0]}"
        " in llama_server_extra_args: the llama_server backend sets it"
    )


@pytest.mark.parametrize(("key", "value"), [("llama_server_spec_draft_n_max", 7), ("llama_server_spec_draft_p_min", 1.5),
                                            ("llama_server_spec_type", "magic"), ("llama_server_n_gpu_layers", -2)])
def test_out_of_range_values_are_refused_with_their_key_path(key: str, value: Any) -> None:
    with pytest.raises(SettingsError, match=rf"^pool\.toml: \$\.engine\.models\.m\.{key}: expected "):
        settings(**{key: value})


def test_draft_simple_needs_its_draft_model() -> None:
    with pytest.raises(SettingsError) as info:
        settings(llama_server_spec_type="draft-simple")
    assert str(info.value) == (
        "pool.toml: $.engine.models.m.llama_server_spec_type: model 'm' sets llama_server_spec_type 'draft-simple'"
        " without llama_server_draft_model_path (the draft model, named in the settings files)"
    )
    assert settings(llama_server_spec_type="draft-simple", llama_server_draft_model_path="d.gguf")


# ------------------------------------------------------------------ load overrides
def overrides(body: dict[str, Any], **model: Any) -> dict[str, Any]:
    given, _ = validate_overrides(ModelEntry("m", settings(**model).engine.models["m"]), body)
    return given


def test_the_overrides_llama_server_accepts_reach_the_command_line() -> None:
    body = {"llama_server_n_ctx": 512, "llama_server_image_max_tokens": 256, "llama_server_spec_type": "ngram-simple",
            "llama_server_spec_draft_n_max": 3, "llama_server_spec_draft_p_min": 0.25}
    assert overrides(body) == body
    argv = backend(**body).argv(Path("/m.gguf"))  # a load's model is the settings with them applied
    for flag, value in [("--image-max-tokens", "256"), ("--spec-type", "ngram-simple"), ("--spec-draft-n-max", "3"),
                        ("--spec-draft-p-min", "0.25")]:
        assert argv[argv.index(flag) + 1] == value
    assert overrides({"llama_server_spec_type": None}, llama_server_spec_type="ngram-simple") == {"llama_server_spec_type": None}


@pytest.mark.parametrize(
    ("model", "body", "param", "message"),
    [
        ({}, {"llama_server_mmproj_path": "/etc/passwd"}, "$.llama_server_mmproj_path",
         "unsupported load override for llama_server backend: llama_server_mmproj_path"),
        ({}, {"llama_server_draft_model_path": "d.gguf"}, "$.llama_server_draft_model_path",
         "unsupported load override for llama_server backend: llama_server_draft_model_path"),
        ({}, {"llama_server_extra_args": ["--port", "1"]}, "$.llama_server_extra_args",
         "unsupported load override for llama_server backend: llama_server_extra_args"),
        ({}, {"llama_server_n_ctx": 0}, "$.llama_server_n_ctx",
         "invalid load override: $.llama_server_n_ctx: expected an integer >= 1"),
        ({}, {"llama_server_spec_draft_n_max": 7}, "$.llama_server_spec_draft_n_max",
         "invalid load override: $.llama_server_spec_draft_n_max: expected an integer from 1 to 6 or null"),
        ({}, {"llama_server_spec_type": "draft-simple"}, "$.llama_server_spec_type",
         "with these overrides, model 'm' sets llama_server_spec_type 'draft-simple' without"
         " llama_server_draft_model_path (the draft model, named in the settings files)"),
    ],
)  # fmt: skip
def test_refused_overrides_say_why_in_our_words(model: dict[str, Any], body: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(PoolError) as info:
        overrides(body, **model)
    assert (info.value.status, info.value.code, info.value.param, info.value.message) == (
        400, "invalid_load_request", param, message
    )
