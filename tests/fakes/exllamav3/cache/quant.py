"""Fake of exllamav3/cache/quant.py."""

from __future__ import annotations

from typing import Any

from ..constants import PAGE_SIZE
from .cache import CacheLayer


class CacheLayer_quant(CacheLayer):

    def __init__(
        self,
        config: Any,
        attention: Any,
        cache_id: int,
        max_num_tokens: int,
        k_bits: int,
        v_bits: int,
        compand_a: float = 0.0,
    ):
        super().__init__(config, attention, cache_id, max_num_tokens)
        self.compand_a = compand_a
        assert max_num_tokens % PAGE_SIZE == 0, \
            f"max_num_tokens must be a multiple of {PAGE_SIZE}."
        assert (2 <= k_bits <= 8) and (2 <= v_bits <= 8), "quantized cache must be from 2 to 8 bits"
        self.k_bits = k_bits
        self.v_bits = v_bits
        self.device = None
