"""The OpenAI-compatible remote backend: jobs become Chat Completions calls to an upstream API.

An async backend (``threaded = False``): ``load``, ``serve`` and ``close`` run in the replica's
trio task, each job in its own task; ``capability`` is the configured ``target_inflight`` (how
many upstream calls one replica makes at once).  One ``httpx.AsyncClient`` per replica.

Request → upstream (``POST {remote_base_url}/chat/completions``, ``Authorization: Bearer <key>``,
``X-Request-Id: <the pool request's id>`` so both sides' logs can be joined)::

    {"model": remote_model,
     "messages": [{"role": "system", "content": instructions or DEFAULT_SYSTEM_PROMPT},
                  {"role": "user", "content": input}],   # /v1/responses; a conversation's
                                                          # turns after its system turn; a
                                                          # content with images as text and
                                                          # image_url parts
     "temperature", "top_p", "max_tokens", "stop" (only if non-empty),
     "seed" (only if the caller sent one), "presence_penalty" / "frequency_penalty" (only if not 0),
     "thinking": {"type": "enabled"|"disabled"} (the request's ``thinking``, else
                  remote_thinking; only if one is set),
     "stream": true, "stream_options": {"include_usage": true} (stream requests only),
     "response_format", "tools", "tool_choice" (only if the request has them; issue 16)}

Assistant turns keep their ``tool_calls`` and tool turns their ``tool_call_id``.  When the
request offered tools, an answer's ``tool_calls`` (whole, or stream deltas joined by ``index``)
become ``Job.tool_calls`` and a null content is an empty text; without tools they are a parse
failure as before.

A raw prompt (``/v1/completions``) goes to ``POST {remote_base_url}/completions`` instead, with
``prompt`` as sent (no system turn) and the answer's ``choices[0].text`` kept as the upstream
sent it; an embeddings job (``embeddings = true``) to ``POST {remote_base_url}/embeddings``
(``input``, ``encoding_format: float``), one vector per input in order.

``beam_size``, ``top_k`` and ``repetition_penalty`` are accepted, logged (debug) and not sent.
The text is ``choices[0].message.content`` stripped (streams: deltas are forwarded as they arrive,
leading whitespace dropped and trailing whitespace held back, so the concatenation is the stripped
text); usage becomes ``engine_prompt_tokens`` / ``engine_output_tokens``.

Upstream failures (:class:`pool.errors.PoolError`, ``model`` set)::

    HTTP 401 / 403                 → 502 upstream_authentication_failure
    HTTP 429                       → 429 upstream_rate_limit (Retry-After passed on)
    other HTTP 4xx                 → 502 upstream_invalid_request (with the upstream's message)
    HTTP 5xx                       → 502 upstream_server_error (with the upstream's message)
    no answer in remote_timeout_s  → 504 upstream_timeout
    connect failure, lost stream   → 502 upstream_connection_error
    not JSON, no choices, non-text → 502 upstream_response_parse_failure

The API key never appears in a message or a log line: it is only put in the ``Authorization``
header, and any upstream text quoted in an error has it replaced by ``[redacted]`` before the
text is cut to ``QUOTE_MAX`` characters (and a start of the key left at the text's end, where the
upstream cut its own echo, is replaced too).

Retries (``remote_max_retries``): only for connect failures (the request never left), 429 and
5xx (the upstream refused it), only while nothing was emitted, with exponential backoff and
jitter (at least the upstream's ``Retry-After``), and never past the request's deadline
(``remote_timeout_s`` from the job's start).  A connection lost *after* the request was sent is
not retried: the upstream may have done (and billed) the work.

Timeouts: a non-stream call must be answered within ``remote_timeout_s`` (retries included); a
stream must start within it, then each read may wait up to ``remote_timeout_s``.

Costs: see :mod:`backends.ledger`.  :meth:`RemoteBackend.admit` reserves the request's maximum
cost before it is queued (the manager calls it); the job's end writes the closing event and
puts the cost in ``GenerationStats.cost`` (the response's ``request_cost``).

Several endpoints (``remote_endpoints``; issue 18): each endpoint is one replica (the replica's
``BackendContext.slot`` names it), so the scheduler's least-loaded choice (per unit of
``weight``), queue, fairness, budgets, ledger and the ``allow_remote`` gate sit in front of all
of them, and ``target_inflight`` is per endpoint.  Each such replica keeps its endpoint's
health::

    in rotation ──▶ ejected      remote_eject_after_failures consecutive connect errors, 5xx or
         ▲              │        timeouts (passive, Envoy's outlier detection), or one failed probe;
         │              │        for remote_eject_base_s × 2^(ejections in a row − 1), capped at
         └──────────────┘        remote_eject_max_s; back with the first passing probe after that

An active probe every ``remote_probe_interval_s``: ``GET {base}/models`` (``remote_upstream =
"openai"``), or ``GET {origin}/health/ready/{remote_model}`` for another llm-pool
(``remote_upstream = "llm_pool"``, which is also sent each request's ``fairness_key`` and
``priority`` as body fields, beside ``X-Request-Id``).  The ejection count starts again once
the endpoint stayed in rotation for ``remote_eject_max_s``.  An ejected replica takes no new job
while another is in rotation (when all are ejected, all are tried: Envoy's panic mode).  A job
whose attempt failed with a connect error, 5xx, 429 or timeout before any of its text reached
the client is handed back to the scheduler once (``Job.retry_elsewhere``) and runs on another
endpoint in rotation; one already sent upstream closes its reservation as
``failed_after_submit`` first and reserves again there.  The one-endpoint form
(``remote_base_url``) keeps no health: there is nowhere else to go.

Cancellation: a small task waits for the job to be cancelled (:func:`~backends.base.cancel_when_stopped`,
no polling) and cancels the job's scope: the upstream stream is closed at once and the job finishes ``cancelled`` (or fails with its cancel error).  When the replica's scope is
cancelled (unload), every job still running or still in the inbox is ended the same way.  Every
job this backend receives ends with ``finish`` or ``fail``, and every reservation with a closing
event, whatever happened.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import os
import random
import ssl
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from llm_pool.backends.base import BackendKind, cancel_when_stopped
from llm_pool.backends.decoding import AT_MOST_4_STOPS
from llm_pool.backends.ledger import Account, Prices, check_ledger_path, ledger_for, summarize
from llm_pool.backends.structured import new_call_id, offers_tools
from llm_pool.config import DEFAULT_SYSTEM_PROMPT, ModelSettings, Settings
from llm_pool.pool.errors import PoolError, request_cancelled
from llm_pool.pool.jobs import GenerationRequest, GenerationStats, Job, Message, ToolCall
from llm_pool.pool.tracing import bind

if TYPE_CHECKING:
    from llm_pool.backends.base import BackendContext

log = logging.getLogger("llm_pool.remote")

#: First retry backoff; doubles per retry (then jittered to 50-100 %), capped at RETRY_MAX_S.
RETRY_BASE_S = 0.2
RETRY_MAX_S = 8.0
#: Failures that count against an endpoint's health and may be retried on another endpoint
#: (``upstream_rate_limit`` is retried elsewhere but is no sign of a sick endpoint).
UNHEALTHY_CODES = frozenset({"upstream_connection_error", "upstream_server_error", "upstream_timeout"})
RETRY_ELSEWHERE_CODES = UNHEALTHY_CODES | {"upstream_rate_limit"}
#: Upstream text quoted in an error message is cut to this many characters.
QUOTE_MAX = 300
REDACTED = "[redacted]"


# ---------------------------------------------------------------------- request and response shapes
def messages_for(request: GenerationRequest) -> list[Message]:
    """The messages sent upstream: the system prompt (instructions or the default), then the
    conversation's turns in order (one user turn for ``/v1/responses``)."""
    return [
        Message(role="system", content=request.system or DEFAULT_SYSTEM_PROMPT),
        *(m for m in request.messages if m.role != "system"),
    ]


