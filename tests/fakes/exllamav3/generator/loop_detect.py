"""
Fake of exllamav3/generator/loop_detect.py: same streaming algorithm (circular window, one detector per period,
sleep/backlog-scan scheduling), so stop_on_loop triggers on the same token as the real one.
"""

from __future__ import annotations

import heapq
from typing import Any


class LoopDetector:

    def __init__(self, window_size: int = 1000, max_period: int | None = None):
        self.W = window_size
        self.max_period = min(max_period or window_size // 3, window_size // 2)
        self._buf: list[Any] = [None] * self.W
        self._total = 0
        self._streak = [0] * (self.max_period + 1)
        self._heap: list[tuple[int, int, int]] = []
        self._gen = [0] * (self.max_period + 1)
        for p in range(1, self.max_period + 1):
            heapq.heappush(self._heap, (self.W, p, 0))
        self._detected_period: int | None = None

    @property
    def detected(self) -> bool:
        return self._detected_period is not None

    def _schedule(self, p: int, wake_time: int) -> None:
        self._gen[p] += 1
        heapq.heappush(self._heap, (wake_time, p, self._gen[p]))

    def _backlog_scan(self, p: int) -> int:
        t = self._total
        streak = 0
        for k in range(self.W - p):
            if self._buf[(t - 1 - k) % self.W] == self._buf[(t - 1 - k - p) % self.W]:
                streak += 1
            else:
                break
        return streak

    def feed(self, token: Any) -> bool:
        self._buf[self._total % self.W] = token
        self._total += 1
        if self._total < self.W:
            return False
        t = self._total
        detected = False
        while self._heap and self._heap[0][0] <= t:
            _, p, gen = heapq.heappop(self._heap)
            if gen != self._gen[p]:
                continue
            if self._streak[p] > 0:
                if self._buf[(t - 1) % self.W] == self._buf[(t - 1 - p) % self.W]:
                    self._streak[p] += 1
                    if self._streak[p] >= self.W - p:
                        self._detected_period = p
                        detected = True
                    self._schedule(p, t + 1)
                else:
                    self._streak[p] = 0
                    if self._detected_period == p:
                        self._detected_period = None
                    self._schedule(p, t + self.W)
            else:
                streak = self._backlog_scan(p)
                self._streak[p] = streak
                if streak >= self.W - p:
                    self._detected_period = p
                    detected = True
                    self._schedule(p, t + 1)
                elif streak > 0:
                    self._schedule(p, t + 1)
                else:
                    self._schedule(p, t + self.W)
        return detected or self._detected_period is not None

    def feed_many(self, tokens: Any) -> list[int] | None:
        if hasattr(tokens, "tolist"):
            tokens = tokens.flatten().tolist() if hasattr(tokens, "flatten") else tokens.tolist()
        det = []
        for token in tokens:
            if self.feed(token):
                det.append(self._total - 1)
        return det or None
