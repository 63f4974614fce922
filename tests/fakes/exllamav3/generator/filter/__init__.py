"""Fake of exllamav3/generator/filter: names only, constrained decoding is not simulated."""

from __future__ import annotations

from typing import Any


class Filter:
    def __init__(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("fake exllamav3: filters are not simulated")


class FormatronFilter(Filter):
    pass


class LLGuidanceFilter(Filter):
    pass
