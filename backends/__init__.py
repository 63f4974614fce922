"""Runtime adapters, one module per runtime, behind the protocol in :mod:`backends.base`.

:func:`create_backend` is the one factory the pool uses.  Each adapter module imports its runtime
library lazily (inside ``load``), so importing this package never needs llama-cpp-python,
ctranslate2, exllamav3, vLLM or a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llm_pool.backends.base import Backend
from llm_pool.config import ModelSettings, Settings, resolve_model_path


@dataclass(frozen=True, kw_only=True)
class BackendContext:
    """Everything an adapter may know about the model it serves."""

    name: str
    replica_index: int
    replicas: int
    model: ModelSettings
    settings: Settings
    kind: str

    def model_path(self) -> Path:
        """The resolved model file/folder; ``FileNotFoundError`` with a clear message if absent."""
        return resolve_model_path(self.settings, self.model)

    @property
    def n_threads(self) -> int:
        """Compute threads for this replica: configured, else cores / replicas (at least 1)."""
        if self.model.n_threads:
            return self.model.n_threads
        return max(1, (os.cpu_count() or 1) // max(1, self.replicas))


def create_backend(ctx: BackendContext) -> Backend:
    """A new, not yet loaded backend for one replica of ``ctx.name``."""
    if ctx.kind == "gguf":
        if ctx.model.gguf_batching:
            from llm_pool.backends.gguf_batched import BatchedGGUFBackend

            return BatchedGGUFBackend(ctx)
        from llm_pool.backends.gguf import GGUFBackend

        return GGUFBackend(ctx)
    if ctx.kind == "ct2":
        from llm_pool.backends.ct2 import CT2Backend

        return CT2Backend(ctx)
    if ctx.kind == "exllamav3":
        from llm_pool.backends.exllamav3 import ExLlamaV3Backend

        return ExLlamaV3Backend(ctx)
    if ctx.kind == "llama_server":
        from llm_pool.backends.llama_server import LlamaServerBackend

        return LlamaServerBackend(ctx)
    if ctx.kind == "openai_compatible":
        from llm_pool.backends.openai_compatible import RemoteBackend

        return RemoteBackend(ctx)
    if ctx.kind == "vllm_serve":
        from llm_pool.backends.vllm_serve import VllmServeBackend

        return VllmServeBackend(ctx)
    raise ValueError(f"unknown backend {ctx.kind!r}")
