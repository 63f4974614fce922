"""Every error the pool reports to a client, with its HTTP status and stable code.

PoolError                                   body: {"error": {type, code, message, param},
│                                                  "detail": {code, model, message}}
├── 400 invalid_request          malformed body, bad field (param = msgspec path)
│       modality_unsupported     an image item for a text-only model (param = the item's path)
│       invalid_load_request     admin load overrides rejected
│       invalid_settings         admin settings reload rejected
│       request_cost_exceeds_max remote request over remote_budget_request_max
├── 401 unauthorized             missing/wrong bearer token
├── 403 remote_execution_disallowed
│       priority_not_allowed     a negative priority from a key not allowed it
├── 404 unknown_model / not_found
├── 405 method_not_allowed
├── 409 model_not_loaded / model_loading / model_unloading / model_failed
│       settings_reload_conflict / insufficient_gpu_memory
├── 413 payload_too_large
├── 429 executor_queue_full (Retry-After) / upstream_rate_limit / budget_exceeded
│       fairness_key_queue_full  (Retry-After) one key's waiting requests at its bound
├── 500 model_load_failed        the runtime refused to load (admin load only)
├── 502 backend_error / upstream_* (authentication_failure, invalid_request,
│       server_error, connection_error, response_parse_failure)
│       engine_crashed           the replica's engine process died mid-request
├── 503 queue_timeout / request_cancelled / shutting_down
│       pool_capacity_exhausted  (Retry-After) a load on demand found no idle model to evict
└── 504 upstream_timeout

A generic 500 ``internal_error`` exists only as the last-resort handler: it means a bug.
This module imports nothing from quart.

Whose words reach whom: a runtime's error text (a model's ``last_error``) is made one printable
line by :func:`printable` when it is stored; the admin API shows it whole, and every answer
outside it (inference errors, health probes) shows it through :func:`without_paths`.
"""

from __future__ import annotations

import re
from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class PoolError(Exception):
    """An error with an HTTP status, a stable ``code`` and a human message."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        model: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.model = model
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "type": self.type,
                "code": self.code,
                "message": self.message,
                "param": self.param,
            },
            "detail": {"code": self.code, "model": self.model, "message": self.message},
        }

    def __repr__(self) -> str:
        return f"PoolError({self.status}, {self.code!r}, {self.message!r})"


def invalid_request(message: str, *, param: str | None = None, model: str | None = None) -> PoolError:
    return PoolError(400, "invalid_request", message, param=param, model=model)


def unknown_model(model: str) -> PoolError:
    return PoolError(404, "unknown_model", f"unknown model {model!r}", model=model, param="model")


def queue_full(model: str, max_queue: int, retry_after_s: int = 1, *, setting: str = "max_queue") -> PoolError:
    return PoolError(
        429,
        "executor_queue_full",
        f"model {model!r} is busy: its queue is full ({setting}={max_queue}); retry later",
        model=model,
        headers={"Retry-After": str(retry_after_s)},
    )


def fairness_key_queue_full(model: str, key: str | None, limit: int, retry_after_s: int = 1) -> PoolError:
    who = "requests without a fairness_key" if key is None else f"fairness_key {key!r}"
    return PoolError(
        429,
        "fairness_key_queue_full",
        f"model {model!r}: {who} already have {limit} request(s) waiting "
        f"(engine.fairness.max_pending_per_key={limit}); retry later",
        model=model,
        headers={"Retry-After": str(retry_after_s)},
    )


def pool_capacity_exhausted(model: str, why: str, retry_after_s: int = 5) -> PoolError:
    """A load on demand needs room that no idle model can give back now."""
    return PoolError(
        503,
        "pool_capacity_exhausted",
        f"model {model!r} cannot be loaded now: {why}; retry later",
        model=model,
        headers={"Retry-After": str(retry_after_s)},
    )


def queue_timeout(model: str, timeout_s: float) -> PoolError:
    return PoolError(
        503,
        "queue_timeout",
        f"request waited more than {timeout_s:g}s in model {model!r}'s queue",
        model=model,
    )


def model_unloading(model: str) -> PoolError:
    return PoolError(409, "model_unloading", f"model {model!r} is unloading", model=model)


def request_cancelled(model: str, why: str) -> PoolError:
    return PoolError(503, "request_cancelled", f"request to model {model!r} was cancelled: {why}", model=model)


def backend_error(model: str, message: str) -> PoolError:
    """A job failed in its runtime; the runtime's text is shown without paths (see
    :func:`without_paths`): the caller may not be an admin."""
    return PoolError(502, "backend_error", f"model {model!r} failed: {without_paths(message)}", model=model)


def engine_crashed(model: str, message: str) -> PoolError:
    """A supervised engine process died while it ran the request (the replica restarts)."""
    return PoolError(502, "engine_crashed", f"model {model!r}: {message}", model=model)


def shutting_down() -> PoolError:
    return PoolError(503, "shutting_down", "the server is shutting down", headers={"Retry-After": "5"})


#: Longest runtime error text kept (``last_error``): one line of ``llm-pool status``, not a dump.
ERROR_TEXT_MAX = 400
#: What a filesystem path becomes in an answer outside the admin API.
PATH = "[path]"
_PATH_CHARS = r"""[^\s'"`()\[\]{}<>,;]"""
#: An absolute (``/…``), home (``~/…``) or dot-relative path, or a relative one with a letter in
#: its first part (``models/g.gguf``, never ``3/4``); never inside a URL (``http://h:1/v1``).
_PATH_RE = re.compile(
    rf"(?<![\w:/~.\-])(?:(?:~|\.{{1,2}})?/{_PATH_CHARS}*|[\w.\-]*[A-Za-z_][\w.\-]*/{_PATH_CHARS}*)"
)


def without_paths(text: str) -> str:
    """``text`` with every filesystem path replaced by ``[path]`` (a ``.`` or ``:`` ending it is
    kept): what an error text may say to a caller without the admin token, who has no business
    learning where the server keeps its files."""

    def replace(m: re.Match[str]) -> str:
        found = m.group()
        tail = len(found) - len(found.rstrip(".:"))
        return PATH + found[len(found) - tail :] if tail and tail < len(found) else PATH

    return _PATH_RE.sub(replace, text)


def _shown(c: str) -> bool:
    return c == " " or (c.isprintable() and c != "\ufffd")


def printable(text: str, limit: int = ERROR_TEXT_MAX) -> str:
    """``text`` as one printable line of at most ``limit`` characters.

    A run of whitespace becomes one space; any other run of characters that are not printable
    (controls, lone surrogates, U+FFFD from undecodable bytes) becomes ``[N unprintable
    characters]``: a runtime that quotes a random file's bytes in its exception must not garble
    a terminal (``llm-pool status``) or a log line.  Longer text is cut, ending in ``…``.
    """
    out: list[str] = []
    run: list[str] = []

    def close_run() -> None:
        if run:
            out.append(" " if all(c.isspace() for c in run) else f"[{len(run)} unprintable characters]")
            run.clear()

    for c in text:
        if _shown(c):
            close_run()
            out.append(c)
        else:
            run.append(c)
    close_run()
    line = re.sub(" {2,}", " ", "".join(out)).strip()
    return line if len(line) <= limit else line[: limit - 1] + "…"
