"""Wire shapes of the inference API (msgspec Structs) and their translation to engine requests.

Decoding is strict: unknown fields are rejected with their path, every constraint is a msgspec
``Meta``, and the 400 says what was expected in our words, derived from that same ``Meta``
(``$.decoding.max_tokens: expected an integer >= 1``); the same Structs generate the OpenAPI
schema.  Nothing here does I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
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
from llm_pool.pool.jobs import Decoding, GenerationRequest, ImagePart, Message, ResponseFormat

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


# ---------------------------------------------------------------- content items (issue 16)
class ChatTextPart(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type", tag="text"):
    """A ``{"type": "text", "text": ...}`` content item."""

    text: str


class InputTextItem(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type", tag="input_text"):
    """OpenAI Responses' ``{"type": "input_text", "text": ...}``."""

    text: str


ImageDetail = Literal["low", "high", "auto"]


class ImageUrl(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: A ``data:image/...;base64,...`` URL, or ``http(s)://`` where the model allows it.
    url: Annotated[str, msgspec.Meta(min_length=1)]
    detail: ImageDetail = "auto"


class ImageUrlItem(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type", tag="image_url"):
    """``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`` (Chat Completions')."""

    image_url: ImageUrl


class InputImageItem(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type", tag="input_image"):
    """OpenAI Responses' ``{"type": "input_image", "image_url": ..., "detail": ...}``."""

    image_url: Annotated[str, msgspec.Meta(min_length=1)]
    detail: ImageDetail = "auto"


ContentItem = ChatTextPart | InputTextItem | ImageUrlItem | InputImageItem
Thinking = Literal["default", "enabled", "disabled"]


class ResponsesMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One turn of a ``/v1/responses`` conversation (``instructions`` is the system prompt)."""

    role: Literal["user", "assistant"]
    content: str | Annotated[list[ContentItem], msgspec.Meta(min_length=1)]


# ---------------------------------------------------------------- structured output (issue 16)
#: A schema's or function's name, as OpenAI restricts it.
FormatName = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]{1,64}$")]


class JsonSchemaSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``response_format.json_schema``: the schema the answer must match."""

    name: FormatName
    description: str | None = None
    #: A JSON schema (bounded: 64 KiB, 32 levels); omitted: any JSON object.
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class FormatText(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="text"):
    """``{"type": "text"}``: free text (the default)."""


class FormatJsonObject(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="json_object"):
    """``{"type": "json_object"}``: one JSON object."""


class FormatJsonSchema(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type", tag="json_schema"):
    """``{"type": "json_schema", "json_schema": {name, description, schema, strict}}``."""

    json_schema: JsonSchemaSpec


#: ``response_format`` on both routes (Chat Completions' shape).
ResponseFormatIn = FormatText | FormatJsonObject | FormatJsonSchema


class TextFormatJsonSchema(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type", tag="json_schema"):
    """OpenAI Responses' ``text.format`` for a schema (its fields flat)."""

    name: FormatName
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class OutputTextIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, tag_field="type", tag="output_text"):
    """An earlier answer's text, as the OpenAI SDK sends an assistant message item back."""

    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """An item of OpenAI Responses' ``input`` list: one turn (``type`` may be left out, as the
    SDK's ``EasyInputMessage`` does).  ``system``/``developer`` turns add to ``instructions``."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[ContentItem | OutputTextIn], msgspec.Meta(min_length=1)]
    #: What the SDK copies from an earlier answer's output item; accepted and ignored.
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class _InputMessages(msgspec.Struct, forbid_unknown_fields=True):
    input: list[InputMessage]


class _InputContent(msgspec.Struct, forbid_unknown_fields=True):
    input: list[ContentItem]


def input_items(items: list[dict[str, Any]]) -> list[InputMessage] | list[ContentItem]:
    """``input`` given as a list: message items when its first item has a ``role``, else content
    items; a 400 naming the first thing wrong (``$.input[i]...``) otherwise."""
    kind: type[Any] = _InputMessages if "role" in items[0] else _InputContent
    try:
        return msgspec.convert({"input": items}, kind).input  # type: ignore[no-any-return]
    except msgspec.ValidationError as e:
        invalid = read_validation_error(e)
        raise PoolError(400, "invalid_request", f"invalid request body: {describe(invalid, kind)}", param=invalid.path) from None
    except RecursionError:
        raise PoolError(400, "invalid_request", "invalid request body: $.input is nested too deeply", param="$.input") from None


class ResponsesText(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """OpenAI Responses' ``text``: ``{"format": {...}}`` (another spelling of ``response_format``)."""

    format: FormatText | FormatJsonObject | TextFormatJsonSchema | None = None
    #: Accepted and ignored (llm-pool has no verbosity setting other than ``medium``).
    verbosity: Literal["medium"] | None = None


def to_response_format(given: Any) -> ResponseFormat | None:
    """The engine's :class:`~pool.jobs.ResponseFormat` of a decoded ``response_format`` or
    ``text.format``; None for text."""
    if given is None or isinstance(given, FormatText):
        return None
    if isinstance(given, FormatJsonObject):
        return ResponseFormat(type="json_object")
    spec = given.json_schema if isinstance(given, FormatJsonSchema) else given
    return ResponseFormat(
        type="json_schema", schema=spec.schema, name=spec.name, description=spec.description, strict=spec.strict
    )


class ResponsesRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/responses``."""

    model: NonEmpty
    #: The user's text, a list of content items, or (OpenAI Responses' form) a list of message
    #: items ``{role, content}``; exactly one of ``input`` and ``messages``.  Typed as objects
    #: here and read by :func:`input_items` (one list holds either kind: a msgspec union cannot).
    input: str | Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1, max_length=4096)] | None = None
    instructions: str | None = None
    source_lang_code: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    target_lang_code: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    stream: bool = False
    allow_remote: bool = False
    decoding: DecodingIn | None = None
    #: Whose request this is, for fair sharing of the model (1..128 characters after trimming).
    fairness_key: str | None = None
    priority: Priority = 0
    # conversations, content arrays, thinking (issue 16)
    #: A conversation instead of ``input``: user and assistant turns, ending with a user turn.
    messages: list[ResponsesMessage] | None = None
    #: Thinking for this request, among the model's ``capabilities.thinking_modes``.
    thinking: Thinking = "default"
    # structured output (issue 16): either spelling, not both
    response_format: ResponseFormatIn | None = None
    text: ResponsesText | None = None
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


class ModelCapabilities(msgspec.Struct, kw_only=True):
    """What a model honestly takes, from its backend, prompt format and settings
    (:func:`llm_pool.backends.capabilities.capabilities`): on ``/v1/models`` entries and admin rows."""

    #: Input modalities: ``["text"]``, or ``["text", "image"]`` (image content items accepted).
    modalities: list[str]
    #: Whether file items (``input_file``) are accepted: never, today.
    file_inputs: bool
    #: Whether ``messages`` may hold more than one turn.
    multi_turn: bool
    #: The values ``thinking`` may take: ``["default"]``, or also ``enabled`` / ``disabled``.
    thinking_modes: list[str]
    #: Output formats the model can be held to (``text``; ``json_schema`` where enforced).
    response_formats: list[str]


class ModelCard(msgspec.Struct, kw_only=True):
    """One entry of ``GET /v1/models``'s OpenAI-style ``data`` list."""

    id: str
    object: str = "model"
    #: Unix time the model finished loading.
    created: int
    owned_by: str = "llm-pool"
    # capabilities (issue 16)
    capabilities: ModelCapabilities


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


class ChatFunctionCall(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    #: The arguments, as JSON text.
    arguments: str


class ChatToolCall(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A call in an assistant message (sent back by the client, or in an answer)."""

    id: str
    type: Literal["function"] = "function"
    function: ChatFunctionCall


class ChatMessageIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    #: Null only in an assistant message that makes tool calls.
    content: str | list[ChatTextPart | ImageUrlItem] | None = None
    #: Accepted and ignored (a participant's name).
    name: str | None = None
    # What an SDK-made assistant message carries when a client sends it back (``model_dump()``);
    # accepted only when empty (checked by pool.openai_compat).
    refusal: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None
    # tool calling (issue 16): an assistant turn's calls; a tool turn's answered call
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None


class ChatFunctionDef(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: FormatName
    description: str | None = None
    #: The JSON schema of the arguments (bounded like ``response_format``'s); omitted: any object.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: ChatFunctionDef


class ChatToolChoiceFunction(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str


class ChatToolChoice(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``tool_choice`` naming a function: ``{"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"]
    function: ChatToolChoiceFunction


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
    n: Choices | None = None
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
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    # OpenAI fields accepted only at their neutral value
    logit_bias: Any = None
    functions: Any = None
    function_call: Any = None
    modalities: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    # thinking (issue 16), an llm-pool extension: as on /v1/responses
    thinking: Thinking = "default"
    # structured output and tool calling (issue 16)
    response_format: ResponseFormatIn | None = None
    tools: Annotated[list[ChatTool], msgspec.Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ChatToolChoice | None = None


class ChatMessageOut(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    #: Null when the answer is only tool calls.
    content: str | None
    #: The answer's tool calls (issue 16); absent when there are none.
    tool_calls: list[ChatToolCall] | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    message: ChatMessageOut
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChatLogprobs | None = None


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


class ChatToolCallDelta(msgspec.Struct, kw_only=True):
    """A tool call in a stream delta (OpenAI's shape; llm-pool sends each call whole, once)."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: ChatFunctionCall


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    # tool calling (issue 16)
    tool_calls: list[ChatToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: ChatDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChatLogprobs | None = None


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


# ---------------------------------------------------------------- issue 16 §2: OpenAI completions,
# embeddings, n and logprobs (policy in pool.openai_compat; these are only the shapes)
#: How many choices one request may ask for (``n``): each choice is a job of its own.
N_MAX = 16
Choices = Annotated[int, msgspec.Meta(ge=1, le=N_MAX)]
#: Chat's ``top_logprobs`` (OpenAI: 0..20).
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
#: Legacy completions' ``logprobs`` (OpenAI: 0..5).
CompletionLogprobs = Annotated[int, msgspec.Meta(ge=0, le=5)]
#: At most this many prompts (``/v1/completions``) or inputs (``/v1/embeddings``) per request.
BATCH_MAX = 2048


class ChatTopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(msgspec.Struct, kw_only=True):
    """A chat choice's (or stream chunk choice's) ``logprobs``: one entry per generated token."""

    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/completions`` (OpenAI's legacy text completions): the prompt is sent as caller
    text with no template (see pool.openai_compat)."""

    model: NonEmpty
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=BATCH_MAX)]
    suffix: str | None = None
    #: OpenAI's default is 16 tokens.
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices | None = None
    stream: bool | None = None
    stream_options: ChatStreamOptions | None = None
    logprobs: CompletionLogprobs | None = None
    echo: bool | None = None
    stop: StopString | StopList | None = None
    seed: Seed | None = None
    presence_penalty: OpenAIPenalty | None = None
    frequency_penalty: OpenAIPenalty | None = None
    best_of: Choices | None = None
    logit_bias: Any = None
    user: str | None = None
    # llm-pool extensions (the openai SDK sends them through ``extra_body``)
    top_k: TopK | None = None
    repetition_penalty: RepetitionPenalty | None = None
    allow_remote: bool = False
    fairness_key: str | None = None
    priority: Priority = 0


class CompletionLogprobsOut(msgspec.Struct, kw_only=True):
    """A completion choice's ``logprobs`` (OpenAI's legacy shape): per generated token its text,
    log probability, the most likely alternatives (``{token: logprob}``) and its character
    offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, kw_only=True):
    text: str
    index: int
    logprobs: CompletionLogprobsOut | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A ``text_completion`` body (stream chunks have the same shape; ``usage`` only on the
    ``include_usage`` chunk, ``metrics`` on a choice's last chunk)."""

    id: str
    #: Always ``text_completion`` (no default: ``omit_defaults`` would leave it out).
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: ChatUsage | None = None
    metrics: Metrics | None = None


class EmbeddingRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /v1/embeddings``."""

    model: NonEmpty
    input: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=BATCH_MAX)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None
    # llm-pool extensions
    allow_remote: bool = False
    fairness_key: str | None = None
    priority: Priority = 0


class Embedding(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    index: int
    #: Floats, or (``encoding_format: base64``) their little-endian float32 bytes in base64.
    embedding: list[float] | str


class EmbeddingUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    metrics: Metrics


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
    check_no_nul(body.instructions, "$.instructions")
    turns = conversation_of(body)
    # instructions, then an input list's system/developer turns: one system prompt
    system = ([body.instructions] if body.instructions is not None else []) + [m.content for m in turns if m.role == "system"]
    messages = [Message(role="system", content="\n\n".join(system))] if system else []
    messages += [m for m in turns if m.role != "system"]
    if body.response_format is not None and body.text is not None and body.text.format is not None:
        raise invalid_request("send response_format or text.format, not both", param="$.text.format")
    return GenerationRequest(
        model=body.model,
        messages=messages,
        response_format=to_response_format(
            body.response_format if body.response_format is not None else (body.text.format if body.text else None)
        ),
        decoding=resolve_decoding(settings, body.decoding),
        source_lang_code=body.source_lang_code,
        target_lang_code=body.target_lang_code,
        stream=body.stream,
        fairness_key=fairness_key(body.fairness_key, key_header),
        priority=body.priority,
        thinking=body.thinking,
        prompt_cache_key=body.prompt_cache_key,
    )


# ---------------------------------------------------------------- conversations and content (issue 16)
#: Image media types a ``data:`` URL may carry, with the bytes their files start with.
IMAGE_MAGIC: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}
#: Largest decoded image a ``data:`` URL may hold (the body limit, ``max_body_bytes``, applies first).
IMAGE_MAX_BYTES = 20 * 1024 * 1024
_DATA_URL = re.compile(r"data:([a-z]+/[a-z0-9.+-]+);base64,(.*)", re.DOTALL | re.IGNORECASE)


def conversation_of(body: ResponsesRequest) -> list[Message]:
    """``/v1/responses``' turns: ``input`` as one user turn, or ``messages`` (exactly one of the
    two; not empty; ending with a user turn), each content a string or a list of items."""
    if (body.input is None) == (body.messages is None):
        both = body.input is not None
        raise invalid_request(
            "send either input or messages, not both" if both else "the request needs input (or messages)",
            param="$.messages" if both else "$.input",
        )
    where = "messages"
    turns: list[Any]
    if body.input is not None:
        given = body.input if isinstance(body.input, str) else input_items(body.input)
        if isinstance(given, str) or not isinstance(given[0], InputMessage):
            text, parts = content_of(given, "$.input")  # type: ignore[arg-type]
            return [Message(role="user", content=text, parts=parts)]
        where, turns = "input", given
    else:
        assert body.messages is not None
        turns = body.messages
    if not turns:
        raise invalid_request("messages must hold at least one message", param="$.messages")
    system = [i for i, m in enumerate(turns) if m.role in ("system", "developer")]
    if system and system[-1] >= len(system):  # OpenAI's input list: system turns first only
        raise invalid_request(
            f"{where}[{system[-1]}] is a {turns[system[-1]].role} message after the conversation began;"
            " system and developer messages come first",
            param=f"$.{where}[{system[-1]}].role",
        )
    if turns[-1].role != "user":
        raise invalid_request(
            "the last message must be a user message (llm-pool generates the next assistant turn)",
            param=f"$.{where}[{len(turns) - 1}].role",
        )
    out = []
    for i, m in enumerate(turns):
        content = m.content
        if not isinstance(content, str):  # an earlier answer's output_text items are its text
            content = [ChatTextPart(text=c.text) if isinstance(c, OutputTextIn) else c for c in content]
        text, parts = content_of(content, f"$.{where}[{i}].content")
        if parts is not None and m.role != "user":
            raise invalid_request(
                f"{where}[{i}] is an {m.role} message with an image; images go in user messages",
                param=f"$.{where}[{i}].content",
            )
        role = "system" if m.role in ("system", "developer") else m.role
        out.append(Message(role=role, content=text, parts=parts))
    return out


def content_of(content: str | list[Any], at: str) -> tuple[str, list[str | ImagePart] | None]:
    """A message's text (text items joined with newlines) and, when it holds an image, its
    items in order; 400 for NUL in text or an image URL llm-pool never takes (see
    :func:`image_of`).  ``at``: the content's JSON path."""
    if isinstance(content, str):
        check_no_nul(content, at)
        return content, None
    texts: list[str] = []
    parts: list[str | ImagePart] = []
    for j, item in enumerate(content):
        where = f"{at}[{j}]"
        if isinstance(item, (ChatTextPart, InputTextItem)):
            check_no_nul(item.text, f"{where}.text")
            texts.append(item.text)
            parts.append(item.text)
        else:
            parts.append(image_of(item, where))
    text = "\n".join(texts)
    return text, parts if any(isinstance(p, ImagePart) for p in parts) else None


def image_of(item: ImageUrlItem | InputImageItem, at: str) -> ImagePart:
    """An image item as the job's :class:`ImagePart`.  ``data:`` URLs must be base64 of a PNG,
    JPEG, GIF or WebP image (checked by its first bytes) of at most :data:`IMAGE_MAX_BYTES`;
    ``http(s)://`` URLs pass here (the model decides: ``image_url_fetch``); anything else
    (``file://`` above all) is a 400."""
    url, detail = (item.image_url.url, item.image_url.detail) if isinstance(item, ImageUrlItem) else (item.image_url, item.detail)
    param = f"{at}.image_url.url" if isinstance(item, ImageUrlItem) else f"{at}.image_url"
    scheme = url.partition(":")[0].lower()
    if scheme in ("http", "https"):
        return ImagePart(url=url, detail=detail, at=param)
    if scheme != "data":
        raise invalid_request(
            f"{param[2:]}: llm-pool takes images as data: URLs (or http(s):// where the model allows it), never {scheme}: URLs",
            param=param,
        )
    m = _DATA_URL.fullmatch(url)
    if m is None:
        raise invalid_request(f"{param[2:]}: a data: URL must be data:<image type>;base64,<data>", param=param)
    media = m.group(1).lower()
    if media not in IMAGE_MAGIC:
        raise invalid_request(
            f"{param[2:]}: media type {media!r} is not an image llm-pool takes ({', '.join(IMAGE_MAGIC)})", param=param
        )
    if len(m.group(2)) > IMAGE_MAX_BYTES * 4 // 3 + 4:
        raise invalid_request(f"{param[2:]}: the image is larger than {IMAGE_MAX_BYTES} bytes", param=param)
    try:
        data = base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise invalid_request(f"{param[2:]}: the data: URL's data is not valid base64", param=param) from None
    if not data.startswith(IMAGE_MAGIC[media]) or (media == "image/webp" and data[8:12] != b"WEBP"):
        raise invalid_request(f"{param[2:]}: the data is not a {media} image", param=param)
    return ImagePart(url=f"data:{media};base64,{m.group(2)}", detail=detail, at=param)


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
