"""R4 bad input: hypothesis-generated requests against the whole app, in memory.

The app (``pool.http.create_app``: inference, admin, operator routes) runs on a real
``PoolManager`` with the async FakeBackend (no delay), behind both bearer tokens, and is driven
through quart's own test client: no sockets, so thousands of cases take seconds.  Hypothesis
runs in a worker thread and hands each case to the trio loop (``trio.from_thread.run``), so one
app and one manager serve every case; before each case the model is put back in the state the
case asks for (loaded, or unloaded).

Cases (each mixed with random extra headers, content types and query parameters):

* inference bodies for ``/v1/responses`` and ``/v1/chat/completions``: valid ones (then the
  answer must be 200 and exactly the fake's text, streamed or not), and ones broken on
  purpose: unknown and missing fields, wrong types, out-of-range numbers, huge ``max_tokens``
  (past the limit, past 64 bits, ``1e999``), ``NaN`` / ``Infinity`` literals, NUL characters,
  invalid UTF-8, deeply nested JSON (10,000 levels), bodies over ``max_body_bytes`` (413),
  truncated or empty bodies, random JSON, random bytes;
* admin calls with random model names (unicode, URL-encoded slashes, ``..``), random bodies for
  load / unload / replicas, random ``drain_timeout_s`` / ``force`` query values on unload;
* random methods on every route of the app and on random paths, random headers.

Invariants: no 5xx, ever; every 4xx is JSON with ``error.code`` and a ``message`` (and the
same ``detail``), 401 has ``WWW-Authenticate``, 405 has ``Allow``; where the case knows what
it broke, the status is the expected one and the message or ``param`` names the field.

CI form: 600 cases (about 3 s); ``--long``: 10,000; ``R4_CASES=n`` in the environment overrides both.
"""

from __future__ import annotations

import functools
import json
import os
import string
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from support.fake_backend import FakeBackendFactory, expected_text
from support.sse import parse_chat_sse, parse_responses_sse

from llm_pool.config import load_settings
from llm_pool.pool.http import create_app
from llm_pool.pool.manager import PoolManager

pytestmark = pytest.mark.reliability

API_TOKEN = "r4-api-token"
ADMIN_TOKEN = "r4-admin-token"
MAX_BODY = 65_536
MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_TOKENS = 16
CONFIG = f"""
[service]
api_token_env = "R4_API_TOKEN"
admin_token_env = "R4_ADMIN_TOKEN"
max_body_bytes = {MAX_BODY}

[engine]
backend = "gguf"
max_tokens_limit = {MAX_TOKENS_LIMIT}

[engine.decoding]
max_tokens = {DEFAULT_MAX_TOKENS}

[engine.models.m]
model_path = "fake-model.gguf"
replica_max = 3
max_queue = 16
"""
RAW = "__RAW__"
#: No case may take longer than this (a hang is a failure, not a stuck test run).
CASE_BOUND_S = 10.0  # a JSON string in a body that is replaced by raw bytes once serialized


@dataclass
class Case:
    """One request and what is known about its answer."""

    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] | None = None
    #: the status it must get, when the case knows it
    expect: set[int] | None = None
    #: one of these must appear in the error's message or param (case-insensitive)
    names: tuple[str, ...] = ()
    #: a valid inference request: 200 with exactly this text (when the content type is JSON)
    text: str | None = None
    stream: bool = False
    #: state of model ``m`` before the request
    unloaded: bool = False
    #: send the body without a Content-Length
    chunked: bool = False
    kind: str = ""


