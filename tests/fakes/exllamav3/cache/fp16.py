"""Fake of exllamav3/cache/fp16.py."""

from __future__ import annotations

from typing import Any

from ..constants import PAGE_SIZE
from .cache import CacheLayer


class CacheLayer_fp16(CacheLayer):

    def __init__(self, config: Any, attention: Any, cache_id: int, max_num_tokens: int):
        super().__init__(config, attention, cache_id, max_num_tokens)
        assert max_num_tokens % PAGE_SIZE == 0, \
            f"max_num_tokens must be a multiple of {PAGE_SIZE}."
        self.device = None
