"""Fake of exllamav3/tokenizer/mm_embedding.py: name only, multimodal input is not simulated."""

from __future__ import annotations

from typing import Any

FIRST_MM_EMBEDDING_INDEX = 1000000000


class MMEmbedding:
    def __init__(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("fake exllamav3: multimodal embeddings are not simulated")
