"""Wire shapes of the inference API (msgspec Structs) and their translation to engine requests.

Decoding is strict: unknown fields are rejected with their path, every constraint is a msgspec
``Meta``, and the 400 says what was expected in our words, derived from that same ``Meta``
(``$.decoding.max_tokens: expected an integer >= 1``); the same Structs generate the OpenAPI
schema.  Nothing here does I/O.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from llm_pool.config import Settings
from llm_pool.config.settings import (
    BeamSize,
    MaxTokens,
    RepetitionPenalty,
    StopList,
    StopString,
    Temperature,
    TopK,
    TopP,
)
from llm_pool.config.validation import describe, read_validation_error
from llm_pool.pool.errors import PoolError, invalid_request
from llm_pool.pool.jobs import Decoding, GenerationRequest, Message

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


# The decoding fields' bounds are config's (one place for them and [engine.decoding]).
#: OpenAI's ``presence_penalty`` / ``frequency_penalty`` range (OpenAI routes only).
OpenAIPenalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
#: OpenAI's ``seed``: any 64-bit integer (each runtime folds it to its own width).
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


#: A request's ``priority``: lower runs first within its model (vLLM's priority scheduling); below
#: 0 only for the keys in ``engine.fairness.negative_priority_keys``.
Priority = Annotated[int, msgspec.Meta(ge=-1000, le=1000)]
#: Longest ``fairness_key`` (after trimming): a key is a label in the admin API and in metrics.
FAIRNESS_KEY_MAX = 128
#: The header that names a request's fairness key when its body does not.
FAIRNESS_KEY_HEADER = "X-Fairness-Key"
#: OpenAI's ``prompt_cache_key`` (issue 16): any non-empty string, bounded (the scheduler keeps
#: a bounded map of them).
PromptCacheKey = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class DecodingIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    beam_size: BeamSize | msgspec.UnsetType = msgspec.UNSET
    top_k: TopK | msgspec.UnsetType = msgspec.UNSET
    top_p: TopP | msgspec.UnsetType = msgspec.UNSET
    temperature: Temperature | msgspec.UnsetType = msgspec.UNSET
    repetition_penalty: RepetitionPenalty | msgspec.UnsetType = msgspec.UNSET
    max_tokens: MaxTokens | msgspec.UnsetType = msgspec.UNSET
    stop: StopList | msgspec.UnsetType = msgspec.UNSET


class ResponsesRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/responses``."""

    model: NonEmpty
    input: str
    instructions: str | None = None
    source_lang_code: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    target_lang_code: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    stream: bool = False
    allow_remote: bool = False
    decoding: DecodingIn | None = None
    #: Whose request this is, for fair sharing of the model (1..128 characters after trimming).
    fairness_key: str | None = None
    priority: Priority = 0
    # -- prompt cache (issue 16)
    #: Requests with the same key go to the replica that last served it (its prompt cache).
    prompt_cache_key: PromptCacheKey | None = None


class Metrics(msgspec.Struct, kw_only=True):
    """Nested timers: pool_total ⊇ engine_total ⊇ backend_inference.  Null when unknown."""

    engine_queue_wait_ms: float | None = None
    backend_inference_wall_ms: float | None = None
    engine_total_wall_ms: float | None = None
    engine_outside_backend_wall_ms: float | None = None
    pool_total_wall_ms: float | None = None
    engine_tokenize_ms: float | None = None
    gpu_time_to_first_token_ms: float | None = None
    gpu_generate_total_ms: float | None = None
    gpu_decode_after_first_token_ms: float | None = None
    engine_prompt_tokens: int | None = None
    engine_output_tokens: int | None = None
    engine_tokens_per_second: float | None = None
    request_cost: float | None = None
    # -- prompt cache (issue 16): prompt tokens the engine's cache already held
    engine_cached_prompt_tokens: int | None = None


class OutputText(msgspec.Struct, kw_only=True):
    """A content part of an output message (OpenAI's ``output_text``)."""

    type: str = "output_text"
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)


