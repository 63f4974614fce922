"""OpenAI's ``POST /v1/chat/completions`` on the pool, for the tools people already have.

Verified with the official ``openai`` Python SDK (``tests/openai``).  The route is a thin layer
like ``/v1/responses``: it decodes, translates to a :class:`~pool.jobs.GenerationRequest`, and
runs the job through :func:`llm_pool.pool.serving.run_job`, so admission, ``allow_remote``, ``queue_timeout``,
disconnect cancellation, logs and metrics behave exactly as they do there.  Nothing here
schedules.

Request fields (``pool.api.ChatCompletionRequest``):

* honoured: ``model``, ``messages`` (see below), ``temperature``, ``top_p``, ``max_tokens`` /
  ``max_completion_tokens`` (either; both only if equal), ``stop`` (a string or a list),
  ``stream``, ``stream_options.include_usage``, ``n`` (1 only), ``seed``, ``presence_penalty``
  and ``frequency_penalty`` (see "Sampling" below);
* llm-pool extensions, sent with the SDK's ``extra_body``: ``top_k``, ``repetition_penalty``,
  ``allow_remote``, ``source_lang_code`` / ``target_lang_code`` (translategemma),
  ``fairness_key`` and ``priority`` (see :mod:`pool.fairness`);
* ``user``: the fairness key when neither ``fairness_key`` nor the ``X-Fairness-Key`` header
  gives one (a blank ``user`` counts as none);
* :data:`IGNORED_FIELDS`: accepted with any value and ignored (bookkeeping that changes nothing
  about the text generated);
* :data:`NEUTRAL_FIELDS`: accepted only at the value that asks for nothing (null, or what
  common clients send by default); anything else is a 400 naming the field and why;
* any other field: a 400 naming it (``Object contains unknown field `x```, ``param: $.x``).

Messages: roles ``system`` (or ``developer``, its newer name), ``user`` and ``assistant``;
``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts (joined with
newlines).  System turns come first (several are joined); the conversation ends with a user
turn.  Multi-turn is rendered through the model's prompt format; a format that can't take it
answers 400 from :func:`backends.prompts.check_request` (translategemma: one user message).
A remote (``openai_compatible``) model is sent the whole conversation, behind one system message.

Response: ``chat.completion`` with ``usage`` (0 where a backend does not count tokens; the
``metrics`` object, an extra field the SDK keeps, has the honest nulls).  ``finish_reason`` is
``length`` when ``max_tokens`` cut the answer, else ``stop``.  Streaming sends
``chat.completion.chunk`` frames (``data: {...}`` without ``event:`` lines): a first chunk with
``role``, one per text delta, one with ``finish_reason`` (and ``metrics``), with
``include_usage`` a ``usage`` chunk whose ``choices`` is empty, then ``data: [DONE]``.  A
failure after the stream started is ``data: {"error": {...}, "detail": {...}}`` (the SDK raises
``openai.APIError`` on it) followed by ``data: [DONE]``; errors before it are plain statuses with
:meth:`pool.errors.PoolError.body`, which is OpenAI's error shape plus llm-pool's ``detail``.

Sampling means what it means to OpenAI: a request that sends ``temperature`` samples over the
whole vocabulary (``top_p`` still applies), since OpenAI's API has no top-k; the server's
``[engine.decoding] top_k`` applies only where the caller can send one (``/v1/responses``, or the
``top_k`` extension here).  A request that sends neither ``temperature`` nor ``top_k`` gets the
server's defaults as a pair.  ``seed`` makes sampling reproducible per request where the model's
runtime can (``BackendKind.seeded_sampling``; a remote model is sent it); a seeded request that
samples on a runtime without seeds (CTranslate2) is a 400, never a seed silently ignored.
``presence_penalty`` / ``frequency_penalty`` reach the runtimes that have them; CTranslate2
refuses a non-zero one (a 400 from its kind's ``decoding_rules``).

``GET /v1/models`` and ``/v1/responses`` speak OpenAI too; see :class:`pool.api.ModelsList`,
:class:`pool.api.ResponseBody` and ``_stream_responses`` in :mod:`pool.http`.
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

import msgspec
from quart import Response, request

from llm_pool.config import Settings
from llm_pool.pool.api import (
    FAIRNESS_KEY_HEADER,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageIn,
    ChatMessageOut,
    ChatUsage,
    DecodingIn,
    Metrics,
    check_max_tokens,
    check_no_nul,
    fairness_key,
    resolve_decoding,
    token_counts,
)
from llm_pool.pool.errors import PoolError, invalid_request
from llm_pool.pool.jobs import NO_TOP_K, Decoding, Delta, Done, GenerationRequest, Job, Message
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.serving import job_result, run_job, stream_job, unix_time_of
from llm_pool.pool.web_io import json_response, read_json, sse_response

#: OpenAI request fields accepted with any value and ignored: identifiers, bookkeeping and
#: hints that change nothing about the generated text.
IGNORED_FIELDS = (
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "parallel_tool_calls",
    "stream_options.include_obfuscation",
    "messages[].name",
    "messages[].annotations",
)

#: OpenAI request fields accepted only at null or the value here (the one that asks for
#: nothing); any other value is refused, never silently dropped: field → (accepted, why not).
NEUTRAL_FIELDS: dict[str, tuple[tuple[Any, ...], str]] = {
    "logprobs": ((False,), "it returns no log probabilities"),
    "top_logprobs": ((0,), "it returns no log probabilities"),
    "logit_bias": (({},), "its samplers take no logit bias"),
    "tools": (([],), "it does no tool calling"),
    "tool_choice": (("none",), "it does no tool calling"),
    "functions": (([],), "it does no function calling"),
    "function_call": (("none",), "it does no function calling"),
    "response_format": (({"type": "text"},), "it does not constrain the output's format"),
    "modalities": ((["text"],), "it generates text only"),
    "audio": ((), "it generates text only"),
    "reasoning_effort": ((), "it has no reasoning-effort setting"),
    "verbosity": ((), "it has no verbosity setting"),
    "prediction": ((), "it does not take predicted outputs"),
    "web_search_options": ((), "it does no web search"),
}

#: Fields of an assistant message as the SDK returns it; a client that sends such a message back
#: (``model_dump()``) sends them empty, which is accepted.
_MESSAGE_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "refusal": ((), "a refusal is not a turn a prompt format can render"),
    "tool_calls": (([],), "it does no tool calling"),
    "function_call": ((), "it does no function calling"),
    "audio": ((), "it generates text only"),
}

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_encoder = msgspec.json.Encoder()


def register_openai(app: Any, manager: PoolManager) -> None:
    """Add ``POST /v1/chat/completions`` to ``app`` (called once from ``create_app``)."""

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        t0 = time.perf_counter()
        body: ChatCompletionRequest = await read_json(ChatCompletionRequest)
        gen = to_chat_request(manager.settings, body, request.headers.get(FAIRNESS_KEY_HEADER))
        job = await run_job(manager, gen, allow_remote=body.allow_remote, request_id=new_chat_id(), decoding_at="$")
        created = unix_time_of(job.t_submitted)
        if not gen.stream:
            done, metrics = await job_result(job, t0)
            prompt, output = token_counts(job)
            return json_response(
                ChatCompletion(
                    id=job.id,
                    created=created,
                    model=gen.model,
                    choices=[ChatChoice(message=ChatMessageOut(content=done.text), finish_reason=finish_reason(job))],
                    usage=ChatUsage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output),
                    metrics=metrics,
                )
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(stream_job(job, t0, ChatFrames(job, created, include_usage=include_usage)))


class ChatFrames:
    """``/v1/chat/completions``' stream (see the module docstring): a first chunk with
    ``role``, one per text delta, one with ``finish_reason`` (and ``metrics``), with
    ``include_usage`` a ``usage`` chunk whose ``choices`` is empty, then ``data: [DONE]``."""

    def __init__(self, job: Job, created: int, *, include_usage: bool) -> None:
        self.job, self.created, self.include_usage = job, created, include_usage

    def _chunk(self, choices: list[ChatChunkChoice], **extra: Any) -> bytes:
        job = self.job
        out = ChatCompletionChunk(
            id=job.id, object="chat.completion.chunk", created=self.created, model=job.request.model, choices=choices, **extra
        )
        return data_frame(out)

    def opening(self) -> bytes:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])

    def delta(self, event: Delta) -> bytes:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=event.text))])

    def done(self, event: Done, metrics: Metrics) -> bytes:
        job = self.job
        out = self._chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=finish_reason(job))], metrics=metrics)
        if self.include_usage:
            prompt, output = token_counts(job)
            out += self._chunk([], usage=ChatUsage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output))
        return out

    def failed(self, error: PoolError) -> bytes:
        return data_frame(error.body())

    def closing(self) -> bytes:
        return b"data: [DONE]\n\n"


def data_frame(payload: Any) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


def new_chat_id() -> str:
    return "chatcmpl-" + secrets.token_hex(16)


def finish_reason(job: Job) -> Literal["stop", "length"]:
    """OpenAI's finish_reason: ``length`` when max_tokens cut the answer; else ``stop`` (EOS, a
    stop string, or a stop flag the client never sees)."""
    return "length" if job.stats is not None and job.stats.finish_reason == "length" else "stop"


# --------------------------------------------------------------------------- translation
def to_chat_request(settings: Settings, body: ChatCompletionRequest, key_header: str | None = None) -> GenerationRequest:
    """``body`` as an engine request, or a 400 naming the field that can't be honoured."""
    _check_neutral(body, NEUTRAL_FIELDS, "$")
    if body.n is not None and body.n != 1:
        raise invalid_request(
            f"n={body.n} is not supported: llm-pool returns one choice; leave n out or send 1", param="$.n"
        )
    return GenerationRequest(
        model=body.model,
        messages=to_messages(body.messages),
        decoding=_resolve_decoding(settings, body),
        source_lang_code=body.source_lang_code,
        target_lang_code=body.target_lang_code,
        stream=bool(body.stream),
        fairness_key=fairness_key(body.fairness_key, key_header, body.user),
        priority=body.priority,
        prompt_cache_key=body.prompt_cache_key,
    )


