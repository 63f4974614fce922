"""OpenAI's ``POST /v1/chat/completions`` on the pool, for the tools people already have.

Verified with the official ``openai`` Python SDK (``tests/openai``).  The route is a thin layer
like ``/v1/responses``: it decodes, translates to a :class:`~pool.jobs.GenerationRequest`, and
runs the job through :func:`llm_pool.pool.serving.run_job`, so admission, ``allow_remote``, ``queue_timeout``,
disconnect cancellation, logs and metrics behave exactly as they do there.  Nothing here
schedules.

Request fields (``pool.api.ChatCompletionRequest``):

* honoured: ``model``, ``messages`` (see below), ``temperature``, ``top_p``, ``max_tokens`` /
  ``max_completion_tokens`` (either; both only if equal), ``stop`` (a string or a list),
  ``stream``, ``stream_options.include_usage``, ``n`` (1..16: one job per choice, seed ``seed + i``
  for choice ``i``), ``logprobs`` / ``top_logprobs`` (runtimes whose kind has ``token_logprobs``),
  ``seed``, ``presence_penalty`` and ``frequency_penalty`` (see "Sampling" below);
  ``response_format``, ``tools`` and ``tool_choice`` (see "Structured output and tools" below);
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

Messages: roles ``system`` (or ``developer``, its newer name), ``user``, ``assistant`` (with
``tool_calls``, its ``content`` may be null) and ``tool`` (with ``tool_call_id``);
``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts (joined with
newlines) and ``{"type": "image_url", "image_url": {"url", "detail"}}`` parts (for a model
whose ``capabilities.modalities`` has ``image``; else 400 ``modality_unsupported``).
``thinking`` (``default``/``enabled``/``disabled``) is an llm-pool extension, as on
``/v1/responses``.  System turns come first (several are joined); the conversation ends with a user
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

``POST /v1/completions`` (legacy text completions: the prompt is caller text with no template,
:attr:`pool.jobs.GenerationRequest.raw_prompt`) and ``POST /v1/embeddings`` (an embeddings job,
:attr:`pool.jobs.GenerationRequest.embed_inputs`, for models with ``embeddings = true``) are
here too, on the same skeleton (:func:`pool.serving.run_jobs`, :func:`pool.serving.stream_jobs`).

Structured output and tools (issue 16): the model's kind says what it honours
(``BackendKind.response_formats``, ``BackendKind.tools``; else 400 ``response_format_unsupported``
/ ``tools_unsupported`` at admission, :func:`backends.structured.admit`).  A local model's
answer is read for ``<tool_call>`` blocks when it was offered tools
(:class:`~backends.structured.ToolCallSplitter`; streamed content is held back from the first
``<tool_call>``, and each call is sent once, whole, before the ``finish_reason`` chunk); a
remote model's calls arrive structured (``Job.tool_calls``).  ``finish_reason`` is
``tool_calls`` when there are calls.

``GET /v1/models`` and ``/v1/responses`` speak OpenAI too; see :class:`pool.api.ModelsList`,
:class:`pool.api.ResponseBody` and ``_stream_responses`` in :mod:`pool.http`.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
import struct
import time
from typing import Any, Literal

import msgspec
from quart import Response, request

from llm_pool.backends import kind_of
from llm_pool.backends.structured import ToolCallSplitter, offers_tools, split_tool_calls
from llm_pool.config import Settings
from llm_pool.pool.api import (
    FAIRNESS_KEY_HEADER,
    N_MAX,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatFunctionCall,
    ChatLogprobs,
    ChatMessageIn,
    ChatMessageOut,
    ChatTokenLogprob,
    ChatToolCall,
    ChatToolCallDelta,
    ChatTopLogprob,
    ChatUsage,
    Completion,
    CompletionChoice,
    CompletionLogprobsOut,
    CompletionRequest,
    DecodingIn,
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
    Metrics,
    check_max_tokens,
    check_no_nul,
    content_of,
    fairness_key,
    resolve_decoding,
    to_response_format,
    token_counts,
)
from llm_pool.pool.errors import PoolError, invalid_request
from llm_pool.pool.jobs import (
    NO_TOP_K,
    Decoding,
    Delta,
    Done,
    GenerationRequest,
    Job,
    Message,
    TokenLogprob,
    ToolCall,
    ToolSpec,
)
from llm_pool.pool.manager import PoolManager
from llm_pool.pool.serving import job_result, run_job, run_jobs, stream_jobs, unix_time_of
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
    "logit_bias": (({},), "its samplers take no logit bias"),
    "functions": (([],), "it does no function calling"),
    "function_call": (("none",), "it does no function calling"),
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
    "function_call": ((), "it does no function calling"),
    "audio": ((), "it generates text only"),
}

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_encoder = msgspec.json.Encoder()


def register_openai(app: Any, manager: PoolManager) -> None:
    """Add ``POST /v1/chat/completions`` to ``app`` (called once from ``create_app``)."""

    @app.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        t0 = time.perf_counter()
        body: ChatCompletionRequest = await read_json(ChatCompletionRequest)
        gen = to_chat_request(manager.settings, body, request.headers.get(FAIRNESS_KEY_HEADER))
        gens = choice_requests(gen, body.n or 1)
        ids = [new_chat_id() for _ in gens]
        jobs = await run_jobs(manager, gens, allow_remote=body.allow_remote, request_ids=ids, decoding_at="$")
        job = jobs[0]
        created = unix_time_of(job.t_submitted)
        parse_calls = parses_tool_calls(manager, gen)
        if not gen.stream:
            choices, metrics = [], None
            for i, j in enumerate(jobs):
                done, m = await job_result(j, t0)
                metrics = metrics or m
                lp = chat_logprobs(done.logprobs) if gen.logprobs is not None else None
                content: str | None = done.text
                calls = j.tool_calls or []
                if parse_calls:
                    content, calls = split_tool_calls(done.text)
                message = ChatMessageOut(content=content or (None if calls else content))
                if calls:
                    message.tool_calls = [_wire_call(c) for c in calls]
                choices.append(ChatChoice(index=i, message=message, finish_reason=finish_reason(j, calls), logprobs=lp))
            assert metrics is not None
            return json_response(
                ChatCompletion(
                    id=job.id,
                    created=created,
                    model=gen.model,
                    choices=choices,
                    usage=usage_of(jobs),
                    metrics=metrics,
                )
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        frames = [
            ChatFrames(job, created, include_usage=include_usage, index=i, jobs=jobs, parse_calls=parse_calls)
            for i in range(len(jobs))
        ]
        return sse_response(stream_jobs(jobs, t0, list(frames)))

    # issue 16 §2: legacy text completions and embeddings
    @app.post("/v1/completions")
    async def completions() -> Response:
        t0 = time.perf_counter()
        body: CompletionRequest = await read_json(CompletionRequest)
        gens = to_completion_requests(manager.settings, body, request.headers.get(FAIRNESS_KEY_HEADER))
        ids = [new_completion_id() for _ in gens]
        jobs = await run_jobs(manager, gens, allow_remote=body.allow_remote, request_ids=ids, decoding_at="$")
        job = jobs[0]
        created = unix_time_of(job.t_submitted)
        echo = bool(body.echo)
        if not gens[0].stream:
            choices, metrics = [], None
            for i, j in enumerate(jobs):
                done, m = await job_result(j, t0)
                metrics = metrics or m
                head = j.request.input if echo else ""
                lp = completion_logprobs(done.logprobs, len(head)) if j.request.logprobs is not None else None
                choices.append(
                    CompletionChoice(text=head + done.text, index=i, logprobs=lp, finish_reason=finish_reason(j))
                )
            return json_response(
                Completion(
                    id=job.id,
                    object="text_completion",
                    created=created,
                    model=body.model,
                    choices=choices,
                    usage=usage_of(jobs),
                    metrics=metrics,
                )
            )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        cframes = [CompletionFrames(jobs, i, created, echo=echo, include_usage=include_usage) for i in range(len(jobs))]
        return sse_response(stream_jobs(jobs, t0, list(cframes)))

    @app.post("/v1/embeddings")
    async def embeddings() -> Response:
        t0 = time.perf_counter()
        body: EmbeddingRequest = await read_json(EmbeddingRequest)
        gen = to_embedding_request(body, request.headers.get(FAIRNESS_KEY_HEADER))
        job = await run_job(
            manager, gen, allow_remote=body.allow_remote, request_id=new_embedding_id(), decoding_at="$"
        )
        _, metrics = await job_result(job, t0)
        vectors = job.embeddings or []
        prompt, _ = token_counts(job)
        return json_response(
            EmbeddingList(
                data=[
                    Embedding(index=i, embedding=encode_vector(v, body.encoding_format)) for i, v in enumerate(vectors)
                ],
                model=body.model,
                usage=EmbeddingUsage(prompt_tokens=prompt, total_tokens=prompt),
                metrics=metrics,
            )
        )


def parses_tool_calls(manager: PoolManager, gen: GenerationRequest) -> bool:
    """Whether the answer's text is read for tool calls here: a local model that was offered
    tools (a remote model's calls arrive structured, in ``job.tool_calls``)."""
    return offers_tools(gen) and not kind_of(manager.entry(gen.model).settings).remote


def _wire_call(call: ToolCall) -> ChatToolCall:
    return ChatToolCall(id=call.id, function=ChatFunctionCall(name=call.name, arguments=call.arguments))


class _OpenAIStream:
    """What both OpenAI streams share: after the last choice, with ``include_usage``, a chunk
    whose ``choices`` is empty and whose ``usage`` counts every choice; an error as OpenAI's
    error object; ``data: [DONE]`` last."""

    jobs: list[Job]
    index: int
    include_usage: bool

    def _chunk(self, choices: list[Any], **extra: Any) -> bytes:  # pragma: no cover - each stream's own
        raise NotImplementedError

    def _usage(self) -> bytes:
        if not (self.include_usage and self.index == len(self.jobs) - 1):
            return b""
        return self._chunk([], usage=usage_of(self.jobs))

    def failed(self, error: PoolError) -> bytes:
        return data_frame(error.body())

    def closing(self) -> bytes:
        return b"data: [DONE]\n\n"


class ChatFrames(_OpenAIStream):
    """``/v1/chat/completions``' stream (see the module docstring): a first chunk with
    ``role``, one per text delta, one with ``finish_reason`` (and ``metrics``), with
    ``include_usage`` a ``usage`` chunk whose ``choices`` is empty, then ``data: [DONE]``.
    With ``n`` > 1 one such series per choice (``index``), in turn; the role chunk of each
    choice, and one usage chunk (every choice's tokens) after the last."""

    def __init__(
        self,
        job: Job,
        created: int,
        *,
        include_usage: bool,
        index: int = 0,
        jobs: list[Job] | None = None,
        parse_calls: bool = False,
    ) -> None:
        self.job, self.created, self.include_usage = job if jobs is None else jobs[index], created, include_usage
        self.index, self.jobs = index, jobs or [job]
        self.first = self.jobs[0]
        #: Separates tool calls from content when the text is read for calls (issue 16).
        self.splitter = ToolCallSplitter() if parse_calls else None

    def _chunk(self, choices: list[ChatChunkChoice], **extra: Any) -> bytes:
        job = self.first  # one id for every chunk of the response
        out = ChatCompletionChunk(
            id=job.id,
            object="chat.completion.chunk",
            created=self.created,
            model=job.request.model,
            choices=choices,
            **extra,
        )
        return data_frame(out)

    def _role(self) -> bytes:
        return self._chunk([ChatChunkChoice(index=self.index, delta=ChatDelta(role="assistant", content=""))])

    def opening(self) -> bytes:
        return self._role()

    def delta(self, event: Delta) -> bytes:
        head = self._role() if self.index and not self._started else b""
        self._started = True
        text = event.text if self.splitter is None else self.splitter.push(event.text)
        lp = chat_logprobs(event.logprobs or []) if self.job.request.logprobs is not None else None
        if not text and lp is None:
            return head
        return head + self._chunk([ChatChunkChoice(index=self.index, delta=ChatDelta(content=text), logprobs=lp)])

    _started = False

    def done(self, event: Done, metrics: Metrics) -> bytes:
        job = self.job
        out = self._role() if self.index and not self._started else b""
        calls = job.tool_calls or []
        if self.splitter is not None:
            rest, calls = self.splitter.finish()
            if rest:
                out += self._chunk([ChatChunkChoice(index=self.index, delta=ChatDelta(content=rest))])
        if calls:
            deltas = [
                ChatToolCallDelta(index=i, id=c.id, function=ChatFunctionCall(name=c.name, arguments=c.arguments))
                for i, c in enumerate(calls)
            ]
            out += self._chunk([ChatChunkChoice(index=self.index, delta=ChatDelta(tool_calls=deltas))])
        out += self._chunk(
            [ChatChunkChoice(index=self.index, delta=ChatDelta(), finish_reason=finish_reason(job, calls))], metrics=metrics
        )
        return out + self._usage()


class CompletionFrames(_OpenAIStream):
    """``/v1/completions``' stream: ``text_completion`` chunks (OpenAI's shape), one per text
    delta of choice ``index`` (the prompt first with ``echo``), one with ``finish_reason`` (and
    ``metrics``), after the last choice with ``include_usage`` a ``usage`` chunk whose
    ``choices`` is empty, then ``data: [DONE]``."""

    def __init__(self, jobs: list[Job], index: int, created: int, *, echo: bool, include_usage: bool) -> None:
        self.jobs, self.index, self.created, self.echo, self.include_usage = jobs, index, created, echo, include_usage
        self.job = jobs[index]
        self.offset = 0

    def _chunk(self, choices: list[CompletionChoice], **extra: Any) -> bytes:
        first = self.jobs[0]
        return data_frame(
            Completion(
                id=first.id,
                object="text_completion",
                created=self.created,
                model=first.request.model,
                choices=choices,
                **extra,
            )
        )

    def _echo(self) -> bytes:
        if not self.echo or self.offset:
            return b""
        text = self.job.request.input
        self.offset = len(text)
        return self._chunk([CompletionChoice(text=text, index=self.index, finish_reason=None)]) if text else b""

    def opening(self) -> bytes:
        return self._echo()

    def delta(self, event: Delta) -> bytes:
        head = self._echo()
        lp = None
        if self.job.request.logprobs is not None:
            lp = completion_logprobs(event.logprobs or [], self.offset)
        self.offset += len(event.text)
        return head + self._chunk(
            [CompletionChoice(text=event.text, index=self.index, logprobs=lp, finish_reason=None)]
        )

    def done(self, event: Done, metrics: Metrics) -> bytes:
        head = self._echo()
        out = head + self._chunk(
            [CompletionChoice(text="", index=self.index, finish_reason=finish_reason(self.job))], metrics=metrics
        )
        return out + self._usage()


def data_frame(payload: Any) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


def new_chat_id() -> str:
    return "chatcmpl-" + secrets.token_hex(16)


def finish_reason(job: Job, calls: list[ToolCall] | None = None) -> Literal["stop", "length", "tool_calls"]:
    """OpenAI's finish_reason: ``tool_calls`` when the answer calls tools; ``length`` when
    max_tokens cut the answer; else ``stop`` (EOS, a stop string, or a stop flag the client
    never sees)."""
    if calls:
        return "tool_calls"
    return "length" if job.stats is not None and job.stats.finish_reason == "length" else "stop"


# --------------------------------------------------------------------------- translation
def to_chat_request(settings: Settings, body: ChatCompletionRequest, key_header: str | None = None) -> GenerationRequest:
    """``body`` as an engine request, or a 400 naming the field that can't be honoured."""
    _check_neutral(body, NEUTRAL_FIELDS, "$")
    if body.top_logprobs and not body.logprobs:
        raise invalid_request("top_logprobs needs logprobs: true", param="$.top_logprobs")
    tools = [
        ToolSpec(name=t.function.name, description=t.function.description, parameters=t.function.parameters, strict=t.function.strict)
        for t in body.tools or ()
    ]
    choice = body.tool_choice
    if choice is not None and not isinstance(choice, str) and not tools:
        raise invalid_request("tool_choice names a function, but tools is empty", param="$.tool_choice")
    if choice == "required" and not tools:
        raise invalid_request("tool_choice 'required' needs tools", param="$.tool_choice")
    return GenerationRequest(
        model=body.model,
        messages=to_messages(body.messages),
        decoding=_resolve_decoding(settings, body),
        source_lang_code=body.source_lang_code,
        target_lang_code=body.target_lang_code,
        stream=bool(body.stream),
        fairness_key=fairness_key(body.fairness_key, key_header, body.user),
        priority=body.priority,
        thinking=body.thinking,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        response_format=to_response_format(body.response_format),
        tools=tools,
        tool_choice=(choice if isinstance(choice, str) else "auto") if choice is not None else "auto",
        tool_name=choice.function.name if choice is not None and not isinstance(choice, str) else None,
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
        if m.content is None and not (m.role == "assistant" and m.tool_calls):
            raise invalid_request(
                f"{at[2:]}.content is missing; only an assistant message with tool_calls may omit it", param=f"{at}.content"
            )
        content, parts = content_of(m.content, f"{at}.content") if m.content is not None else ("", None)
        role = _ROLES[m.role]
        if role != "user" and parts is not None:
            article = "an" if m.role[0] in "aeiou" else "a"
            raise invalid_request(
                f"{at[2:]} is {article} {m.role} message with an image; images go in user messages", param=f"{at}.content"
            )
        if m.tool_calls and m.role != "assistant":
            raise invalid_request(f"{at[2:]} is a {m.role} message; only assistant messages make tool calls", param=f"{at}.tool_calls")
        if (m.role == "tool") != (m.tool_call_id is not None):
            what = "a tool message needs tool_call_id" if m.role == "tool" else "only a tool message has a tool_call_id"
            raise invalid_request(f"{at[2:]}: {what}", param=f"{at}.tool_call_id")
        if role == "system":
            if turns:
                raise invalid_request(
                    f"{at[2:]} is a {m.role} message after the conversation started; "
                    "llm-pool takes system messages only before the first user or assistant message",
                    param=f"{at}.role",
                )
            system.append(content)
        else:
            calls = [ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in m.tool_calls or ()]
            for j, c in enumerate(calls):
                check_no_nul(c.arguments, f"{at}.tool_calls[{j}].function.arguments")
            turns.append(
                Message(role=role, content=content, parts=parts, tool_calls=calls or None, tool_call_id=m.tool_call_id)  # type: ignore[arg-type]
            )
    if not turns or turns[-1].role not in ("user", "tool"):
        raise invalid_request(
            "the last message must be a user (or tool) message (llm-pool generates the next assistant turn)",
            param="$.messages",
        )
    head = [Message(role="system", content="\n\n".join(system))] if system else []
    return head + turns


# --------------------------------------------------------------------------- issue 16 §2
#: ``/v1/completions``' ``max_tokens`` when the caller sends none (OpenAI's default).
COMPLETION_MAX_TOKENS = 16


def new_completion_id() -> str:
    return "cmpl-" + secrets.token_hex(16)


def new_embedding_id() -> str:
    return "embd-" + secrets.token_hex(16)


def choice_requests(gen: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The ``n`` choices of ``gen``, one job each; a seeded request's choice ``i`` gets seed
    ``seed + i`` (each choice reproducible on its own, the choices different from each other)."""
    seed = gen.decoding.seed
    return [
        gen
        if i == 0
        else dataclasses.replace(
            gen, decoding=msgspec.structs.replace(gen.decoding, seed=None if seed is None else seed + i)
        )
        for i in range(n)
    ]


def to_completion_requests(
    settings: Settings, body: CompletionRequest, key_header: str | None = None
) -> list[GenerationRequest]:
    """``body`` as engine requests: one per prompt and choice (prompt ``p``'s choice ``j`` is
    choice ``p * n + j``, OpenAI's order), or a 400 naming the field that can't be honoured."""
    if body.suffix:
        raise invalid_request(
            "suffix is not supported by llm-pool (it does no fill-in-the-middle); leave it out", param="$.suffix"
        )
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise invalid_request(
            "best_of is not supported by llm-pool (it does not rank choices); leave it out or send it equal to n",
            param="$.best_of",
        )
    if body.logit_bias not in (None, {}):
        raise invalid_request(
            "logit_bias is not supported by llm-pool (its samplers take no logit bias); leave it out or send {}",
            param="$.logit_bias",
        )
    if body.echo and body.logprobs is not None:
        raise invalid_request(
            "echo with logprobs is not supported by llm-pool (it returns log probabilities of generated tokens only)",
            param="$.echo",
        )
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    n = body.n or 1
    if len(prompts) * n > N_MAX:
        raise invalid_request(
            f"{len(prompts)} prompts with n={n} make {len(prompts) * n} choices; llm-pool makes at most {N_MAX}"
            " per request",
            param="$.prompt",
        )
    for i, p in enumerate(prompts):
        check_no_nul(p, "$.prompt" if isinstance(body.prompt, str) else f"$.prompt[{i}]")
    check_max_tokens(settings, body.max_tokens, "$.max_tokens")
    decoding = openai_decoding(settings, body, body.max_tokens or COMPLETION_MAX_TOKENS)
    key = fairness_key(body.fairness_key, key_header, body.user)
    out: list[GenerationRequest] = []
    for p in prompts:
        gen = GenerationRequest(
            model=body.model,
            messages=[],
            raw_prompt=p,
            decoding=decoding,
            stream=bool(body.stream),
            fairness_key=key,
            priority=body.priority,
            logprobs=body.logprobs,
        )
        out.extend(choice_requests(gen, n))
    return out


def to_embedding_request(body: EmbeddingRequest, key_header: str | None = None) -> GenerationRequest:
    """``body`` as an embeddings job, or a 400 naming the field that can't be honoured."""
    if body.dimensions is not None:
        raise invalid_request(
            "dimensions is not supported by llm-pool (its embeddings have the model's own size); leave it out",
            param="$.dimensions",
        )
    inputs = [body.input] if isinstance(body.input, str) else body.input
    for i, text in enumerate(inputs):
        at = "$.input" if isinstance(body.input, str) else f"$.input[{i}]"
        check_no_nul(text, at)
        if not text:
            raise invalid_request(f"{at[2:]} is empty; there is nothing to embed", param=at)
    return GenerationRequest(
        model=body.model,
        messages=[],
        embed_inputs=inputs,
        fairness_key=fairness_key(body.fairness_key, key_header, body.user),
        priority=body.priority,
    )


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def usage_of(jobs: list[Job]) -> ChatUsage:
    """The ``usage`` of a request's choices: OpenAI counts a prompt once per distinct prompt, and
    every choice's output."""
    prompts: dict[str, int] = {}
    output = 0
    for job in jobs:
        p, o = token_counts(job)
        prompts.setdefault(job.request.input if job.request.raw_prompt is not None else "", p)
        output += o
    prompt = sum(prompts.values())
    return ChatUsage(prompt_tokens=prompt, completion_tokens=output, total_tokens=prompt + output)


def chat_logprobs(tokens: list[TokenLogprob] | None) -> ChatLogprobs:
    """Chat's ``logprobs`` of ``tokens`` (OpenAI's shape)."""
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=t.token,
                logprob=t.logprob,
                bytes=t.bytes,
                top_logprobs=[ChatTopLogprob(token=c.token, logprob=c.logprob, bytes=c.bytes) for c in t.top],
            )
            for t in tokens or []
        ]
    )


def completion_logprobs(tokens: list[TokenLogprob] | None, offset: int) -> CompletionLogprobsOut:
    """Legacy completions' ``logprobs`` of ``tokens``, their text offsets counted from
    ``offset`` (the characters before them in the choice's text)."""
    out = CompletionLogprobsOut(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for t in tokens or []:
        out.tokens.append(t.token)
        out.token_logprobs.append(t.logprob)
        out.top_logprobs.append({c.token: c.logprob for c in t.top})
        out.text_offset.append(offset)
        offset += len(t.token)
    return out


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
    return openai_decoding(settings, body, max_tokens)


def openai_decoding(
    settings: Settings, body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None
) -> Decoding:
    """The decoding of an OpenAI-style request (chat or legacy completions, ``max_tokens``
    already checked): its ``stop`` (a string or a list; no NUL), the server's defaults under
    the caller's values, and OpenAI's sampling meaning: a caller who sent ``temperature`` and no
    ``top_k`` samples over the whole vocabulary (OpenAI's API has no top-k, so the server's
    ``top_k`` default, 1 in the shipped pool.toml, would make every such request greedy); and the
    caller's seed and penalties."""
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
    decoding = resolve_decoding(settings, DecodingIn(**{k: v for k, v in given.items() if v is not None}))
    return msgspec.structs.replace(
        decoding,
        top_k=NO_TOP_K if body.temperature is not None and body.top_k is None else decoding.top_k,
        seed=body.seed,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
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
