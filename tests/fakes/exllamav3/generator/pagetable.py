"""
Fake of exllamav3/generator/pagetable.py: page accounting only (no K/V tensors).

Pages are PAGE_SIZE (256) tokens. A job holds one page per full prompt page (keyed by a chained content hash, so
identical prompt prefixes share pages and finished prompts stay reusable as a prompt cache) plus anonymous pages
for the rest of the prompt and its generation budget. Unreferenced content pages are kept as prompt cache and
evicted least-recently-freed first (the real one prunes cached chains tail-first, least recently used chain first).
Partial-page prompt reuse (the real prefill's copy_page of a partially matching page) is not simulated.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..constants import PAGE_SIZE

if TYPE_CHECKING:
    from .job import Job


def chain_hashes(ids: Sequence[int], num_pages: int, start_hash: Any = None, start_page: int = 0) -> list:
    hashes = []
    h = start_hash
    for i in range(start_page, num_pages):
        h = hash((h, tuple(ids[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])))
        hashes.append(h)
    return hashes


class PageTable:

    def __init__(self, generator: Any, cache: Any):
        self.generator = generator
        self.cache = cache
        self.max_pages = cache.max_num_tokens // PAGE_SIZE
        self.referenced: dict[Any, int] = {}
        self.filled: set = set()
        self.cached: OrderedDict[Any, None] = OrderedDict()
        self.anon = 0
        self.metrics = {
            "evictions": 0,
            "evictions_live": 0,
            "alloc_pages": 0,
            "alloc_prompt_pages": 0,
            "alloc_cached_pages": 0,
            "alloc_tier_pages": 0,
            "alloc_disk_pages": 0,
        }

    def num_unreferenced_pages(self) -> int:
        return self.max_pages - len(self.referenced) - self.anon

    def _num_empty_pages(self) -> int:
        return self.max_pages - len(self.referenced) - self.anon - len(self.cached)

    def _take_page(self) -> None:
        if self._num_empty_pages() <= 0:
            assert self.cached, "fake page table: no page left to allocate (accounting error)"
            h, _ = self.cached.popitem(last=False)
            self.metrics["evictions"] += 1
            self.metrics["evictions_live"] += 1
            del h

    def has_content(self, h: Any) -> bool:
        return h in self.filled or h in self.cached

    def mark_filled(self, h: Any) -> None:
        if h in self.referenced:
            self.filled.add(h)

    def allocate_pages(self, job: Job) -> int:
        """Reference the job's pages; returns the number of leading prompt pages whose K/V are already cached."""
        hits: list[bool | None] = []
        for h in job.page_hashes:
            if h in self.referenced:
                self.referenced[h] += 1
                hits.append(h in self.filled)
            elif h in self.cached:
                del self.cached[h]
                self.referenced[h] = 1
                self.filled.add(h)
                hits.append(True)
            else:
                hits.append(None)
        for i, h in enumerate(job.page_hashes):
            if hits[i] is None:
                self._take_page()
                self.referenced[h] = 1
                hits[i] = False
        for _ in range(job.new_unique_pages):
            self._take_page()
            self.anon += 1
        cached = 0
        for hit in hits:
            if not hit:
                break
            cached += 1
        self.metrics["alloc_pages"] += len(job.page_hashes) + job.new_unique_pages
        self.metrics["alloc_prompt_pages"] += len(job.page_hashes)
        self.metrics["alloc_cached_pages"] += cached
        return cached

    def deallocate_pages(self, job: Job, full_page_hashes: list) -> None:
        for h in job.page_hashes:
            n = self.referenced.get(h, 0) - 1
            if n > 0:
                self.referenced[h] = n
                continue
            self.referenced.pop(h, None)
            if h in self.filled:
                self.filled.discard(h)
                self.cached[h] = None
                self.cached.move_to_end(h)
        self.anon -= job.new_unique_pages
        # Pages completed during generation get their content hash and stay reusable, as in the real page table
        for h in full_page_hashes:
            if h in self.referenced or h in self.cached:
                continue
            if self._num_empty_pages() > 0:
                self.cached[h] = None