class OutputTextItem(msgspec.Struct, kw_only=True, tag_field="type", tag="output_text"):
    """llm-pool's item of a response's ``output``: ``{"type": "output_text", "text": ...}``."""

    text: str


class OutputMessage(msgspec.Struct, kw_only=True, tag_field="type", tag="message"):
    """OpenAI's assistant ``message`` item, which the openai SDK's ``Response.output_text``
    reads; served to OpenAI SDKs (see :func:`pool.http.wants_openai_items`) and in streams."""

    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: str = "assistant"
    content: list[OutputText]


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class IncompleteDetails(msgspec.Struct, kw_only=True):
    reason: str


class ResponseBody(msgspec.Struct, kw_only=True):
    """A response, in OpenAI's shape plus llm-pool's ``output_text`` and ``metrics``.

    The same object is the non-streamed body and the ``response`` of the stream's
    ``response.created`` / ``response.in_progress`` (``status: in_progress``, empty output, no
    usage or metrics yet) and ``response.completed`` / ``response.incomplete`` events.  ``status`` is ``incomplete``
    (``incomplete_details.reason: max_output_tokens``) when generation stopped at ``max_tokens``.
    """

    id: str
    object: str = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    model: str
    output: list[OutputTextItem | OutputMessage]
    output_text: str
    incomplete_details: IncompleteDetails | None = None
    usage: ResponseUsage | None = None
    metrics: Metrics | None = None


class ModelCard(msgspec.Struct, kw_only=True):
    """One entry of ``GET /v1/models``'s OpenAI-style ``data`` list."""

    id: str
    object: str = "model"
    #: Unix time the model finished loading.
    created: int
    owned_by: str = "llm-pool"


class ModelsList(msgspec.Struct, kw_only=True):
    """``GET /v1/models``: llm-pool's ``models`` (loaded model names) and, alongside, OpenAI's
    list shape (``object: list``, ``data``) so OpenAI clients (``client.models.list()``) read the
    same body.  Both always name the same models."""

    models: list[str]
    object: str = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- OpenAI chat completions
# The policy (which OpenAI fields are honoured, ignored, or refused) lives with the route in
# pool.openai_compat; these are only the shapes.


class ChatTextPart(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type", tag="text"):
    """A ``{"type": "text", "text": ...}`` content part (the only kind llm-pool reads)."""

    text: str


class ChatMessageIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ChatTextPart]
    #: Accepted and ignored (a participant's name).
    name: str | None = None
    # What an SDK-made assistant message carries when a client sends it back (``model_dump()``);
    # accepted only when empty (checked by pool.openai_compat).
    refusal: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None


class ChatStreamOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    include_usage: bool | None = None
    #: Accepted and ignored (llm-pool adds no obfuscation padding).
    include_obfuscation: bool | None = None


class ChatCompletionRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/chat/completions``: OpenAI's fields, llm-pool's extensions, and the OpenAI
    fields accepted and ignored (typed ``Any``; see pool.openai_compat for which values pass)."""

    model: NonEmpty
    messages: Annotated[list[ChatMessageIn], msgspec.Meta(min_length=1)]
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: StopString | StopList | None = None
    stream: bool | None = None
    stream_options: ChatStreamOptions | None = None
    n: int | None = None
    #: Reproducible sampling (see pool.openai_compat); a runtime without seeds refuses it.
    seed: Seed | None = None
    presence_penalty: OpenAIPenalty | None = None
    frequency_penalty: OpenAIPenalty | None = None
    # llm-pool extensions (the openai SDK sends them through ``extra_body``)
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    allow_remote: bool = False
    source_lang_code: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    target_lang_code: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    fairness_key: str | None = None
    priority: Priority = 0
    #: OpenAI's end-user id: the fairness key when neither ``fairness_key`` nor the header names one.
    user: str | None = None
    # OpenAI fields accepted and ignored, whatever their value
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    #: Routes requests with the same key to the same replica (issue 16; no longer ignored).
    prompt_cache_key: PromptCacheKey | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI fields accepted only at their neutral value
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    modalities: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None


class ChatMessageOut(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(msgspec.Struct, kw_only=True):
    """A ``chat.completion`` body, plus llm-pool's ``metrics``."""

    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    metrics: Metrics


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A ``chat.completion.chunk`` frame.  ``usage`` only on the ``include_usage`` chunk (whose
    ``choices`` is empty); llm-pool's ``metrics`` on the chunk that carries ``finish_reason``."""

    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: ChatUsage | None = None
    metrics: Metrics | None = None