# ------------------------------------------------------------------------------ building blocks
SAFE_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
WORD = st.text(string.ascii_letters + string.digits + " .,!?é€😀", min_size=1, max_size=20)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | SAFE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SAFE_TEXT, inner, max_size=4),
    max_leaves=12,
)
#: Raw JSON that is never a valid value anywhere: (bytes, words that name the problem).
RAW_BAD = [
    (b"NaN", ("JSON",)),
    (b"Infinity", ("JSON",)),
    (b"-Infinity", ("JSON",)),
    (b"nan", ("JSON",)),
    (b"1e999", ("out of range",)),
    (b"-1e999", ("out of range",)),
    (b"123456789012345678901234567890", ("out of range", "Expected", "exceeds", "limit")),
    (b'"caf\xe9"', ("UTF-8",)),
    (b'"\xff\xfe"', ("UTF-8",)),
    (b'"\xed\xa0\x80"', ("UTF-8",)),
    (b'"\xc0\xaf"', ("UTF-8",)),
    (b"[" * 10_000 + b"]" * 10_000, ("Expected", "deep")),
    (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, ("Expected", "deep")),
    (b"tru", ("JSON",)),
    (b"'single'", ("JSON",)),
]


def dumps(body: Any, raw: bytes | None = None) -> bytes:
    out = json.dumps(body, ensure_ascii=False).encode()
    if raw is not None:
        assert out.count(f'"{RAW}"'.encode()) == 1
        out = out.replace(f'"{RAW}"'.encode(), raw)
    return out


def auth(path: str) -> dict[str, str]:
    if path.startswith("/v1/admin"):
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if path.startswith("/v1/"):
        return {"Authorization": f"Bearer {API_TOKEN}"}
    return {}


# ------------------------------------------------------------------------------ valid bodies
@st.composite
def valid_responses(draw: st.DrawFn) -> tuple[dict[str, Any], str, bool]:
    """A valid /v1/responses body, the fake's exact answer, and whether it streams."""
    text = draw(SAFE_TEXT)
    body: dict[str, Any] = {"model": "m", "input": text}
    if draw(st.booleans()):
        body["instructions"] = draw(st.none() | SAFE_TEXT)
    stream = draw(st.booleans())
    if stream or draw(st.booleans()):
        body["stream"] = stream
    max_tokens = DEFAULT_MAX_TOKENS
    decoding: dict[str, Any] = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "max_tokens": st.integers(1, 32),
                "temperature": st.floats(0, 2),
                "top_k": st.integers(1, 200),
                "top_p": st.floats(0, 1, exclude_min=True),
                "repetition_penalty": st.floats(0, 4),
                "beam_size": st.integers(1, 16),
                "stop": st.lists(st.text(string.ascii_letters, min_size=1, max_size=4), max_size=3),
            },
        )
    )
    send_empty: bool = draw(st.booleans())
    if decoding or send_empty:
        body["decoding"] = decoding
        max_tokens = int(decoding.get("max_tokens", DEFAULT_MAX_TOKENS))
    if draw(st.booleans()):
        body["allow_remote"] = draw(st.booleans())
    return body, expected_text(text, max_tokens), stream


@st.composite
def valid_chat(draw: st.DrawFn) -> tuple[dict[str, Any], str, bool]:
    """A valid /v1/chat/completions body, the fake's exact answer, and whether it streams."""
    messages: list[dict[str, Any]] = [
        {"role": draw(st.sampled_from(["system", "developer"])), "content": draw(SAFE_TEXT)}
        for _ in range(draw(st.integers(0, 2)))
    ]
    for _ in range(draw(st.integers(0, 2))):
        messages += [{"role": "user", "content": draw(SAFE_TEXT)}, {"role": "assistant", "content": draw(SAFE_TEXT)}]
    parts = draw(st.lists(SAFE_TEXT, min_size=1, max_size=3))
    last: Any = parts[0] if draw(st.booleans()) else [{"type": "text", "text": p} for p in parts]
    messages.append({"role": "user", "content": last})
    user_text = last if isinstance(last, str) else "\n".join(parts)
    body: dict[str, Any] = {"model": "m", "messages": messages}
    stream = draw(st.booleans())
    if stream or draw(st.booleans()):
        body["stream"] = stream
    max_tokens = DEFAULT_MAX_TOKENS
    if draw(st.booleans()):
        max_tokens = draw(st.integers(1, 32))
        keys = draw(st.sampled_from([["max_tokens"], ["max_completion_tokens"], ["max_tokens", "max_completion_tokens"]]))
        body.update({k: max_tokens for k in keys})
    body.update(
        draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "temperature": st.none() | st.floats(0, 2),
                    "top_p": st.floats(0, 1, exclude_min=True),
                    "stop": st.text(string.ascii_letters, min_size=1, max_size=4)
                    | st.lists(st.text(string.ascii_letters, min_size=1, max_size=4), max_size=3),
                    "n": st.just(1),
                    # a fairness key: blank is none, else printable once trimmed (issue 17)
                    "user": SAFE_TEXT.filter(lambda t: t.strip().isprintable()),
                    "seed": st.integers(-(2**63), 2**63 - 1),
                    "metadata": st.dictionaries(st.text(string.ascii_letters, max_size=5), SAFE_TEXT, max_size=2),
                    "logprobs": st.sampled_from([None, False]),
                    "tools": st.sampled_from([None, []]),
                    "presence_penalty": st.sampled_from([None, 0, 0.0]),
                    "response_format": st.sampled_from([None, {"type": "text"}]),
                    "top_k": st.integers(1, 200),
                    "repetition_penalty": st.floats(0, 4),
                },
            )
        )
    )
    if stream and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body, expected_text(user_text, max_tokens), stream


