"""
Fake of exllamav3/generator/async_generator.py: names only. The real AsyncGenerator/AsyncJob are asyncio-based
(asyncio.Condition / asyncio.create_task in __init__), so a trio program cannot use them anyway; drive the
synchronous Generator.iterate() instead.
"""

from __future__ import annotations

from typing import Any


class AsyncGenerator:
    def __init__(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("fake exllamav3: AsyncGenerator (asyncio-only) is not simulated; use Generator")


class AsyncJob:
    def __init__(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("fake exllamav3: AsyncJob (asyncio-only) is not simulated; use Job")
