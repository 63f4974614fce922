"""The request id (``X-Request-Id``) of the HTTP request being served, wherever its work runs.

One id ties together everything one HTTP request causes: its response header, every log line
written while it is served, its inference line, and the request forwarded to a remote upstream.
It is the caller's ``X-Request-Id`` when one was sent (sanitised by :func:`sanitise`), else the
id of the response the request produces (``resp_...``, ``chatcmpl-...``), else, for a request
that produces none (an admin call, a 404), a generated ``req_...``.

The web layer opens a :class:`RequestTrace` per request (:func:`request_trace`) before quart sees
it; quart-trio runs the handler in child tasks, which inherit the context variable and so share
the trace object.  :func:`adopt` (called by the serving layer when a job is created) fills in the
response id; :func:`current_id` fixes the id on first use, so every reader sees the same one.

Work that runs in another task (a replica's) carries the id on the job (``Job.trace_id``) and
re-binds it with :func:`bind`.  This module imports nothing of llm-pool: every layer may read it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

#: Longest caller id kept (longer ones are cut): an id is a log field and a header, never a payload.
MAX_ID_CHARS = 128
#: What a caller's id may contain; anything else (spaces, quotes, control bytes, non-ASCII) is
#: dropped, so an id can neither break a JSON log line's readers nor forge a header.
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/+=@-]")


class RequestTrace:
    """One HTTP request's id; ``id`` is None until the caller's, a response's or a generated one is set."""

    __slots__ = ("id", "outcome_logged")

    def __init__(self, given: str | None) -> None:
        self.id = given
        #: Set once the request's inference line is written: a refusal it reports (404
        #: unknown_model, 429 queue full...) needs no second line from the web layer.
        self.outcome_logged = False


_current: ContextVar[RequestTrace | None] = ContextVar("llm_pool_request_trace", default=None)


def sanitise(raw: str | None) -> str | None:
    """A caller's ``X-Request-Id`` as we keep it: unsafe characters dropped, at most
    :data:`MAX_ID_CHARS`; None when nothing is left (a generated id is used then)."""
    if raw is None:
        return None
    kept = _UNSAFE.sub("", raw)[:MAX_ID_CHARS]
    return kept or None


def new_id() -> str:
    return "req_" + secrets.token_hex(16)


@contextmanager
def request_trace(given: str | None) -> Iterator[RequestTrace]:
    """The trace of the request served inside the block (``given``: the sanitised caller id);
    tasks started inside it share it.  The task's previous trace (none) is restored after."""
    trace = RequestTrace(given)
    token = _current.set(trace)
    try:
        yield trace
    finally:
        _current.reset(token)


def mark_outcome_logged() -> None:
    """The request being served has its inference line (see :attr:`RequestTrace.outcome_logged`)."""
    trace = _current.get()
    if trace is not None:
        trace.outcome_logged = True


def outcome_logged() -> bool:
    trace = _current.get()
    return trace is not None and trace.outcome_logged


def bind(request_id: str) -> None:
    """Make ``request_id`` the current id of this task (a replica's task running one job)."""
    _current.set(RequestTrace(request_id))


def adopt(response_id: str) -> str:
    """The id of the request that creates the response ``response_id``: the caller's (or one
    already fixed), else ``response_id`` itself, which it then becomes.  Outside a request
    (no trace), ``response_id``."""
    trace = _current.get()
    if trace is None:
        return response_id
    if trace.id is None:
        trace.id = response_id
    return trace.id


def current_id() -> str | None:
    """The id of the request being served, fixed now (a generated one) if none was set yet;
    None outside a request."""
    trace = _current.get()
    if trace is None:
        return None
    if trace.id is None:
        trace.id = new_id()
    return trace.id