# ------------------------------------------------------------------------------ broken bodies
#: (route, dotted field, bad values, names the error must mention): values no field could take.
BAD_FIELDS: list[tuple[str, str, list[Any], tuple[str, ...]]] = [
    ("responses", "model", [5, [], {}, "", "x" * 300, True], ("model",)),
    ("responses", "input", [5, [], {}, None, False], ("input",)),
    ("responses", "instructions", [5, [], {}], ("instructions",)),
    ("responses", "stream", ["yes", 1, 0, []], ("stream",)),
    ("responses", "allow_remote", ["true", 1], ("allow_remote",)),
    ("responses", "source_lang_code", ["x" * 33, 5], ("source_lang_code",)),
    ("responses", "decoding", [[], "greedy", 5], ("decoding",)),
    ("responses", "decoding.max_tokens", [0, -5, MAX_TOKENS_LIMIT + 1, 10**9, 2**63, 2**64, 1.5, "many", None], ("max_tokens",)),
    ("responses", "decoding.temperature", [-0.1, 2.01, 1e308, "hot", []], ("temperature",)),
    ("responses", "decoding.top_k", [0, 201, 1.5, -1], ("top_k",)),
    ("responses", "decoding.top_p", [0, 1.01, -0.5], ("top_p",)),
    ("responses", "decoding.repetition_penalty", [-1, 4.5], ("repetition_penalty",)),
    ("responses", "decoding.beam_size", [0, 17], ("beam_size",)),
    ("responses", "decoding.stop", [["a"] * 17, [""], "a", [1], ["a\x00"]], ("stop",)),
    ("chat", "model", [5, "", None], ("model",)),
    ("chat", "messages", [[], "hi", {}, None, [{"role": "robot", "content": "x"}], [{"role": "user"}],
                          [{"role": "assistant", "content": "x"}], [{"role": "user", "content": 5}],
                          [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
                          [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
                          [{"role": "user", "content": "a\x00b"}], [{"role": "user", "content": "x", "tool_calls": [{}]}]],
     ("messages", "role", "content", "tool_calls")),
    ("chat", "max_tokens", [0, MAX_TOKENS_LIMIT + 1, 2**64, "10"], ("max_tokens",)),
    ("chat", "user", ["\x1b", "a\tb", "x" * 129, 5], ("user",)),
    ("chat", "max_completion_tokens", [0, 10**6], ("max_completion_tokens",)),
    ("chat", "temperature", [3, -1, "warm"], ("temperature",)),
    ("chat", "n", [17, 0, "1"], ("n",)),
    ("chat", "stop", ["", [""], ["a"] * 17, "\x00", 5], ("stop",)),
    ("chat", "stream", ["true", 2], ("stream",)),
    ("chat", "stream_options", [{"include_usage": "yes"}, {"bogus": True}, []], ("stream_options", "include_usage", "bogus")),
    ("chat", "logprobs", [1, "yes"], ("logprobs",)),
    ("chat", "top_logprobs", [3, 21, -1], ("top_logprobs",)),
    ("chat", "tools", [[{"type": "function"}]], ("tools",)),
    ("chat", "tool_choice", ["maybe", {"type": "function"}, "required"], ("tool_choice",)),
    # OpenAI's range, -2 to 2 (issue 16: the penalties reach the runtimes that have them)
    ("chat", "presence_penalty", [2.5, -2.01, "x"], ("presence_penalty",)),
    ("chat", "frequency_penalty", [3, []], ("frequency_penalty",)),
    ("chat", "logit_bias", [{"50256": -100}], ("logit_bias",)),
    ("chat", "response_format", [{"type": "xml"}, "json", {"type": "json_schema"}], ("response_format",)),
    ("chat", "reasoning_effort", ["high"], ("reasoning_effort",)),
    ("chat", "seed", ["x", 1.5, []], ("seed",)),
    ("chat", "metadata", [{"a": 1}, []], ("metadata",)),
]
#: Fields typed ``Any`` in ChatCompletionRequest: msgspec decodes whatever they hold, so JSON
#: nested thousands deep there once hit Python's recursion limit (a 500; now a 400).
CHAT_ANY_FIELDS = {
    "logit_bias",
    "functions", "function_call", "modalities", "reasoning_effort", "verbosity", "audio",
    "prediction", "web_search_options",
}


def set_path(body: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        if not isinstance(body.get(p), dict):
            body[p] = {}
        body = body[p]
    body[leaf] = value


@st.composite
def broken_inference(draw: st.DrawFn) -> Case:
    route = draw(st.sampled_from(["responses", "chat"]))
    body, _, stream = draw(valid_responses() if route == "responses" else valid_chat())
    path = "/v1/responses" if route == "responses" else "/v1/chat/completions"
    how = draw(st.sampled_from(["field", "unknown", "missing", "raw", "nul", "oversize", "truncate", "empty", "json", "bytes", "model"]))
    raw: bytes | None = None
    expect: set[int] | None = {400}
    names: tuple[str, ...] = ()
    if how == "field":
        _, dotted, values, names = draw(st.sampled_from([f for f in BAD_FIELDS if f[0] == route]))
        set_path(body, dotted, draw(st.sampled_from(values)))
    elif how == "unknown":
        key = draw(st.text(string.ascii_letters + "_", min_size=1, max_size=12).filter(lambda k: k not in body))
        where = body if draw(st.booleans()) or route == "chat" else body.setdefault("decoding", {})
        if key in where:
            return draw(broken_inference())
        where[key] = draw(JSON_VALUES)
        names = (key,)
        if route == "chat" and key in _chat_fields():  # a real (optional) chat field: may be valid
            expect, names = None, ()
    elif how == "missing":
        required = ["model", "input"] if route == "responses" else ["model", "messages"]
        key = draw(st.sampled_from(required))
        del body[key]
        names = (key,)
    elif how == "raw":
        fields = ["model", "input", "decoding", "instructions"] if route == "responses" else [
            "model", "messages", "temperature", "max_tokens", "stop", "n", "user", "logprobs", "top_logprobs",
            *sorted(CHAT_ANY_FIELDS)]
        key = draw(st.sampled_from(fields + ["x_unknown"]))
        value, names = draw(st.sampled_from(RAW_BAD))
        body[key] = RAW
        raw = value
        names = (*names, key)  # a type error names the field, a syntax error the JSON
        if key == "x_unknown":
            names = (*names, "unknown")
    elif how == "nul":
        if route == "responses":
            key = draw(st.sampled_from(["input", "instructions"]))
            body[key] = draw(SAFE_TEXT) + "\x00" + draw(SAFE_TEXT)
        else:
            key = "content"
            body["messages"][-1]["content"] = draw(SAFE_TEXT) + "\x00"
        names = (key, "NUL")
    elif how == "oversize":
        filler = "x" * draw(st.integers(MAX_BODY, MAX_BODY * 4))
        if route == "responses":
            body["input"] = filler
        else:
            body["messages"][-1]["content"] = filler
        expect, names = {413}, (str(MAX_BODY),)
    elif how == "truncate":
        data = dumps(body)
        cut = draw(st.integers(0, len(data) - 1))
        return Case("POST", path, data[:cut], expect={400}, names=("JSON", "truncated", "Expected", "malformed"), kind="truncate")
    elif how == "empty":
        return Case("POST", path, b"", expect={400}, names=("JSON", "truncated", "malformed"), kind="empty")
    elif how == "json":
        return Case("POST", path, dumps(draw(JSON_VALUES)), expect={400}, kind="json")
    elif how == "bytes":
        data = draw(st.binary(max_size=200))
        return Case("POST", path, data, expect={400}, kind="bytes")
    elif how == "model":
        body["model"] = draw(st.text(min_size=1, max_size=40).filter(lambda m: m != "m"))
        expect, names = ({404}, ("model",)) if len(body["model"]) <= 256 else ({400}, ("model",))
    return Case("POST", path, dumps(body, raw), expect=expect, names=names, stream=stream, kind=f"{route}:{how}")


@functools.cache
def _chat_fields() -> frozenset[str]:
    from llm_pool.pool.api import ChatCompletionRequest

    return frozenset(ChatCompletionRequest.__struct_fields__)


@st.composite
def valid_inference(draw: st.DrawFn) -> Case:
    route = draw(st.sampled_from(["responses", "chat"]))
    body, text, stream = draw(valid_responses() if route == "responses" else valid_chat())
    path = "/v1/responses" if route == "responses" else "/v1/chat/completions"
    unloaded = draw(st.integers(0, 9)) == 9
    if unloaded:
        return Case("POST", path, dumps(body), expect={409}, names=("not loaded",), unloaded=True, kind=f"{route}:unloaded")
    return Case("POST", path, dumps(body), text=text, stream=stream, expect={200}, kind=f"{route}:valid")


# ------------------------------------------------------------------------------ admin
NAMES = st.one_of(
    st.just("m"),
    st.sampled_from(["m/", "/m", "../m", "a/b", "a%2Fb", "%2E%2E", "ü", "m m", "M", "m\t", "%00", "..", "."]),
    st.text(min_size=1, max_size=30),
)


UNLOAD_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "drain_timeout_s": st.one_of(st.floats(0, 2), st.just(-1), st.just("x"), st.none()),
        "force": st.one_of(st.booleans(), st.just("yes")),
        "bogus": st.integers(),
    },
)
LOAD_BODIES = st.fixed_dictionaries(
    {},
    optional={
        "replicas": st.integers(-1, 5),
        "gguf_n_ctx": st.integers(-1, 10**6),
        "gguf_flash_attn": st.sampled_from(["on", "off", "auto", "maybe", 1]),
        "gguf_type_k": st.sampled_from(["f16", "q8_0", "q9", None]),
        "exllama_cache_size": st.integers(0, 1000),
        "force": st.booleans(),
        "bogus": st.integers(),
    },
)


@st.composite
def admin_case(draw: st.DrawFn) -> Case:
    name = draw(NAMES)
    quoted = urllib.parse.quote(name, safe=draw(st.sampled_from(["", "/", "%/"])))
    action = draw(st.sampled_from(["", "/load", "/unload", "/replicas", "/bogus"]))
    path = f"/v1/admin/models/{quoted}{action}"
    method = "GET" if action in ("", "/bogus") else "POST"
    method = draw(st.sampled_from([method, method, method, "PUT", "DELETE", "PATCH"]))
    unloaded = draw(st.integers(0, 4)) == 4
    body: bytes | None = None
    query: dict[str, str] | None = None
    expect: set[int] | None = None
    names: tuple[str, ...] = ()
    if action == "/unload":
        query = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "drain_timeout_s": st.sampled_from(["0", "0.5", "-1", "nan", "inf", "1e999", "", "x", "1e308"]) | st.text(max_size=8),
                    "force": st.sampled_from(["true", "false", "1", "0", "yes", "no", "maybe", "", "TRUE"]) | st.text(max_size=6),
                    draw(st.text(string.ascii_letters, min_size=1, max_size=8)): st.text(max_size=8),
                },
            )
        )
        body = draw(st.none() | st.just(b"") | st.builds(dumps, UNLOAD_BODIES))
        bad = [k for k in ("drain_timeout_s", "force") if k in query and not _valid_query(k, query[k])]
        if method == "POST" and name == "m" and bad and _valid_unload_body(body):
            expect, names = {400}, tuple(bad)
    elif action == "/replicas":
        value = draw(st.one_of(st.integers(-3, 5), st.just(2**64), st.just("2"), st.none(), st.just(1.5)))
        body = dumps({"replicas": value}) if draw(st.integers(0, 5)) < 5 else draw(st.sampled_from([b"", b"{}", b"[1]", b"{"]))
        if method == "POST" and name == "m" and body == dumps({"replicas": value}) and not unloaded:
            expect = {200} if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 3 else {400}
            names = () if expect == {200} else ("replica",)
    elif action == "/load":
        body = draw(st.none() | st.builds(dumps, LOAD_BODIES))
    if name != "m" and method in ("GET", "POST") and action != "/bogus" and "/" not in name and name not in (".", ".."):
        expect, names = {404}, ("unknown model", "no route")  # werkzeug paths never match a newline
    return Case(method, path, body, query=query, expect=expect, names=names, unloaded=unloaded, kind=f"admin{action or ':row'}")


