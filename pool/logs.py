"""Structured logging: one JSON object per line on stderr.

Callers pass structured data as ``extra={"fields": {...}}``; the message becomes ``event``.
A line written while an HTTP request is served carries that request's ``request_id`` (its
``X-Request-Id``, see :mod:`pool.tracing`) unless its fields name one themselves: the handler's
:class:`RequestIdFilter` reads it when the line is written, in the writer's task.
Secrets never reach this module: callers log names of variables, never their values.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

from llm_pool.pool.tracing import current_id

_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            out["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(out).decode()


class RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request being served where it was written (a
    filter, not the formatter: a handler may format later, or in another thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_id()
        return True


def json_handler(stream: Any = None) -> logging.Handler:
    """A handler writing JSON lines to ``stream`` (stderr), stamped with request ids."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(level: str) -> None:
    handler = json_handler()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("hypercorn.access", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel("WARNING")
