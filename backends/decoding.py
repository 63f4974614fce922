"""What each runtime accepts of the decoding fields, beyond the API's own ranges.

The API (``pool/api.py``) bounds every field for every model: ``beam_size`` 1-16, ``top_k``
1-200, ``top_p`` in (0, 1], ``temperature`` and ``repetition_penalty`` in [0, 2] and [0, 4],
``max_tokens`` 1-``engine.max_tokens_limit``, ``stop`` at most 16 non-empty strings.  A value in
those ranges that a runtime still refuses must be refused here, at admission, as a 400 naming
the field, never reach the runtime and come back as a 502 with a traceback in the log.

Each backend kind carries its rules (``BackendKind.decoding_rules``, from the constants here),
found by running each runtime at every edge of every field
(``tests/http/test_decoding_edges.py`` sweeps them all):

* ``gguf`` (llama.cpp, sequential and batched): accepts every value in the API's ranges
  (``repetition_penalty`` 0 is accepted and degenerate, not an error).
* ``ct2``: ``generate_batch`` / ``translate_batch`` raise ``ValueError: The repetition penalty
  must be > 0`` for 0.
* ``exllamav3``: its repetition penalty divides positive logits by ``rep_p`` on the GPU, as
  CTranslate2's does; 0 is refused like CTranslate2's rather than sent to a CUDA kernel.
* ``openai_compatible``: ``repetition_penalty``, ``top_k`` and ``beam_size`` are not sent; the
  Chat Completions API takes at most 4 ``stop`` sequences, and an upstream's 400 for a fifth
  would reach the caller as a 502 ``upstream_invalid_request``.

The OpenAI routes' ``seed`` (``BackendKind.seeded_sampling``, :func:`check_seed`): llama.cpp
(in-process, batched, ``llama_server``) and ExLlamaV3 take a seed per request; a remote model is
sent it.  CTranslate2 has none: ``ctranslate2.set_random_seed`` is process-wide and read once
per worker thread (measured on 4.8: the same seed set before two calls gives two texts), so a
seeded request that samples is refused there.  ``presence_penalty`` / ``frequency_penalty``:
llama.cpp, ExLlamaV3 and remote models have them; CTranslate2 does not
(:data:`NO_OPENAI_PENALTIES`).

Nothing here imports a runtime library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llm_pool.pool.errors import invalid_request
from llm_pool.pool.jobs import Decoding


@dataclass(frozen=True)
class Rule:
    """One field's constraint: ``ok(value)``, and what the 400 says it must be."""

    field: str
    ok: Callable[[Any], bool]
    must: str


#: CTranslate2 and ExLlamaV3 divide by the repetition penalty.
POSITIVE_PENALTY = Rule("repetition_penalty", lambda v: v > 0, "greater than 0")
#: The Chat Completions API takes at most 4 stop sequences.
AT_MOST_4_STOPS = Rule("stop", lambda v: len(v) <= 4, "at most 4 strings")
#: CTranslate2's samplers have a repetition penalty only.
NO_OPENAI_PENALTIES = (
    Rule("presence_penalty", lambda v: v == 0, "0 (its runtime has no presence penalty; repetition_penalty is an extension)"),
    Rule("frequency_penalty", lambda v: v == 0, "0 (its runtime has no frequency penalty; repetition_penalty is an extension)"),
)

#: llama.cpp and ExLlamaV3 seed their samplers with 32 bits, and llama.cpp reads 0xFFFFFFFF as
#: "pick a random seed"; a caller's seed is any 64-bit integer.
_SEED_MODULUS = 0xFFFFFFFF


def engine_seed(seed: int) -> int:
    """The caller's ``seed`` as a runtime's 32-bit sampler seed: 0 to 0xFFFFFFFE, never the
    value llama.cpp reads as "random", the same for the same seed on every runtime."""
    return seed % _SEED_MODULUS


def check_seed(backend: str, seeded: bool, model: str, decoding: Decoding, *, at: str = "$") -> None:
    """Raise 400 ``invalid_request`` for a ``seed`` the model's runtime cannot honour: one that
    would be silently ignored.  A greedy request (temperature 0 or top_k 1) ignores its seed on
    every runtime, so it is accepted there."""
    if decoding.seed is None or seeded or decoding.greedy:
        return
    raise invalid_request(
        f"model {model!r} ({backend}) cannot make sampling reproducible: its runtime takes no "
        "per-request seed; leave seed out, or send temperature 0",
        param=f"{at}.seed",
        model=model,
    )


def check_decoding(
    backend: str, rules: tuple[Rule, ...], model: str, decoding: Decoding, *, at: str = "$.decoding"
) -> None:
    """Raise 400 ``invalid_request`` for the first field the ``backend`` kind's runtime would
    refuse (its ``rules``); ``param`` is the field's path in the caller's body (``at``: where the
    decoding fields sit, ``$.decoding`` in ``/v1/responses``, ``$`` in ``/v1/chat/completions``)."""
    for rule in rules:
        value = getattr(decoding, rule.field)
        if not rule.ok(value):
            what = f"{len(value)} {rule.field} strings" if isinstance(value, list) else f"{rule.field}={value!r}"
            raise invalid_request(
                f"model {model!r} ({backend}) does not accept {what}: {rule.field} must be {rule.must}",
                param=f"{at}.{rule.field}",
                model=model,
            )