def _valid_unload_body(body: bytes | None) -> bool:
    if not body:
        return True
    given = json.loads(body)
    drain, force = given.get("drain_timeout_s"), given.get("force", False)
    return (
        "bogus" not in given
        and (drain is None or (isinstance(drain, float | int) and drain >= 0))
        and isinstance(force, bool)
    )


def _valid_query(key: str, value: str) -> bool:
    if key == "force":
        return value.lower() in ("1", "true", "yes", "0", "false", "no")
    try:
        number = float(value)
    except ValueError:
        return False
    return 0 <= number < float("inf")


# ------------------------------------------------------------------------------ methods, paths
METHODS = st.sampled_from(
    ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT", "PROPFIND", "FOO", "get"]
) | st.text(string.ascii_uppercase, min_size=1, max_size=8)
FILL = {
    "name": NAMES,
    "model": NAMES,
    "filename": st.sampled_from(["index.html", "../pool.toml", "..%2F..%2Fetc%2Fpasswd", "nope.js", "a/b"]) | st.text(max_size=12),
}


@st.composite
def route_case(draw: st.DrawFn, rules: list[tuple[str, frozenset[str]]]) -> Case:
    rule, methods = draw(st.sampled_from(rules))
    path = rule
    for arg, strategy in FILL.items():
        if f"<path:{arg}>" in path:
            path = path.replace(f"<path:{arg}>", urllib.parse.quote(draw(strategy), safe="/"))
    if draw(st.integers(0, 5)) == 5:
        raw = urllib.parse.quote(draw(st.text(max_size=60)), safe=draw(st.sampled_from(["", "/", "/?&="])))
        # not "//...": the test client reads that as a host (its idna encoding raised on "//%C2%80")
        path = "/" + raw.lstrip("/")
    method = draw(METHODS)
    body = draw(st.none() | st.binary(max_size=64) | st.builds(dumps, JSON_VALUES))
    expect: set[int] | None = None
    if path == rule and method.upper() not in methods:
        expect = {405}
    unloaded = draw(st.integers(0, 9)) == 9
    return Case(method, path, body, unloaded=unloaded, expect=expect, kind="route")


