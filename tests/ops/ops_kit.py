"""Helpers for the operator-surface tests (metrics, health, OpenAPI, idle unload, status page).

The pool is ``support.server.start_pool`` over the echo fake of ``support.fake_backend`` with no
delay (the ``control`` fixture of conftest.py): its jobs are held by *events*, never by timers
(the ``"hold"`` input, until ``control.release()``), since ``/metrics`` reads GPUs on a worker
thread, and while a thread runs the autojump clock leaps to the next timer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

#: The models of an operator test that names none: one model, a queue of one, up to 2 replicas.
MODELS: dict[str, Any] = {"m": {"max_queue": 1, "replica_max": 2}}


@dataclass
class Samples:
    """A parsed exposition: ``samples[name, {labels}]``."""

    values: dict[tuple[str, frozenset[tuple[str, str]]], float]
    text: str

    @classmethod
    def parse(cls, text: str) -> Samples:
        values = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                values[(s.name, frozenset(s.labels.items()))] = s.value
        return cls(values, text)

    @classmethod
    async def scrape(cls, pool: Any) -> Samples:
        """GET /metrics of ``pool`` (a ``support.server.Pool``), parsed."""
        reply = await pool.get("/metrics")
        assert reply.status == 200, reply.raw
        return cls.parse(reply.text)

    def __call__(self, metric: str, /, **labels: str) -> float:
        key = (metric, frozenset(labels.items()))
        assert key in self.values, f"no sample {metric}{labels} in:\n{self.text}"
        return self.values[key]

    def names(self) -> set[str]:
        return {name for name, _ in self.values}