def wire_content(m: Message) -> str | list[dict[str, Any]]:
    """A message's Chat Completions ``content``: its text, or, when it holds images, its items
    in order as ``text`` and ``image_url`` parts (``data:`` URLs, or ``http(s)://`` ones the
    model's ``image_url_fetch`` let through: the upstream fetches them)."""
    if m.parts is None:
        return m.content
    return [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": {"url": p.url, "detail": p.detail}}
        for p in m.parts
    ]


def cost_messages(request: GenerationRequest) -> list[Message]:
    """What a request's cost is estimated from: its messages, or its raw prompt or inputs."""
    if request.embed_inputs is not None:
        return [Message(role="user", content=t) for t in request.embed_inputs]
    if request.raw_prompt is not None:
        return [Message(role="user", content=request.raw_prompt)]
    return messages_for(request)


def cost_max_tokens(request: GenerationRequest) -> int:
    """The most output tokens a request may be billed for (embeddings: none)."""
    return 0 if request.embed_inputs is not None else request.decoding.max_tokens


#: The upstream path of each job kind (issue 16 §2: /v1/completions, /v1/embeddings).
UPSTREAM_PATHS = {"chat": "/chat/completions", "raw": "/completions", "embed": "/embeddings"}


def build_body(model: ModelSettings, request: GenerationRequest, *, stream: bool) -> dict[str, Any]:
    """The upstream body for ``request``: Chat Completions (see the module docstring), legacy
    Completions (``prompt`` as sent, no system turn) or Embeddings (``input``, floats)."""
    d = request.decoding
    if request.embed_inputs is not None:
        return {"model": model.remote_model, "input": list(request.embed_inputs), "encoding_format": "float"}
    prompt: dict[str, Any] = (
        {"prompt": request.raw_prompt}
        if request.raw_prompt is not None
        else {"messages": [wire_message(m) for m in messages_for(request)]}
    )
    body: dict[str, Any] = {
        "model": model.remote_model,
        **prompt,
        "temperature": d.temperature,
        "top_p": d.top_p,
        "max_tokens": d.max_tokens,
    }
    if d.stop:
        body["stop"] = list(d.stop)
    if d.seed is not None:
        body["seed"] = d.seed
    if d.presence_penalty:
        body["presence_penalty"] = d.presence_penalty
    if d.frequency_penalty:
        body["frequency_penalty"] = d.frequency_penalty
    thinking = model.remote_thinking if request.thinking == "default" else request.thinking
    if thinking is not None and request.raw_prompt is None:
        body["thinking"] = {"type": thinking}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    body.update(output_contract(request))
    return body


def parse_embeddings(raw: bytes, count: int, *, model: str, key: str) -> tuple[list[list[float]], Usage | None]:
    """The ``count`` vectors (in input order) and usage of an Embeddings answer;
    :class:`UpstreamFailure` (parse failure) otherwise."""
    try:
        data = json.loads(raw)
    except ValueError:
        excerpt = quote(raw.decode("utf-8", "replace"), key)
        raise UpstreamFailure(parse_failure(model, f"the upstream's answer is not JSON: {excerpt!r}"), submitted=True) from None
    items = data.get("data") if isinstance(data, dict) else None
    u = data.get("usage") if isinstance(data, dict) else None
    usage = None
    if isinstance(u, dict) and isinstance(u.get("prompt_tokens"), int) and not isinstance(u.get("prompt_tokens"), bool):
        usage = Usage(u["prompt_tokens"], 0)
    vectors: dict[int, list[float]] = {}
    for item in items if isinstance(items, list) else ():
        if not isinstance(item, dict):
            continue
        index, vector = item.get("index"), item.get("embedding")
        if isinstance(index, int) and isinstance(vector, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector
        ):
            vectors[index] = [float(x) for x in vector]
    if sorted(vectors) != list(range(count)):
        raise UpstreamFailure(
            parse_failure(model, f"the upstream's answer does not hold {count} embedding vector(s) of numbers"),
            submitted=True,
            usage=usage,
        )
    return [vectors[i] for i in range(count)], usage


# structured output and tool calling (issue 16): passed on as Chat Completions fields
def wire_message(m: Message) -> dict[str, Any]:
    """A message as Chat Completions takes it (an assistant turn's calls, a tool turn's id)."""
    out: dict[str, Any] = {"role": m.role, "content": wire_content(m)}
    if m.tool_calls:
        out["content"] = m.content or None
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def output_contract(request: GenerationRequest) -> dict[str, Any]:
    """``response_format``, ``tools`` and ``tool_choice`` for the upstream, where set."""
    out: dict[str, Any] = {}
    rf = request.response_format
    if rf is not None and rf.type == "json_object":
        out["response_format"] = {"type": "json_object"}
    elif rf is not None:
        spec: dict[str, Any] = {"name": rf.name or "response"}
        for key in ("description", "schema", "strict"):
            if getattr(rf, key) is not None:
                spec[key] = getattr(rf, key)
        out["response_format"] = {"type": "json_schema", "json_schema": spec}
    if request.tools:
        out["tools"] = [
            {
                "type": "function",
                "function": {
                    k: v
                    for k, v in (("name", t.name), ("description", t.description), ("parameters", t.parameters), ("strict", t.strict))
                    if v is not None
                },
            }
            for t in request.tools
        ]
        out["tool_choice"] = (
            {"type": "function", "function": {"name": request.tool_name}} if request.tool_name else request.tool_choice
        )
    return out