HEADER_NAMES = st.sampled_from(
    ["Accept", "Accept-Encoding", "X-Stainless-Lang", "X-LLM-Pool-Output", "Origin", "Cookie", "Range", "If-None-Match", "Expect"]
) | st.text(string.ascii_letters + "-", min_size=1, max_size=16).filter(
    lambda h: h.lower() not in ("content-length", "transfer-encoding", "host", "authorization", "content-type")
)
HEADER_VALUES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/octet-stream",
        "",
        "application/json; charset=latin-1",
    ]
) | HEADER_VALUES


@st.composite
def decorate(draw: st.DrawFn, case: Case) -> Case:
    """Add headers (content type, authorization, random ones) and random query parameters."""
    headers = {**auth(case.path), "Content-Type": "application/json"}
    if draw(st.integers(0, 2)) == 2:
        headers["Content-Type"] = draw(CONTENT_TYPES)
    if draw(st.integers(0, 9)) == 9:  # a wrong or missing token
        bad = draw(st.sampled_from(["", "Bearer", "Bearer ", "Basic abc", f"bearer {API_TOKEN}x", "Bearer r4-admin-token "]) | HEADER_VALUES)
        if bad.strip().lower() not in (f"bearer {API_TOKEN}", f"bearer {ADMIN_TOKEN}"):
            headers["Authorization"] = bad
            if case.path.startswith("/v1/"):
                case.expect, case.names, case.text = {401}, ("token",), None
    headers.update(draw(st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3)))
    # a path that holds its own "?" takes no more (the test client refuses a query in both places)
    if case.query is None and "?" not in case.path and draw(st.integers(0, 3)) == 3:
        case.query = draw(st.dictionaries(st.text(string.ascii_letters + "_", min_size=1, max_size=10), st.text(max_size=10), max_size=3))
    case.headers = headers
    case.chunked = draw(st.integers(0, 4)) == 4
    if case.text is not None and not headers["Content-Type"].startswith("application/json"):
        case.text, case.expect = None, None  # the API reads JSON whatever the type says; no promise
    return case


