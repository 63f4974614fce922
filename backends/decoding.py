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