def to_messages(given: list[ChatMessageIn]) -> list[Message]:
    """OpenAI messages as the pool's: leading system turns joined into one, text parts joined,
    ending with a user turn."""
    system: list[str] = []
    turns: list[Message] = []
    for i, m in enumerate(given):
        at = f"$.messages[{i}]"
        _check_neutral(m, _MESSAGE_NEUTRAL, at)
        content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)
        check_no_nul(content, f"{at}.content")
        role = _ROLES[m.role]
        if role == "system":
            if turns:
                raise invalid_request(
                    f"{at[2:]} is a {m.role} message after the conversation started; "
                    "llm-pool takes system messages only before the first user or assistant message",
                    param=f"{at}.role",
                )
            system.append(content)
        else:
            turns.append(Message(role=role, content=content))  # type: ignore[arg-type]
    if not turns or turns[-1].role != "user":
        raise invalid_request(
            "the last message must be a user message (llm-pool generates the next assistant turn)",
            param="$.messages",
        )
    head = [Message(role="system", content="\n\n".join(system))] if system else []
    return head + turns


def _resolve_decoding(settings: Settings, body: ChatCompletionRequest) -> Decoding:
    max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.max_tokens, "max_tokens"
    elif body.max_tokens is not None and body.max_tokens != max_tokens:
        raise invalid_request(
            f"max_tokens={body.max_tokens} and max_completion_tokens={max_tokens} disagree; send one of them",
            param="$.max_completion_tokens",
        )
    check_max_tokens(settings, max_tokens, f"$.{param}")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    for i, s in enumerate(stop or ()):
        check_no_nul(s, "$.stop" if isinstance(body.stop, str) else f"$.stop[{i}]")
    given: dict[str, Any] = {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "repetition_penalty": body.repetition_penalty,
        "max_tokens": max_tokens,
        "stop": stop,
    }
    return openai_sampling(
        resolve_decoding(settings, DecodingIn(**{k: v for k, v in given.items() if v is not None})),
        temperature=body.temperature,
        top_k=body.top_k,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
    )