def all_cases(rules: list[tuple[str, frozenset[str]]]) -> st.SearchStrategy[Case]:
    return st.one_of(
        valid_inference(), broken_inference(), broken_inference(), admin_case(), route_case(rules)
    ).flatmap(decorate)


# ------------------------------------------------------------------------------ checking
async def exchange(client: Any, case: Case) -> tuple[int, Any, bytes]:
    """One request through the test client's connection API, reading the answer as it comes
    (``client.open`` buffers 10 chunks and reads them only once the app returned: a stream of
    more chunks deadlocks there).  A body goes with its Content-Length unless the case says
    chunked (``Transfer-Encoding`` is the server's business, not the app's)."""
    headers = dict(case.headers)
    if case.body is not None and not case.chunked:
        headers["Content-Length"] = str(len(case.body))
    async with client.request(case.path, method=case.method, headers=headers, query_string=case.query) as conn:
        if case.body:
            await conn.send(case.body)
        await conn.send_complete()
        chunks = []
        while True:
            try:
                chunks.append(await conn.receive())
            except (trio.EndOfChannel, trio.ClosedResourceError):
                break
    assert conn.status_code is not None and conn.headers is not None
    return conn.status_code, conn.headers, b"".join(chunks)


async def run_case(manager: PoolManager, client: Any, case: Case, seen: Counter[Any]) -> None:
    entry = manager.entries["m"]
    if case.unloaded and entry.state == "loaded":
        await manager.unload("m", force=True)
    elif not case.unloaded and entry.state != "loaded":
        await manager.load("m")
    with trio.move_on_after(CASE_BOUND_S) as bound:
        status, response_headers, raw = await exchange(client, case)
    assert not bound.cancelled_caught, f"no answer within {CASE_BOUND_S}s: {case}"
    seen[(case.kind, status)] += 1
    where = f"{case.method} {case.path[:120]!r} {case.kind} {(case.body or b'')[:200]!r}: {status} {raw[:300]!r}"
    if case.path.startswith("/health/ready") and case.method.upper() in ("GET", "HEAD") and status == 503:
        # a readiness probe answers 503 by design while a model is not loaded
        assert case.unloaded and (b'"not_ready"' in raw or case.method.upper() == "HEAD"), where
        return
    assert status < 500, where
    if case.expect is not None:
        assert status in case.expect, f"expected {case.expect}; {where}"
    if status >= 400 and case.method != "HEAD":
        assert response_headers["Content-Type"] == "application/json", where
        body = json.loads(raw)
        error, detail = body["error"], body["detail"]
        assert isinstance(error["code"], str) and error["code"], where
        assert isinstance(error["message"], str) and error["message"], where
        assert (detail["code"], detail["message"]) == (error["code"], error["message"]), where
        if case.names:
            said = f"{error['message']} {error['param'] or ''}".lower()
            assert any(n.lower() in said for n in case.names), f"the error names none of {case.names}; {where}"
        if status == 401:
            assert response_headers["WWW-Authenticate"] == "Bearer", where
        if status == 405:
            assert response_headers.get("Allow"), where
    if case.text is not None:
        assert status == 200, where
        if not case.stream:
            body = json.loads(raw)
            got = body["output_text"] if case.path == "/v1/responses" else body["choices"][0]["message"]["content"]
        elif case.path == "/v1/responses":
            events = parse_responses_sse(raw)
            assert events[-1][0] in ("response.completed", "response.incomplete"), where
            got = events[-1][1]["output_text"]
        else:
            *chunks, _done = parse_chat_sse(raw)
            got = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        assert got == case.text, where


