"""A pytest plugin that runs the GGUF suites with every layer on the GPU: ``pytest -p bench.gpu.cuda_gguf``.

The GGUF tests (tests/gguf, tests/reliability) build their settings with ``decode_settings`` and
leave ``gguf_n_gpu_layers`` at its default, 0 (CPU).  This plugin wraps ``decode_settings`` so
that every gguf model that does not name ``gguf_n_gpu_layers`` gets ``-1`` (all layers), which
makes the same exact-output, streaming and cancel tests run on CUDA without a copy of them.
It also fails the session at once where llama-cpp-python was built without GPU offload (a CPU
wheel would otherwise pass every test on the CPU and prove nothing), unless
``LLM_POOL_GPU_DRY_RUN=1`` (bench/gpu/run.sh --dry-run, on a CPU machine).

Only the test process is patched: a server started in a subprocess reads its own settings.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import pytest

#: How many decoded settings the wrapper changed, reported at the end of the session.
PATCHED: list[str] = []


def _all_layers_on_gpu(raw: dict[str, Any]) -> dict[str, Any]:
    engine = raw.get("engine")
    if not isinstance(engine, dict) or not isinstance(engine.get("models"), dict):
        return raw
    default_backend = engine.get("backend", "gguf")
    models = {}
    for name, model in engine["models"].items():
        if isinstance(model, dict) and model.get("backend", default_backend) == "gguf" and "gguf_n_gpu_layers" not in model:
            model = {**model, "gguf_n_gpu_layers": -1}
            PATCHED.append(name)
        models[name] = model
    return {**raw, "engine": {**engine, "models": models}}


def pytest_configure(config: pytest.Config) -> None:
    import llm_pool.config
    import llm_pool.config.settings

    original = llm_pool.config.settings.decode_settings

    @functools.wraps(original)
    def decode_settings(raw: dict[str, Any], **kwargs: Any) -> Any:
        return original(_all_layers_on_gpu(raw), **kwargs)

    llm_pool.config.decode_settings = decode_settings  # type: ignore[assignment]
    llm_pool.config.settings.decode_settings = decode_settings  # type: ignore[assignment]


def pytest_sessionstart(session: pytest.Session) -> None:
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload() and os.environ.get("LLM_POOL_GPU_DRY_RUN") != "1":
        raise pytest.UsageError("bench.gpu.cuda_gguf: this llama-cpp-python cannot offload to a GPU (a CPU build)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    import llama_cpp

    terminalreporter.write_line(
        f"bench.gpu.cuda_gguf: gguf_n_gpu_layers=-1 set in {len(PATCHED)} decoded settings; "
        f"llama_supports_gpu_offload()={llama_cpp.llama_supports_gpu_offload()}"
    )
