"""Fake of exllamav3/generator/sampler/sampler.py."""

from __future__ import annotations

from typing import Any


class Sampler:
    def __init__(self) -> None:
        self.reqs_past_ids = False
        self.reqs_torch_seed = False

    def forward(self, logits: Any, sequence_ids: Any = None, rand_u32: int | None = None, tokenizer: Any = None,
                blocked_tokens: list[int] | None = None, allowed_tokens: list[int] | None = None,
                return_state: bool = False) -> Any:
        raise NotImplementedError("fake exllamav3: samplers are not run; the fake model is deterministic")