@pytest.fixture
def config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("R4_API_TOKEN", API_TOKEN)
    monkeypatch.setenv("R4_ADMIN_TOKEN", ADMIN_TOKEN)
    path = tmp_path / "pool.toml"
    path.write_text(CONFIG)
    return path


async def test_r4_fuzz_every_route(config_path: Path, long: bool) -> None:
    cases = int(os.environ.get("R4_CASES", 0)) or (10_000 if long else 600)
    pool_settings = load_settings(config_path)
    manager = PoolManager(pool_settings, backend_factory=FakeBackendFactory(token_delay=0), config_path=str(config_path))
    seen: Counter[Any] = Counter()
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(manager.run, autoload=True))
        await manager.load("m")
        app = create_app(manager, pool_settings)
        client = app.test_client()
        rules = [(r.rule, frozenset(r.methods or ())) for r in app.url_map.iter_rules()]
        token = trio.lowlevel.current_trio_token()

        @settings(
            max_examples=cases,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(all_cases(rules))
        def fuzz(case: Case) -> None:
            trio.from_thread.run(functools.partial(run_case, manager, client, case, seen), trio_token=token)

        await trio.to_thread.run_sync(fuzz)
        nursery.cancel_scope.cancel()
    total = sum(seen.values())
    by_kind = Counter(kind.split(":")[0] for kind, _ in seen.elements())
    print(f"\nR4 {total} cases: by kind {dict(by_kind)}; by status {dict(Counter(s for _, s in seen.elements()))}")
    assert total >= cases


async def test_r4_deep_nesting_in_an_any_field_of_chat(config_path: Path) -> None:
    """Found by R4: 10,000 nested lists in any ``Any``-typed field of a chat request were a 500
    (RecursionError escaped ``decode_body``); each must be a 400 that says so."""
    pool_settings = load_settings(config_path)
    manager = PoolManager(pool_settings, backend_factory=FakeBackendFactory(token_delay=0))
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(manager.run, autoload=True))
        client = create_app(manager, pool_settings).test_client()
        for field_name in sorted(CHAT_ANY_FIELDS):
            body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "%s": %s}' % (
                field_name.encode(), b"[" * 10_000 + b"]" * 10_000
            )
            r = await client.post(
                "/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"}
            )
            assert r.status_code == 400, (field_name, r.status_code, await r.get_data())
            assert (await r.get_json())["error"]["message"] == "invalid JSON body: nested too deeply"
        nursery.cancel_scope.cancel()