def priced_messages(request: GenerationRequest) -> list[Message]:
    """What a request's cost is estimated from: its messages, plus the tools, response format
    and earlier calls it sends as one more message's worth of text (they are prompt tokens too)."""
    extra = output_contract(request)
    calls = [c for m in request.messages for c in m.tool_calls or ()]
    if calls:
        extra["calls"] = [[c.name, c.arguments] for c in calls]
    messages = cost_messages(request)
    return [*messages, Message(role="system", content=json.dumps(extra))] if extra else messages


def parse_tool_calls(value: Any, model: str) -> list[ToolCall]:
    """An upstream answer's ``tool_calls`` (a list of ``{id, function: {name, arguments}}``)."""
    calls = []
    for c in value if isinstance(value, list) else ():
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(f.get("arguments", ""), str):
            raise parse_failure(model, "the upstream returned a tool call that is not a function call")
        calls.append(ToolCall(id=str(c.get("id") or new_call_id()), name=f["name"], arguments=f.get("arguments", "")))
    return calls


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    output_tokens: int


def parse_usage(obj: Any) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    p, c = obj.get("prompt_tokens"), obj.get("completion_tokens")
    if isinstance(p, int) and isinstance(c, int) and not isinstance(p, bool) and not isinstance(c, bool):
        return Usage(p, c)
    return None


#: The shortest start of the key that a quoted text's end is checked for ("sk-" alone is every
#: key's prefix, not a secret).
PARTIAL_KEY_MIN = 4
#: What may follow a partial key the upstream cut off itself ("sk-abc…", "sk-abc...").
_ELLIPSIS = ".…"


def redact(text: str, key: str) -> str:
    """``text`` with every occurrence of ``key`` replaced by ``[redacted]``, and a start of the key
    (``PARTIAL_KEY_MIN`` characters or more) left at the text's end (an upstream that cut its own
    echo) replaced too."""
    if not key:
        return text
    text = text.replace(key, REDACTED)
    body = text.rstrip(_ELLIPSIS)
    for n in range(min(len(key) - 1, len(body)), PARTIAL_KEY_MIN - 1, -1):
        if body.endswith(key[:n]):
            return body[:-n] + REDACTED + text[len(body) :]
    return text


def quote(text: str, key: str) -> str:
    """Upstream ``text`` as an error message may quote it: whitespace collapsed, the key redacted
    (see :func:`redact`), then cut to ``QUOTE_MAX`` characters.

    Redaction comes first: cut first, a key across the cut loses its end and no longer matches
    (the first 13 characters of the key leaked that way).  The cut never splits ``[redacted]``.
    """
    text = redact(" ".join(text.split()), key)
    if len(text) <= QUOTE_MAX:
        return text
    cut = QUOTE_MAX - 1
    marker = text.rfind(REDACTED, 0, cut + len(REDACTED))
    if marker != -1 and marker < cut < marker + len(REDACTED):
        cut = marker
    return text[:cut] + "…"