def openai_sampling(
    decoding: Decoding,
    *,
    temperature: float | None,
    top_k: int | None,
    seed: int | None,
    presence_penalty: float | None,
    frequency_penalty: float | None,
) -> Decoding:
    """``decoding`` (the server's defaults under the caller's values) with OpenAI's sampling
    meaning: a caller who sent ``temperature`` and no ``top_k`` samples over the whole vocabulary
    (OpenAI's API has no top-k, so the server's ``top_k`` default, 1 in the shipped pool.toml,
    would make every such request greedy); and the caller's seed and penalties."""
    return msgspec.structs.replace(
        decoding,
        top_k=NO_TOP_K if temperature is not None and top_k is None else decoding.top_k,
        seed=seed,
        presence_penalty=presence_penalty or 0.0,
        frequency_penalty=frequency_penalty or 0.0,
    )


def _check_neutral(obj: Any, fields: dict[str, tuple[tuple[Any, ...], str]], at: str) -> None:
    for name, (accepted, why) in fields.items():
        value = getattr(obj, name)
        if value is None or any(_same(value, a) for a in accepted):
            continue
        alternative = " or send " + " or ".join(_encoder.encode(a).decode() for a in accepted) if accepted else ""
        where = f"{at}.{name}"
        raise invalid_request(
            f"{where[2:]} is not supported by llm-pool ({why}); leave it out{alternative}",
            param=where,
        )


def _same(value: Any, accepted: Any) -> bool:
    """JSON equality: ``0 == 0.0``, but ``false`` is not ``0``."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return value is accepted
    return bool(value == accepted)