class ErrorInfo(msgspec.Struct, kw_only=True):
    type: str
    code: str
    message: str
    param: str | None


class ErrorDetail(msgspec.Struct, kw_only=True):
    code: str
    model: str | None
    message: str


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorInfo
    detail: ErrorDetail


_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def decode_body(body: bytes, kind: type[Any], *, code: str = "invalid_request") -> Any:
    """Decode a JSON body into ``kind`` or raise 400 ``code`` naming the problem, in our words
    (:mod:`llm_pool.config.validation`), and its JSON path as ``param``."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        invalid = read_validation_error(e)
        raise PoolError(400, code, f"invalid request body: {describe(invalid, kind)}", param=invalid.path) from None
    except msgspec.DecodeError:
        raise PoolError(400, code, f"invalid JSON body: {_why_not_json(body)}") from None
    except RecursionError:  # deep nesting inside a field typed Any
        raise PoolError(400, code, "invalid JSON body: nested too deeply") from None


def _why_not_json(body: bytes) -> str:
    """Why ``body`` is not a JSON document, in our words (msgspec's own text is not a contract)."""
    if not body.strip():
        return "the body is empty"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return "not valid UTF-8"
    return "not valid JSON"


def check_no_nul(value: str | None, param: str) -> None:
    """400 for caller text holding NUL (no runtime takes it, and prompt rendering keeps NUL for
    its own placeholders); ``param`` is the JSON path."""
    if value is not None and "\x00" in value:
        raise invalid_request(f"{param[2:]} contains a NUL character", param=param)


def check_max_tokens(settings: Settings, value: int | None, param: str) -> None:
    """400 for ``max_tokens`` above ``engine.max_tokens_limit``; ``param`` is the JSON path."""
    limit = settings.engine.max_tokens_limit
    if value is not None and value > limit:
        raise invalid_request(f"{param[2:]}={value} exceeds this server's limit of {limit}", param=param)


def resolve_decoding(settings: Settings, given: DecodingIn | None) -> Decoding:
    """Request decoding values over ``engine.decoding``; enforces ``engine.max_tokens_limit``."""
    base = settings.engine.decoding
    fields = DecodingIn.__struct_fields__  # the server's defaults cover exactly these
    values = {f: getattr(base, f) for f in fields}
    if given is not None:
        values.update({f: v for f in fields if (v := getattr(given, f)) is not msgspec.UNSET})
    check_max_tokens(settings, values["max_tokens"], "$.decoding.max_tokens")
    for i, s in enumerate(values["stop"]):
        check_no_nul(s, f"$.decoding.stop[{i}]")
    return Decoding(**{**values, "stop": list(values["stop"])})


def fairness_key(given: str | None, header: str | None = None, user: str | None = None) -> str | None:
    """The request's fairness key: ``fairness_key`` from the body, else the
    :data:`FAIRNESS_KEY_HEADER` header, else (OpenAI routes) a non-blank ``user``; None: the
    anonymous bucket.  Trimmed; 400 when blank (but a blank ``user``, which OpenAI clients may
    send, counts as none), longer than :data:`FAIRNESS_KEY_MAX` or not printable."""
    for value, where, blank_ok in ((given, "$.fairness_key", False), (header, FAIRNESS_KEY_HEADER, False), (user, "$.user", True)):
        if value is None:
            continue
        key = value.strip()
        name = where[2:] if where.startswith("$.") else f"the {where} header"
        param = where if where.startswith("$.") else None
        if not key:
            if blank_ok:
                continue
            raise invalid_request(f"{name} must not be blank", param=param)
        if len(key) > FAIRNESS_KEY_MAX:
            raise invalid_request(
                f"{name} is {len(key)} characters long; a fairness key has at most {FAIRNESS_KEY_MAX}", param=param
            )
        if not key.isprintable():
            raise invalid_request(f"{name} contains a character that is not printable", param=param)
        return key
    return None


def to_generation_request(settings: Settings, body: ResponsesRequest, key_header: str | None = None) -> GenerationRequest:
    check_no_nul(body.input, "$.input")
    check_no_nul(body.instructions, "$.instructions")
    messages = []
    if body.instructions is not None:
        messages.append(Message(role="system", content=body.instructions))
    messages.append(Message(role="user", content=body.input))
    return GenerationRequest(
        model=body.model,
        messages=messages,
        decoding=resolve_decoding(settings, body.decoding),
        source_lang_code=body.source_lang_code,
        target_lang_code=body.target_lang_code,
        stream=body.stream,
        fairness_key=fairness_key(body.fairness_key, key_header),
        priority=body.priority,
        prompt_cache_key=body.prompt_cache_key,
    )


def build_metrics(job: Any, pool_total_ms: float | None) -> Metrics:
    """The response's metrics from a finished job's timestamps and its backend's stats."""
    t = job.timings()
    s = job.stats
    tps = None
    if s is not None and s.output_tokens and s.generate_total_ms:
        tps = round(s.output_tokens / (s.generate_total_ms / 1000.0), 3)
    return Metrics(
        **t,
        pool_total_wall_ms=pool_total_ms,
        engine_tokenize_ms=s.tokenize_ms if s else None,
        gpu_time_to_first_token_ms=s.time_to_first_token_ms if s else None,
        gpu_generate_total_ms=s.generate_total_ms if s else None,
        gpu_decode_after_first_token_ms=s.decode_after_first_token_ms if s else None,
        engine_prompt_tokens=s.prompt_tokens if s else None,
        engine_output_tokens=s.output_tokens if s else None,
        engine_tokens_per_second=tps,
        request_cost=s.cost if s else None,
        engine_cached_prompt_tokens=s.cached_prompt_tokens if s else None,
    )


def message_id(request_id: str) -> str:
    """The id of a response's one output message (``resp_<hex>`` → ``msg_<hex>``)."""
    return "msg_" + request_id.partition("_")[2]


def response_body(
    job: Any, *, created_at: int, text: str | None = None, metrics: Metrics | None = None, openai_items: bool = True
) -> ResponseBody:
    """``job``'s response object: in progress (empty output) while ``text`` is None, else
    finished with ``text``, its usage and ``metrics``.  ``output`` holds OpenAI's message item,
    or llm-pool's ``{"type": "output_text", "text": ...}`` when ``openai_items`` is false."""
    if text is None:
        return ResponseBody(
            id=job.id, created_at=created_at, status="in_progress", model=job.request.model, output=[], output_text=""
        )
    s = job.stats
    cut = s is not None and s.finish_reason == "length"
    status: Literal["completed", "incomplete"] = "incomplete" if cut else "completed"
    prompt, output = token_counts(job)
    return ResponseBody(
        id=job.id,
        created_at=created_at,
        status=status,
        model=job.request.model,
        output=[
            OutputMessage(id=message_id(job.id), status=status, content=[OutputText(text=text)])
            if openai_items
            else OutputTextItem(text=text)
        ],
        output_text=text,
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if cut else None,
        usage=ResponseUsage(input_tokens=prompt, output_tokens=output, total_tokens=prompt + output),
        metrics=metrics,
    )


def token_counts(job: Any) -> tuple[int, int]:
    """``(prompt_tokens, output_tokens)`` for OpenAI's ``usage``: 0 where the backend did not
    count (``metrics`` keeps the honest nulls)."""
    s = job.stats
    return (s.prompt_tokens or 0, s.output_tokens or 0) if s is not None else (0, 0)