def upstream_message(body: bytes, key: str) -> str:
    """The upstream's own error message (OpenAI's ``{"error": {"message"}}`` and kin), else the
    body's start; quoted by :func:`quote` (the key redacted, then cut)."""
    text: Any = None
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            text = err.get("message")
        elif isinstance(err, str):
            text = err
        if not isinstance(text, str):
            text = data.get("message") if isinstance(data.get("message"), str) else None
    if not isinstance(text, str):
        text = body.decode("utf-8", "replace")
    return quote(text, key) or "(no message)"


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` as seconds (a number or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def status_error(status: int, body: bytes, headers: httpx.Headers, *, model: str, key: str, key_env: str) -> PoolError:
    """The client's error for an upstream HTTP error status."""
    if status in (401, 403):
        return PoolError(
            502,
            "upstream_authentication_failure",
            f"the upstream rejected the API key from environment variable {key_env} (HTTP {status})",
            model=model,
        )
    message = upstream_message(body, key)
    if status == 429:
        retry = headers.get("retry-after")
        return PoolError(
            429,
            "upstream_rate_limit",
            f"the upstream is rate limiting (HTTP 429): {message}",
            model=model,
            headers={"Retry-After": retry} if retry else None,
        )
    if 400 <= status < 500:
        return PoolError(
            502,
            "upstream_invalid_request",
            f"the upstream rejected the request (HTTP {status}): {message}",
            model=model,
        )
    if status >= 500:
        return PoolError(502, "upstream_server_error", f"upstream server error (HTTP {status}): {message}", model=model)
    return parse_failure(model, f"unexpected HTTP status {status} from the upstream")


def parse_failure(model: str, message: str) -> PoolError:
    return PoolError(502, "upstream_response_parse_failure", message, model=model)


def _non_text(content: Any, extra: dict[str, Any]) -> str:
    if content is None:
        kinds = [k for k in ("tool_calls", "function_call", "refusal", "audio") if extra.get(k)]
        return f"the upstream returned no text content ({', '.join(kinds) or 'content is null'})"
    return f"the upstream returned non-text content (a JSON {type(content).__name__}, not a string)"


def parse_completion(
    raw: bytes, *, model: str, key: str, legacy: bool = False
) -> tuple[str, str | None, Usage | None]:
    """(stripped text, finish_reason, usage) of a non-stream answer; :class:`UpstreamFailure`
    (parse failure, carrying the usage if there was one) otherwise.  ``legacy``: a
    ``text_completion`` (``choices[0].text``, kept as sent)."""
    try:
        data = json.loads(raw)
    except ValueError:
        excerpt = quote(raw.decode("utf-8", "replace"), key)
        raise UpstreamFailure(
            parse_failure(model, f"the upstream's answer is not JSON: {excerpt!r}"), submitted=True
        ) from None
    if not isinstance(data, dict):
        raise UpstreamFailure(parse_failure(model, "the upstream's answer is not a JSON object"), submitted=True)
    usage = parse_usage(data.get("usage"))
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamFailure(parse_failure(model, "the upstream's answer has no choices"), submitted=True, usage=usage)
    choice = choices[0]
    if legacy:
        text = choice.get("text")
        if not isinstance(text, str):
            raise UpstreamFailure(parse_failure(model, _non_text(text, {})), submitted=True, usage=usage)
        finish = choice.get("finish_reason")
        return text, finish if isinstance(finish, str) else None, usage
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        detail = _non_text(content, message if isinstance(message, dict) else {})
        raise UpstreamFailure(parse_failure(model, detail), submitted=True, usage=usage)
    finish = choice.get("finish_reason")
    return content.strip(), finish if isinstance(finish, str) else None, usage


class UpstreamFailure(Exception):
    """One attempt failed: the client's error, whether retrying may help, and what it means for
    the ledger (``submitted``: the upstream may have done billable work; ``usage`` if known)."""

    def __init__(
        self,
        error: PoolError,
        *,
        submitted: bool,
        retryable: bool = False,
        retry_after: float | None = None,
        usage: Usage | None = None,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.submitted = submitted
        self.retryable = retryable
        self.retry_after = retry_after
        self.usage = usage


# ---------------------------------------------------------------------- costs
def make_account(name: str, model: ModelSettings, base_dir: str) -> Account | None:
    """The model's :class:`Account` (None without prices), its ledger validated and replayed.
    Raises ``ValueError`` naming the setting that is wrong."""
    p_in, p_out = model.remote_price_input_per_1m, model.remote_price_output_per_1m
    if (p_in is None) != (p_out is None):
        raise ValueError("remote_price_input_per_1m and remote_price_output_per_1m must be set together")
    if p_in is None or p_out is None:
        for key in ("remote_budget_daily", "remote_budget_request_max", "remote_cost_ledger_path"):
            if getattr(model, key) is not None:
                raise ValueError(f"{key} needs remote_price_input_per_1m and remote_price_output_per_1m")
        return None
    if model.remote_budget_daily is not None and model.remote_cost_ledger_path is None:
        raise ValueError("remote_budget_daily needs remote_cost_ledger_path (today's spend must survive a restart)")
    prices = Prices(p_in, p_out, model.remote_price_currency)
    ledger = None
    if model.remote_cost_ledger_path is not None:
        ledger = ledger_for(check_ledger_path(model.remote_cost_ledger_path, base_dir))
        try:
            ledger.replay(name, currency=prices.currency, stale_after_s=model.remote_reservation_stale_after_s)
        except OSError as e:
            raise ValueError(
                f"remote_cost_ledger_path {model.remote_cost_ledger_path!r}: cannot read it: {e.strerror}"
            ) from None
    return Account(
        name,
        prices,
        ledger=ledger,
        budget_daily=model.remote_budget_daily,
        budget_request_max=model.remote_budget_request_max,
        stale_after_s=model.remote_reservation_stale_after_s,
    )


def cost_summary(settings: Settings, model: ModelSettings, name: str) -> dict[str, Any] | None:
    """Today's spend and what remains, for the admin row (None when the model has no prices).
    Reads the ledger if it exists; loaded or not, never creates or writes anything."""
    p_in, p_out = model.remote_price_input_per_1m, model.remote_price_output_per_1m
    if p_in is None or p_out is None:
        return None
    path = None
    if model.remote_cost_ledger_path is not None:
        path = Path(model.remote_cost_ledger_path).expanduser()
        if not path.is_absolute():
            path = Path(settings.base_dir) / path
    try:
        return summarize(
            name,
            Prices(p_in, p_out, model.remote_price_currency),
            budget_daily=model.remote_budget_daily,
            budget_request_max=model.remote_budget_request_max,
            stale_after_s=model.remote_reservation_stale_after_s,
            ledger_path=path,
        )
    except OSError as e:
        return {"error": f"cannot read the cost ledger {path}: {e.strerror}"}


def _ledger_unavailable(model: str, error: OSError) -> PoolError:
    return PoolError(
        503,
        "cost_ledger_unavailable",
        f"model {model!r}: cannot write its cost ledger ({error.strerror}); remote requests are refused until it is writable",
        model=model,
    )


# ---------------------------------------------------------------------- the backend
@dataclass
class _Call:
    """One job's progress, as the ledger and the retry rule need it."""

    amount: float = 0.0  # the reservation (the most the request may cost)
    in_flight: bool = False  # an attempt is out, or an answer is being read
    emitted: bool = False
    pending_ws: str = ""
    t_first: float | None = None
    usage: Usage | None = None
    attempts: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: The pool request's ``X-Request-Id`` (``Job.trace_id``), forwarded upstream.
    request_id: str = ""


class RemoteBackend:
    """One replica of a remote model; see the module docstring."""

    threaded = False
    crashed = False  # no engine process of its own to die

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx
        self.name = ctx.name
        self.replica = f"{ctx.name}#{ctx.replica_index}"
        self.model = ctx.model
        self.capability = ctx.model.target_inflight
        endpoints = ctx.model.endpoints()
        endpoint = endpoints[ctx.slot % len(endpoints)]
        self.base_url = endpoint.base_url.rstrip("/")
        self.key_env = endpoint.api_key_env or ctx.model.remote_api_key_env or ""
        self.account: Account | None = None
        self._key = ""
        self._client: httpx.AsyncClient | None = None
        # -- the endpoint's health (issue 18; module docstring); kept only with remote_endpoints
        self.weight = endpoint.weight
        self.tracks_health = bool(ctx.model.remote_endpoints)
        self.ejected = False
        self.ejections = 0  # in a row (see _eject)
        self.failures = 0  # consecutive failed attempts
        self.last_error: str | None = None
        self.last_probe_ok: bool | None = None
        self._ejected_until = 0.0
        self._in_rotation_since = 0.0
        self._rotation = trio.Event()

    def describe(self) -> dict[str, object]:
        return {
            "base_url": self.base_url,
            "remote_model": self.model.remote_model,
            "api_key_env": self.key_env,
            "health_check": self.model.remote_health_check,
            "max_retries": self.model.remote_max_retries,
            "endpoint": self.endpoint_state(),
        }

    def endpoint_state(self) -> dict[str, object]:
        """The admin row's view of this endpoint (never the key; the URL carries none)."""
        left = self._ejected_until - trio.current_time() if self.ejected else 0.0
        return {
            "base_url": self.base_url,
            "weight": self.weight,
            "state": "ejected" if self.ejected else "in_rotation",
            "ejected_for_s": round(max(0.0, left), 1) if self.ejected else None,
            "ejections": self.ejections,
            "consecutive_failures": self.failures,
            "last_probe_ok": self.last_probe_ok,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ health (issue 18)
    async def rotation_changed(self) -> None:
        """Return when :attr:`ejected` changed (or the backend closed)."""
        await self._rotation.wait()

    def _rotated(self) -> None:
        self._rotation.set()
        self._rotation = trio.Event()

    def _eject(self, why: str) -> None:
        now = trio.current_time()
        if now - self._in_rotation_since >= self.model.remote_eject_max_s:
            self.ejections = 0  # it served long enough: a new count
        self.ejections += 1
        duration = min(self.model.remote_eject_max_s, self.model.remote_eject_base_s * 2 ** (self.ejections - 1))
        self._ejected_until = now + duration
        self.ejected = True
        self.failures = 0
        self.last_error = why
        log.warning(
            "endpoint ejected",
            extra={"fields": {"model": self.name, "replica": self.replica, "endpoint": self.base_url,
                              "ejected_for_s": duration, "ejections": self.ejections, "error": why}},
        )
        self._rotated()

    def _reinstate(self) -> None:
        self.ejected = False
        self._in_rotation_since = trio.current_time()
        log.info(
            "endpoint reinstated",
            extra={"fields": {"model": self.name, "replica": self.replica, "endpoint": self.base_url}},
        )
        self._rotated()

    def _note_attempt(self, failure: UpstreamFailure | None) -> None:
        """Passive health: a success clears the count; connect errors, 5xx and timeouts add up."""
        if not self.tracks_health:
            return
        if failure is None:
            self.failures = 0
            return
        if failure.error.code not in UNHEALTHY_CODES or self.ejected:  # (ejected: keep why)
            return
        self.failures += 1
        self.last_error = failure.error.message
        n = self.model.remote_eject_after_failures
        if self.failures >= n and not self.ejected:
            self._eject(f"{n} consecutive failures; last: {failure.error.message}")

    def probe_url(self) -> str:
        if self.model.remote_upstream == "llm_pool":
            parts = urllib.parse.urlsplit(self.base_url)
            model = urllib.parse.quote(self.model.remote_model or "", safe="")
            return f"{parts.scheme}://{parts.netloc}/health/ready/{model}"
        return f"{self.base_url}/models"

    async def _probe(self) -> str | None:
        """One active probe: None if it passed, else why not."""
        assert self._client is not None, "not loaded"
        url = self.probe_url()
        timeout = min(self.model.remote_timeout_s, max(1.0, self.model.remote_probe_interval_s))
        try:
            with trio.fail_after(timeout):
                r = await self._client.get(url, headers=self._headers())
        except (trio.TooSlowError, httpx.TimeoutException):
            return f"probe GET {url}: no answer within {timeout:g}s"
        except httpx.TransportError as e:
            return f"probe GET {url}: {type(e).__name__}: {redact(str(e), self._key) or 'no detail'}"
        if r.status_code != 200:
            return f"probe GET {url}: HTTP {r.status_code}"
        return None

    async def _probe_once(self) -> None:
        why = await self._probe()
        self.last_probe_ok = why is None
        if why is None:
            if self.ejected and trio.current_time() >= self._ejected_until:
                self._reinstate()
        elif not self.ejected:  # (while ejected, last_error keeps why it was ejected)
            self._eject(f"health probe failed: {why}")

    async def _probe_forever(self) -> None:
        while True:
            await trio.sleep(self.model.remote_probe_interval_s)
            await self._probe_once()

    # ------------------------------------------------------------------ lifetime
    async def load(self) -> None:
        """Check the configuration and the key, open the ledger, and (``models_endpoint``) ask
        the upstream for its model list.  Raises with the reason; the model is then ``failed``."""
        m = self.model
        if not self.key_env:
            raise RuntimeError("missing API key environment variable: remote_api_key_env is not set")
        key = os.environ.get(self.key_env, "").strip()
        if not key:
            raise RuntimeError(f"missing API key environment variable: {self.key_env}")
        if not self.base_url.startswith(("http://", "https://")):
            raise RuntimeError(f"remote_base_url must start with http:// or https://, got {self.base_url!r}")
        try:
            self.account = make_account(self.name, m, self.ctx.settings.base_dir)
        except ValueError as e:
            raise RuntimeError(str(e)) from None
        self._key = key
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(m.remote_timeout_s), verify=_tls_context(), follow_redirects=False
        )
        try:
            if m.remote_health_check == "models_endpoint" and not self.tracks_health:
                await self._check_models(client)
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.aclose()
            raise
        self._client = client
        if self.tracks_health:  # one endpoint down never fails the load: it starts ejected
            self._in_rotation_since = trio.current_time()
            await self._probe_once()

    async def _check_models(self, client: httpx.AsyncClient) -> None:
        url = f"{self.base_url}/models"
        fail = f"health check GET {url} failed"
        timeout = self.model.remote_timeout_s
        try:
            with trio.fail_after(timeout):
                r = await client.get(url, headers=self._headers())
        except (trio.TooSlowError, httpx.TimeoutException):
            raise RuntimeError(f"{fail}: no answer within {timeout:g}s") from None
        except httpx.TransportError as e:
            raise RuntimeError(f"{fail}: {type(e).__name__}: {redact(str(e), self._key)}") from None
        if r.status_code != 200:
            error = status_error(
                r.status_code, r.content, r.headers, model=self.name, key=self._key, key_env=self.key_env
            )
            raise RuntimeError(f"{fail}: {error.message}")
        try:
            data = r.json()
            ids = [item["id"] for item in data["data"]]
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"{fail}: the answer is not a model list") from None
        if self.model.remote_model not in ids:
            log.warning(
                "remote model not listed by the upstream",
                extra={"fields": {"model": self.name, "remote_model": self.model.remote_model, "listed": len(ids)}},
            )

    async def close(self) -> None:
        self._rotated()  # wakes the scheduler's watcher (it then follows a new backend)
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"}

    # ------------------------------------------------------------------ admission (trio thread)
    def admit(self, job: Job, submit: Callable[[Job], None]) -> None:
        """Queue ``job`` through ``submit`` with its cost reserved first.

        Called by the manager before the queue: 400 ``request_cost_exceeds_max`` / 429
        ``budget_exceeded`` (or 503 ``cost_ledger_unavailable``) are raised here and nothing is
        queued.  If ``submit`` refuses the job, or the job ends while still queued (queue timeout,
        client gone, unload), the reservation is released.
        """
        account = self.account
        if account is None:
            submit(job)
            return
        self._reserve(job)
        try:
            submit(job)
        except BaseException as e:
            reason = f"refused at admission: {e.code}" if isinstance(e, PoolError) else "refused at admission"
            account.close("released", job.id, cost=0.0, reason=reason)
            raise

        def release_if_never_sent(j: Job, error: PoolError | None) -> None:
            if j.t_dispatched is None:  # ended in its queue: it never reached this backend
                account.close("released", j.id, cost=0.0, reason="ended before it left the queue")

        job.on_end.append(release_if_never_sent)

    def _reserve(self, job: Job) -> None:
        assert self.account is not None
        try:
            self.account.reserve(job.id, priced_messages(job.request), cost_max_tokens(job.request))
        except OSError as e:
            raise _ledger_unavailable(self.name, e) from None

    # ------------------------------------------------------------------ serving
    async def serve(self, inbox: trio.MemoryReceiveChannel[Job | None]) -> None:
        """Run each job in its own task until ``inbox`` is closed and every job has ended."""
        try:
            async with trio.open_nursery() as probes:
                if self.tracks_health:
                    probes.start_soon(self._probe_forever, name=f"{self.replica} probe")
                async with trio.open_nursery() as nursery:
                    async for job in inbox:
                        if job is not None:
                            nursery.start_soon(self._run_job, job, name=f"{self.replica} {job.id}")
                probes.cancel_scope.cancel()
        finally:
            self._end_undelivered(inbox)

    def _end_undelivered(self, inbox: trio.MemoryReceiveChannel[Job | None]) -> None:
        """Jobs dispatched to this replica that it never started (the replica was cancelled)."""
        while True:
            try:
                job = inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if job is not None:
                if self.account is not None:
                    self.account.close("released", job.id, cost=0.0, reason="the replica stopped before running it")
                job.fail(job.cancel_error or request_cancelled(self.name, f"replica {self.replica} stopped"))

    async def _run_job(self, job: Job) -> None:
        bind(job.trace_id)  # this task's log lines carry the request's id
        call = _Call(request_id=job.trace_id)
        stats: GenerationStats | None = None
        error: Exception | None = None
        try:
            if job.should_stop():
                return
            if self.account is not None:
                call.amount = self.account.estimate(priced_messages(job.request), cost_max_tokens(job.request))[0]
                if not self.account.holds(job.id):  # admitted without the manager's hook
                    self._reserve(job)
            job.begin()
            with call.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_stopped, job, call.scope)
                    try:
                        stats = await self._generate(job, call)
                    except Exception as e:  # caught here, not wrapped in the nursery's group
                        error = e
                    nursery.cancel_scope.cancel()
        except Exception as e:
            error = e
        finally:
            self._end(job, call, stats, error)

    def _end(self, job: Job, call: _Call, stats: GenerationStats | None, error: Exception | None) -> None:
        """End the job and close its reservation, whatever happened (sync: safe in a finally)."""
        if isinstance(error, PoolError):  # the reservation itself was refused: nothing to close
            job.fail(error)
            return
        if isinstance(error, UpstreamFailure) and self._hand_back(job, call, error):
            return
        if isinstance(error, UpstreamFailure):
            log.warning(
                "upstream call failed",
                extra={
                    "fields": {
                        "model": self.name,
                        "request_id": job.trace_id,
                        "code": error.error.code,
                        "message": error.error.message,
                        "attempts": call.attempts,
                    }
                },
            )
        cost = self._close_reservation(job, call, stats, error)
        if stats is not None:
            stats.cost = cost
            job.finish(stats)
        elif isinstance(error, UpstreamFailure):
            job.fail(error.error)
        elif error is not None:  # a bug in this adapter: logged by Job.fail, 502 to the client
            job.fail(error)
        elif job.cancel_error is not None:  # cancelled by the pool (unload past its drain)
            job.fail(job.cancel_error)
        else:  # cancelled: the client went away
            job.finish(GenerationStats(finish_reason="cancelled", cost=cost))

    def _hand_back(self, job: Job, call: _Call, error: UpstreamFailure) -> bool:
        """Retry ``job`` on another endpoint if nothing of it reached the client (module
        docstring); True when the scheduler took it back."""
        if call.emitted or error.error.code not in RETRY_ELSEWHERE_CODES or not job.retry_elsewhere(error.error):
            return False
        log.warning(
            "upstream call failed; retrying on another endpoint",
            extra={"fields": {"model": self.name, "replica": self.replica, "request_id": job.trace_id,
                              "code": error.error.code, "message": error.error.message}},
        )
        if self.account is not None and error.submitted:  # the upstream may have worked on it
            self._close_reservation(job, call, None, error)
        return True

    def _close_reservation(
        self, job: Job, call: _Call, stats: GenerationStats | None, error: Exception | None
    ) -> float | None:
        """Write the job's closing ledger event (see :mod:`backends.ledger`); its cost."""
        account = self.account
        if account is None:
            return None
        usage = (error.usage or call.usage) if isinstance(error, UpstreamFailure) else call.usage
        used = {"prompt_tokens": usage.prompt_tokens, "output_tokens": usage.output_tokens} if usage else {}
        real = account.prices.cost(usage.prompt_tokens, usage.output_tokens) if usage else None
        sent = call.in_flight or call.emitted
        if isinstance(error, UpstreamFailure):
            if not error.submitted:  # refused, or never left: nothing to pay
                return account.close("failed_before_submit", job.id, cost=0.0, error=error.error.code)
            cost = real if real is not None else call.amount
            return account.close("failed_after_submit", job.id, cost=cost, error=error.error.code, **used)
        if error is not None:
            if sent:
                return account.close("failed_after_submit", job.id, cost=call.amount, error="backend_error")
            return account.close("failed_before_submit", job.id, cost=0.0, error="backend_error")
        if real is not None:  # answered (or cancelled after the usage arrived)
            return account.close("settled", job.id, cost=real, **used)
        if stats is not None:
            return account.close(
                "failed_usage_unknown", job.id, cost=call.amount, reason="the upstream reported no usage"
            )
        if sent:
            return account.close(
                "failed_usage_unknown", job.id, cost=call.amount, reason="cancelled after the request was sent"
            )
        return account.close("released", job.id, cost=0.0, reason="cancelled before the request was sent")

    # ------------------------------------------------------------------ one job
    async def _generate(self, job: Job, call: _Call) -> GenerationStats:
        request = job.request
        body = build_body(self.model, request, stream=request.stream)
        if self.model.remote_upstream == "llm_pool":  # pool of pools: one policy front and back
            if request.fairness_key is not None:
                body["fairness_key"] = request.fairness_key
            if request.priority:
                body["priority"] = request.priority
        d = request.decoding
        log.debug(
            "decoding settings not sent upstream",
            extra={
                "fields": {
                    "request_id": job.trace_id,
                    "beam_size": d.beam_size,
                    "top_k": d.top_k,
                    "repetition_penalty": d.repetition_penalty,
                }
            },
        )
        t0 = time.perf_counter()
        deadline = trio.current_time() + self.model.remote_timeout_s
        while True:
            call.attempts += 1
            try:
                if request.stream and request.embed_inputs is None:
                    finish = await self._stream_once(job, call, body, deadline)
                else:
                    finish = await self._json_once(job, call, body, deadline)
            except UpstreamFailure as f:
                self._note_attempt(f)
                if not f.submitted:
                    call.in_flight = False
                delay = self._retry_delay(f, call, deadline)
                if delay is None:
                    raise
                log.warning(
                    "upstream attempt failed; retrying",
                    extra={
                        "fields": {
                            "model": self.name,
                            "request_id": job.trace_id,
                            "attempt": call.attempts,
                            "code": f.error.code,
                            "retry_in_s": round(delay, 3),
                        }
                    },
                )
                await trio.sleep(delay)
                continue
            self._note_attempt(None)
            return self._stats(call, t0, finish)

    def _retry_delay(self, failure: UpstreamFailure, call: _Call, deadline: float) -> float | None:
        if not failure.retryable or call.emitted or call.attempts > self.model.remote_max_retries:
            return None
        backoff = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (call.attempts - 1))
        delay = backoff * random.uniform(0.5, 1.0)
        if failure.retry_after is not None:
            delay = max(delay, failure.retry_after)
        if trio.current_time() + delay >= deadline:
            return None
        return delay

    def _stats(self, call: _Call, t0: float, finish: str | None) -> GenerationStats:
        end = time.perf_counter()
        ms = lambda s: round(s * 1000.0, 3)  # noqa: E731
        u = call.usage
        return GenerationStats(
            finish_reason="length" if finish == "length" else "stop",
            prompt_tokens=u.prompt_tokens if u else None,
            output_tokens=u.output_tokens if u else None,
            time_to_first_token_ms=ms(call.t_first - t0) if call.t_first is not None else None,
            generate_total_ms=ms(end - t0),
            decode_after_first_token_ms=ms(end - call.t_first) if call.t_first is not None else None,
        )

    def _timeout(self) -> PoolError:
        return PoolError(
            504,
            "upstream_timeout",
            f"the upstream did not answer within {self.model.remote_timeout_s:g}s (remote_timeout_s)",
            model=self.name,
        )

    def _connection_error(self, e: Exception, what: str) -> PoolError:
        detail = redact(str(e), self._key) or type(e).__name__
        return PoolError(
            502, "upstream_connection_error", f"{what} {self.base_url}: {type(e).__name__}: {detail}", model=self.name
        )

    async def _send(self, call: _Call, body: dict[str, Any], deadline: float, path: str) -> httpx.Response:
        """Send one attempt and return a 2xx response whose body is still unread; an error
        status is read, closed and raised as :class:`UpstreamFailure`."""
        assert self._client is not None, "not loaded"
        client = self._client
        headers = {**self._headers(), "X-Request-Id": call.request_id} if call.request_id else self._headers()
        request = client.build_request("POST", f"{self.base_url}{path}", json=body, headers=headers)
        call.in_flight = True
        response: httpx.Response | None = None
        with trio.move_on_at(deadline):
            try:
                response = await client.send(request, stream=True)
            except (httpx.ConnectTimeout, httpx.PoolTimeout):
                raise UpstreamFailure(self._timeout(), submitted=False, retryable=True) from None
            except httpx.TimeoutException:
                raise UpstreamFailure(self._timeout(), submitted=True) from None
            except httpx.ConnectError as e:
                raise UpstreamFailure(
                    self._connection_error(e, "cannot connect to the upstream at"), submitted=False, retryable=True
                ) from None
            except httpx.TransportError as e:
                raise UpstreamFailure(
                    self._connection_error(e, "lost the connection to the upstream at"), submitted=True
                ) from None
        if response is None:
            raise UpstreamFailure(self._timeout(), submitted=True)
        if response.is_success:
            return response
        raw = b""
        try:
            with trio.move_on_at(deadline):
                raw = await response.aread()
        except httpx.HTTPError:
            pass  # the status says enough
        finally:
            await _close(response)
        status = response.status_code
        error = status_error(status, raw, response.headers, model=self.name, key=self._key, key_env=self.key_env)
        raise UpstreamFailure(
            error,
            submitted=False,
            retryable=status == 429 or status >= 500,
            retry_after=retry_after_s(response.headers.get("retry-after")),
        )

    async def _json_once(self, job: Job, call: _Call, body: dict[str, Any], deadline: float) -> str | None:
        response = await self._send(call, body, deadline, UPSTREAM_PATHS[job.request.kind])
        raw: bytes | None = None
        try:
            with trio.move_on_at(deadline):
                raw = await response.aread()
        except httpx.TimeoutException:
            raise UpstreamFailure(self._timeout(), submitted=True) from None
        except httpx.TransportError as e:
            raise UpstreamFailure(
                self._connection_error(e, "lost the connection to the upstream at"), submitted=True
            ) from None
        finally:
            await _close(response)
        if raw is None:
            raise UpstreamFailure(self._timeout(), submitted=True)
        if job.request.embed_inputs is not None:
            job.embeddings, call.usage = parse_embeddings(raw, len(job.request.embed_inputs), model=self.name, key=self._key)
            call.t_first = time.perf_counter()
            return "stop"
        legacy = job.request.raw_prompt is not None
        if offers_tools(job.request) and not legacy:  # an answer that only calls tools has no text (issue 16)
            text, finish, call.usage = self._calls_answer(job, raw)
        else:
            text, finish, call.usage = parse_completion(raw, model=self.name, key=self._key, legacy=legacy)
        call.t_first = time.perf_counter()
        if text:
            job.emit(text)
            call.emitted = True
        return finish

    def _calls_answer(self, job: Job, raw: bytes) -> tuple[str, str | None, Usage | None]:
        """:func:`parse_completion` for a request that offered tools: ``tool_calls`` go to
        ``job.tool_calls``, and a null content is then an empty text."""
        try:
            data = json.loads(raw)
            message = data["choices"][0]["message"]
            calls = parse_tool_calls(message.get("tool_calls"), self.name) if message.get("tool_calls") else []
        except PoolError as e:
            raise UpstreamFailure(e, submitted=True) from None
        except (ValueError, LookupError, TypeError, AttributeError):
            calls = []
        if not calls:
            return parse_completion(raw, model=self.name, key=self._key)
        job.tool_calls = calls
        content = message.get("content")
        finish = data["choices"][0].get("finish_reason")
        return (
            (content.strip() if isinstance(content, str) else ""),
            finish if isinstance(finish, str) else None,
            parse_usage(data.get("usage")),
        )

    async def _stream_once(self, job: Job, call: _Call, body: dict[str, Any], deadline: float) -> str | None:
        response = await self._send(call, body, deadline, UPSTREAM_PATHS[job.request.kind])
        finish: str | None = None
        saw_choice = done = False
        try:
            async for line in response.aiter_lines():
                if job.should_stop():
                    call.scope.cancel()
                    await trio.lowlevel.checkpoint()
                if not line.startswith("data:"):
                    continue  # blank separators, "event:", ": keep-alive" comments
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk_finish, has_choice = self._on_chunk(job, call, data)
                saw_choice = saw_choice or has_choice
                finish = chunk_finish or finish
        except httpx.TimeoutException:
            raise UpstreamFailure(self._timeout(), submitted=True, usage=call.usage) from None
        except httpx.TransportError as e:
            raise UpstreamFailure(
                self._connection_error(e, "lost the stream from the upstream at"), submitted=True, usage=call.usage
            ) from None
        finally:
            await _close(response)
        if not saw_choice:
            raise UpstreamFailure(
                parse_failure(self.name, "the upstream's stream has no choices"), submitted=True, usage=call.usage
            )
        if not done and finish is None:
            error = PoolError(
                502,
                "upstream_connection_error",
                f"the upstream at {self.base_url} ended the stream before it finished",
                model=self.name,
            )
            raise UpstreamFailure(error, submitted=True, usage=call.usage)
        return finish

    def _on_chunk(self, job: Job, call: _Call, data: str) -> tuple[str | None, bool]:
        """Apply one stream event: forward its text, note usage; (finish_reason, had a choice)."""
        try:
            obj = json.loads(data)
        except ValueError:
            excerpt = quote(data, self._key)
            raise UpstreamFailure(
                parse_failure(self.name, f"the upstream sent a stream event that is not JSON: {excerpt!r}"),
                submitted=True,
                usage=call.usage,
            ) from None
        if not isinstance(obj, dict):
            raise UpstreamFailure(
                parse_failure(self.name, "the upstream sent a stream event that is not a JSON object"),
                submitted=True,
                usage=call.usage,
            )
        if obj.get("error"):
            message = upstream_message(json.dumps(obj).encode(), self._key)
            raise UpstreamFailure(
                PoolError(502, "upstream_server_error", f"the upstream failed mid-stream: {message}", model=self.name),
                submitted=True,
                usage=call.usage,
            )
        usage = parse_usage(obj.get("usage"))
        if usage is not None:
            call.usage = usage
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None, False
        choice = choices[0]
        if job.request.raw_prompt is not None:  # a legacy completion: the text as sent, unstripped
            text = choice.get("text")
            if text is not None and not isinstance(text, str):
                raise UpstreamFailure(parse_failure(self.name, _non_text(text, {})), submitted=True, usage=call.usage)
            if text:
                if call.t_first is None:
                    call.t_first = time.perf_counter()
                job.emit(text)
                call.emitted = True
            finish = choice.get("finish_reason")
            return (finish if isinstance(finish, str) else None), True
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        content = delta.get("content")
        if delta.get("tool_calls") and offers_tools(job.request):  # issue 16: gathered by index
            self._gather_calls(job, delta["tool_calls"])
            delta = {k: v for k, v in delta.items() if k != "tool_calls"}
        no_text = content is None and any(delta.get(k) for k in ("tool_calls", "function_call"))
        if no_text or (content is not None and not isinstance(content, str)):
            raise UpstreamFailure(parse_failure(self.name, _non_text(content, delta)), submitted=True, usage=call.usage)
        if content:
            self._emit(job, call, content)
        finish = choice.get("finish_reason")
        return (finish if isinstance(finish, str) else None), True

    def _gather_calls(self, job: Job, deltas: Any) -> None:
        """Stream deltas of tool calls, joined by ``index`` into ``job.tool_calls`` (the id and
        name come first, the arguments in pieces)."""
        calls = job.tool_calls if job.tool_calls is not None else []
        for d in deltas if isinstance(deltas, list) else ():
            f = d.get("function") if isinstance(d, dict) else None
            index = d.get("index", len(calls)) if isinstance(d, dict) else None
            if not isinstance(f, dict) or not isinstance(index, int) or not 0 <= index <= len(calls):
                raise UpstreamFailure(
                    parse_failure(self.name, "the upstream streamed a tool call that is not a function call"), submitted=True
                )
            if index == len(calls):
                calls.append(ToolCall(id=str(d.get("id") or new_call_id()), name="", arguments=""))
            c = calls[index]
            if isinstance(f.get("name"), str):
                c.name += f["name"]
            if isinstance(f.get("arguments"), str):
                c.arguments += f["arguments"]
        job.tool_calls = calls

    @staticmethod
    def _emit(job: Job, call: _Call, text: str) -> None:
        """Forward ``text`` now, minus leading whitespace of the whole answer and with trailing
        whitespace held back until more text follows (the sum is the stripped answer)."""
        if not call.emitted:
            text = text.lstrip()
            if not text:
                return
        text = call.pending_ws + text
        body = text.rstrip()
        call.pending_ws = text[len(body) :]
        if body:
            if call.t_first is None:
                call.t_first = time.perf_counter()
            job.emit(body)
            call.emitted = True


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default verifying context, built once: loading the CA bundle takes ~50 ms, per
    client otherwise (every replica load)."""
    return httpx.create_ssl_context()


async def _close(response: httpx.Response) -> None:
    """Close a response even while cancelled (it only drops the connection)."""
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        await response.aclose()


KIND = BackendKind(
    name="openai_compatible",
    create=RemoteBackend,
    remote=True,
    decoding_rules=(AT_MOST_4_STOPS,),
    seeded_sampling=True,  # passed on: reproducible as far as the upstream makes it
    response_formats=("text", "json_object", "json_schema"),  # passed on (issue 16)
    tools=True,
    cost_summary=cost_summary,
    # the upstream renders the conversation; thinking is sent as {"thinking": {"type": ...}}
    thinking_modes=("default", "enabled", "disabled"),
    multi_turn=True,
    embeddings=True,
)
