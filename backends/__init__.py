"""Runtime adapters, one module per runtime, behind the protocol in :mod:`llm_pool.backends.base`.

:data:`KINDS` is the registry: one :class:`~llm_pool.backends.base.BackendKind` per backend
module, the only place the pool learns what a backend needs (GPU? remote?), which load
overrides it takes, which decoding values it refuses, what it costs.  :func:`create_backend` is
the one factory the pool uses.  Each adapter module imports its runtime library lazily (inside
``load``), so importing this package never needs llama-cpp-python, ctranslate2, exllamav3, vLLM
or a GPU.  Adding a backend: its module (with a ``KIND``), its settings Struct in
:mod:`llm_pool.config.settings`, and one line below.
"""

from __future__ import annotations

from llm_pool.backends import ct2, exllamav3, gguf, llama_server, openai_compatible, vllm_serve
from llm_pool.backends.base import Backend, BackendContext, BackendKind, OverrideError
from llm_pool.config import MODEL_KINDS, ModelSettings

#: Every backend kind, by the ``backend`` name its settings Struct is tagged with.
KINDS: dict[str, BackendKind] = {
    k.name: k for k in (gguf.KIND, ct2.KIND, exllamav3.KIND, llama_server.KIND, vllm_serve.KIND, openai_compatible.KIND)
}
assert set(KINDS) == set(MODEL_KINDS), "every settings Struct needs its backend kind, and back"


def kind_of(model: ModelSettings) -> BackendKind:
    """The backend kind that serves ``model``."""
    return KINDS[model.backend]


def create_backend(ctx: BackendContext) -> Backend:
    """A new, not yet loaded backend for one replica of ``ctx.name``."""
    return kind_of(ctx.model).create(ctx)


__all__ = ["KINDS", "BackendContext", "BackendKind", "OverrideError", "create_backend", "kind_of"]
