"""Wire shapes of the inference API (msgspec Structs) and their translation to engine requests.

Decoding is strict: unknown fields are rejected with their path, every constraint is a msgspec
``Meta`` so the 400 message is msgspec's own (``Expected `int` >= 1 - at `$.decoding.max_tokens```),
and the same Structs generate the OpenAPI schema.  Nothing here does I/O.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from config import Settings
from pool.errors import invalid_request
from pool.jobs import Decoding, GenerationRequest, Message

NonEmpty = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class DecodingIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    beam_size: Annotated[int, msgspec.Meta(ge=1, le=16)] | msgspec.UnsetType = msgspec.UNSET
    top_k: Annotated[int, msgspec.Meta(ge=1, le=200)] | msgspec.UnsetType = msgspec.UNSET
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | msgspec.UnsetType = msgspec.UNSET
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | msgspec.UnsetType = msgspec.UNSET
    repetition_penalty: Annotated[float, msgspec.Meta(ge=0, le=4)] | msgspec.UnsetType = msgspec.UNSET
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | msgspec.UnsetType = msgspec.UNSET
    stop: Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=16)] | msgspec.UnsetType = (
        msgspec.UNSET
    )


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


class OutputText(msgspec.Struct, kw_only=True):
    type: str = "output_text"
    text: str


class ResponseBody(msgspec.Struct, kw_only=True):
    id: str
    object: str = "response"
    model: str
    output: list[OutputText]
    output_text: str
    metrics: Metrics


class ModelsList(msgspec.Struct, kw_only=True):
    models: list[str]


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


def decode_body(body: bytes, kind: type[Any]) -> Any:
    """Decode a JSON body into ``kind`` or raise 400 naming the problem and its path."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        raise invalid_request(f"invalid request body: {e}", param=error_path(e)) from None
    except msgspec.DecodeError as e:
        raise invalid_request(f"invalid JSON body: {e}") from None
    except UnicodeDecodeError as e:  # msgspec checks UTF-8 late, with Python's own error
        raise invalid_request(f"invalid JSON body: not valid UTF-8 ({e.reason})") from None


_FIELD_IN_MESSAGE = re.compile(r"^Object (?:contains unknown|missing required) field `([^`]*)`")


def error_path(error: msgspec.ValidationError) -> str:
    """The JSON path a validation error is about, as msgspec spells it (``$.decoding.top_k``).

    msgspec leaves the path out for the root object and names unknown/missing fields only in
    the text; both are completed here so the 400's ``param`` always names the field.
    """
    text = str(error)
    path = text.rsplit(" - at `", 1)[1].rstrip("`") if " - at `" in text else "$"
    field = _FIELD_IN_MESSAGE.match(text)
    return f"{path}.{field.group(1)}" if field else path


def _check_text(value: str | None, param: str) -> None:
    if value is not None and "\x00" in value:
        raise invalid_request(f"{param} contains a NUL character", param=param)


def resolve_decoding(settings: Settings, given: DecodingIn | None) -> Decoding:
    """Request decoding values over ``engine.decoding``; enforces ``engine.max_tokens_limit``."""
    base = settings.engine.decoding
    values = {f: getattr(base, f) for f in Decoding.__struct_fields__}
    if given is not None:
        values.update({f: v for f in Decoding.__struct_fields__ if (v := getattr(given, f)) is not msgspec.UNSET})
    limit = settings.engine.max_tokens_limit
    if values["max_tokens"] > limit:
        raise invalid_request(
            f"decoding.max_tokens={values['max_tokens']} exceeds this server's limit of {limit}",
            param="$.decoding.max_tokens",
        )
    for i, s in enumerate(values["stop"]):
        _check_text(s, f"$.decoding.stop[{i}]")
    return Decoding(**{**values, "stop": list(values["stop"])})


def to_generation_request(settings: Settings, body: ResponsesRequest) -> GenerationRequest:
    _check_text(body.input, "$.input")
    _check_text(body.instructions, "$.instructions")
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
    )
