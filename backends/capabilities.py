"""What a model honestly takes (``capabilities`` on ``/v1/models`` and admin rows), and the
admission checks that hold a request to it.

Derived from the model's backend kind (:class:`~llm_pool.backends.base.BackendKind`: its
``response_formats``, and ``thinking_modes`` / ``multi_turn`` where the runtime, not the pool,
renders the conversation), its prompt format (:mod:`llm_pool.backends.prompts`) and its settings
(``modalities``, validated against the backend when the settings load).  Nothing here does I/O.
"""

from __future__ import annotations

from llm_pool.backends import kind_of
from llm_pool.backends.prompts import SINGLE_TURN_FORMATS, THINKING_FORMATS
from llm_pool.config import ModelSettings
from llm_pool.pool.api import ModelCapabilities
from llm_pool.pool.errors import PoolError, invalid_request
from llm_pool.pool.jobs import GenerationRequest

ALL_THINKING = ("default", "enabled", "disabled")


def capabilities(model: ModelSettings) -> ModelCapabilities:
    """``model``'s capabilities (see :class:`~llm_pool.pool.api.ModelCapabilities`)."""
    kind = kind_of(model)
    thinking = kind.thinking_modes
    if thinking is None:
        thinking = ALL_THINKING if model.prompt_format in THINKING_FORMATS else ("default",)
    multi_turn = kind.multi_turn
    if multi_turn is None:
        multi_turn = model.prompt_format not in SINGLE_TURN_FORMATS
    return ModelCapabilities(
        modalities=list(model.modalities),
        file_inputs=False,
        multi_turn=multi_turn,
        thinking_modes=list(thinking),
        response_formats=list(kind.response_formats),
    )


def check_capabilities(model: ModelSettings, gen: GenerationRequest, *, thinking_at: str = "$.thinking") -> None:
    """400 for a request ``model`` cannot honour: an image for a text-only model
    (``modality_unsupported``), an ``http(s)://`` image without ``image_url_fetch``, a
    ``thinking`` value outside its ``thinking_modes``, or a conversation for a single-turn model."""
    caps = capabilities(model)
    for image in gen.images:
        if "image" not in caps.modalities:
            raise PoolError(
                400,
                "modality_unsupported",
                f"model {gen.model!r} takes text only (its modalities are {caps.modalities}); {image.at[2:]} is an image",
                model=gen.model,
                param=image.at,
            )
        if not image.url.startswith("data:") and not model.image_url_fetch:
            raise invalid_request(
                f"{image.at[2:]}: model {gen.model!r} takes images as data: URLs only; http(s):// URLs need"
                " image_url_fetch = true in its settings",
                param=image.at,
                model=gen.model,
            )
    if gen.thinking not in caps.thinking_modes:
        raise invalid_request(
            f"thinking={gen.thinking!r} is not available for model {gen.model!r}: it offers {caps.thinking_modes}",
            param=thinking_at,
            model=gen.model,
        )
    turns = [m for m in gen.messages if m.role != "system"]
    if not caps.multi_turn and len(turns) > 1:
        raise invalid_request(
            f"model {gen.model!r} takes one user message, not a conversation of {len(turns)}",
            param="$.messages",
            model=gen.model,
        )
