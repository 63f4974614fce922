"""Prompt formats, prompt tokenization and stop-string handling, shared by every local backend.

``render_prompt`` turns a :class:`~pool.jobs.GenerationRequest` into the exact text a model
sees, as *segments*: the template's own markup (trusted) and everything a caller sent (message
contents: ``input``, ``instructions``, every turn).  :func:`tokenize_segments` then parses
special tokens in the markup only, so a caller who writes ``<|im_end|>`` gets the plain-text
tokens of those ten characters, never the control token: a caller cannot forge a turn.
:class:`StopMatcher` applies stop strings to a stream as text, without ever emitting a partial
stop string.  Nothing here touches a runtime library; model chat templates (``native``,
``gemma4_template``, ``translategemma_template``) are rendered with jinja2's sandbox, the way
Hugging Face and llama.cpp render them.

How the prompt is tokenized (:func:`tokenize_segments`), and why that way: a runtime's own
"parse special tokens" tokenization first cuts the text at every special token, then tokenizes
each piece of text between them on its own.  We make the same cuts, but only in trusted
segments, join everything between two cuts (markup and caller text alike) and tokenize that
run with special-token parsing off.  So a prompt without special-token text in caller strings
gets exactly the tokens it got when the whole prompt was one string (no new token boundary at
each caller string, and SentencePiece's space prefix still goes only where it went: at the
start and after each special token), and one with such text gets plain-text tokens for it.
Token attributes that eat whitespace next to a special token (``lstrip``/``rstrip``) are
applied as the runtimes apply them.

Bounds (:meth:`PromptPrep.check_size`): before anything is rendered or tokenized, a request
whose caller text has more characters than the context can hold (``n_ctx`` tokens of at most
``max_token_chars`` characters each, the longest entry of the vocabulary), or more turns than
the context has positions, is refused with a 400.  Tokenizing is then bounded by the context
(llama.cpp's special-token partition is quadratic in the number of matches: 950 KB of
``<|im_end|>`` held a replica 30 s before), and no request can hold a replica hostage.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from llm_pool.backends.structured import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    arguments_value,
    call_json,
    offers_tools,
    tool_json,
)
from llm_pool.config import DEFAULT_SYSTEM_PROMPT
from llm_pool.pool.errors import invalid_request, tools_unsupported
from llm_pool.pool.jobs import GenerationRequest, Job, Message, ToolSpec

if TYPE_CHECKING:
    from llm_pool.config import ModelSettings

log = logging.getLogger("llm_pool.prompts")

CHATML_STOP = "<|im_end|>"
#: Formats whose rendering needs the model's own chat template.
TEMPLATE_FORMATS = ("native", "gemma4_template", "translategemma_template")
NATIVE_STOPS: dict[str, tuple[str, ...]] = {
    "generic": (CHATML_STOP,),
    "qwen3_template": (CHATML_STOP,),
    "mistral_template": ("</s>",),
    "gemma4_template": ("<turn|>", "<end_of_turn>"),
    "translategemma_template": ("<end_of_turn>",),
    "native": (),
}
#: Formats whose rendering turns thinking on or off (a request's ``thinking``).
THINKING_FORMATS = ("qwen3_template", "gemma4_template")
#: Formats that take one user message, no conversation.
SINGLE_TURN_FORMATS = ("translategemma_template",)
QWEN3_NO_THINK = "/no_think\n"
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"
#: What a language code may look like (``en``, ``zh-Hant``, ``fra_Latn``): codes reach the chat
#: template and the vocabulary as they are (the template maps them to names; CT2 translators
#: look up ``__fr__``-style tokens), so a code must never be able to spell markup.
LANG_CODE = re.compile(r"[A-Za-z0-9_-]+")

#: One piece of a rendered prompt: its text, and whether it is the template's own markup
#: (special tokens in it are parsed) rather than text a caller sent (always plain text).
Segment = tuple[str, bool]
T = TypeVar("T")


@dataclass
class Prompt:
    segments: list[Segment]
    #: Stop strings native to the format (the request's own are added by the backend).
    stop: tuple[str, ...] = ()
    #: Sequences a runtime should never generate (CT2's ``suppress_sequences``).
    suppress: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The whole prompt as one string (what the model sees, special tokens spelled out)."""
        return "".join(text for text, _ in self.segments)


class _Segments:
    """Builds a segment list, merging neighbours of the same kind and dropping empty text."""

    def __init__(self) -> None:
        self.out: list[Segment] = []

    def add(self, text: str, trusted: bool) -> _Segments:
        if text:
            if self.out and self.out[-1][1] == trusted:
                self.out[-1] = (self.out[-1][0] + text, trusted)
            else:
                self.out.append((text, trusted))
        return self

    def markup(self, text: str) -> _Segments:
        return self.add(text, True)

    def caller(self, text: str) -> _Segments:
        return self.add(text, False)


def _with_system(request: GenerationRequest) -> list[Message]:
    if any(m.role == "system" for m in request.messages):
        return list(request.messages)
    return [Message(role="system", content=DEFAULT_SYSTEM_PROMPT), *request.messages]


def _content(out: _Segments, m: Message, marker: str | None) -> _Segments:
    """A message's content: its text as caller text, or, with images and a media ``marker``,
    its items in order, newline-separated, each image as the marker (markup)."""
    if m.parts is None or marker is None:
        return out.caller(m.content)
    for i, part in enumerate(m.parts):
        if i:
            out.markup("\n")
        if isinstance(part, str):
            out.caller(part)
        else:
            out.markup(marker)
    return out


# Tool calling in ChatML (issue 16): Hermes / Qwen2.5's system prompt, calls and tool results.
HERMES_TOOLS_HEAD = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
HERMES_TOOLS_TAIL = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    f"{TOOL_CALL_OPEN}{TOOL_CALL_CLOSE} XML tags:\n{TOOL_CALL_OPEN}\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n' + TOOL_CALL_CLOSE
)


def _chatml(
    messages: list[Message],
    *,
    prefix_user: str = "",
    open_answer: str = "",
    marker: str | None = None,
    tools: list[ToolSpec] | None = None,
) -> list[Segment]:
    out = _Segments()
    for i, m in enumerate(messages):
        if m.role == "tool":  # consecutive tool results share one user turn, as in Qwen's template
            if i == 0 or messages[i - 1].role != "tool":
                out.markup("<|im_start|>user")
            out.markup("\n<tool_response>\n").caller(m.content).markup("\n</tool_response>")
            if i + 1 == len(messages) or messages[i + 1].role != "tool":
                out.markup("<|im_end|>\n")
            continue
        out.markup(f"<|im_start|>{m.role}\n")
        if m.role == "user":
            out.markup(prefix_user)
        _content(out, m, marker)
        if m.role == "system" and tools:
            out.markup(HERMES_TOOLS_HEAD)
            for tool in tools:
                out.markup("\n").caller(tool_json(tool))
            out.markup(HERMES_TOOLS_TAIL)
        for j, call in enumerate(m.tool_calls or ()):
            out.markup(("\n" if m.content or j else "") + TOOL_CALL_OPEN + "\n")
            out.caller(call_json(call)).markup("\n" + TOOL_CALL_CLOSE)
        out.markup("<|im_end|>\n")
    return out.markup("<|im_start|>assistant\n" + open_answer).out


def _mistral(messages: list[Message], marker: str | None = None) -> list[Segment]:
    system = next((m.content for m in messages if m.role == "system"), "")
    turns = [m for m in messages if m.role != "system"]
    out, first = _Segments().markup("<s>"), True
    for m in turns:
        if m.role == "user":
            out.markup("[INST] ")
            if first and system:
                out.caller(system).markup("\n\n")
            _content(out, m, marker).markup(" [/INST]")
            first = False
        else:
            out.markup(" ")
            _content(out, m, marker).markup("</s>")
    return out.out


@lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = _tojson
    return env.from_string(template)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """Hugging Face's ``tojson`` (``json.dumps``, not jinja's HTML-safe one), keeping caller
    strings' placeholders (:class:`_StandIns`) as JSON-escaped placeholders (issue 16: tools)."""
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    return _JSON_PLACEHOLDER.sub("\x00\\1\x02", text)


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    enable_thinking: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render a model's own (Hugging Face style) chat template with a generation prompt."""
    from jinja2.exceptions import TemplateError

    try:
        return str(
            _compile(template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=bos_token,
                eos_token=eos_token,
                enable_thinking=enable_thinking,
                tools=tools,
            )
        )
    except TemplateError as e:
        raise invalid_request(f"the model's chat template rejected the conversation: {e}") from None


#: A caller string's stand-in while a chat template renders: NUL is refused in every caller
#: string at the HTTP edge (400), so no caller can write one, and templates pass it through.
#: Open and close differ, so pieces of two cut placeholders never make a whole one.
_PLACEHOLDER = re.compile("\x00([0-9]+)([\x01\x02])")
#: A placeholder as ``json.dumps`` writes it; turned into ``\x00N\x02``: the string, JSON-escaped.
_JSON_PLACEHOLDER = re.compile(r"\\u0000([0-9]+)\\u0001")


class _StandIns:
    """Caller strings swapped for unforgeable placeholders before a template renders, and put
    back (as caller segments) in what it rendered.

    A placeholder keeps the string's leading and trailing whitespace around it, so templates
    that ``trim`` a message still do; a template that rewrites caller text in other ways (slices
    it, or splits off a ``<think>`` block) sees the placeholder instead and the caller's text is
    used as sent."""

    def __init__(self) -> None:
        self.strings: list[tuple[str, str, str]] = []  # (leading space, core, trailing space)

    def __call__(self, text: str) -> str:
        core = text.strip()
        if not core:
            return text  # whitespace only: nothing a tokenizer could read as markup
        lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
        self.strings.append((lead, core, trail))
        return f"{lead}\x00{len(self.strings) - 1}\x01{trail}"

    def deep(self, value: Any) -> Any:
        """``value`` (JSON: tools, call arguments) with every string and key stood in."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self(k) if isinstance(k, str) else k: self.deep(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.deep(v) for v in value]
        return value

    def segments(self, rendered: str) -> list[Segment]:
        out = _Segments()
        parts = _PLACEHOLDER.split(rendered)
        for i, part in enumerate(parts):
            if i % 3 == 1:
                core = self.strings[int(part)][1]
                out.caller(json.dumps(core, ensure_ascii=False)[1:-1] if parts[i + 1] == "\x02" else core)
            elif i % 3 == 2:
                continue
            elif "\x00" in part:
                raise ValueError("the model's chat template cut a message apart; llm-pool cannot tell its markup")
            else:
                out.markup(part)
        return _whitespace_to_caller(out.out)


def _whitespace_to_caller(segments: list[Segment]) -> list[Segment]:
    """Whitespace right next to a caller string is given to it: a template's markup must not
    end or start with space the caller may have written (a special token could span it)."""
    out = _Segments()
    for i, (text, trusted) in enumerate(segments):
        if not trusted:
            out.caller(text)
            continue
        head = len(text) - len(text.lstrip()) if i > 0 else 0
        tail = len(text) - len(text.rstrip()) if i + 1 < len(segments) else 0
        if head + tail >= len(text):  # only whitespace between two caller strings
            out.caller(text)
            continue
        out.caller(text[:head]).markup(text[head : len(text) - tail]).caller(text[len(text) - tail :])
    return out.out


def render_prompt(
    fmt: str,
    request: GenerationRequest,
    *,
    chat_template: str | None = None,
    bos_token: str = "",
    eos_token: str = "",
    enable_thinking: bool = False,
    media_marker: str | None = None,
    add_bos: bool = False,
) -> Prompt:
    """The prompt for ``request`` in format ``fmt`` as segments, with the format's stop strings.

    ``media_marker``: the runtime's placeholder for an image (llama-server's ``<__media__>``),
    put (as markup) where each image item was; without one, a request with images is a 400
    (this runtime is given no images, and none is dropped silently).

    A raw request (``/v1/completions``) is its caller text alone, in any format: one caller
    segment (never a control token), after the model's BOS token where its tokenizer adds one
    (``add_bos``), with no stop string of a template's."""
    if request.raw_prompt is not None:
        head: list[Segment] = [(bos_token, True)] if add_bos and bos_token else []
        return Prompt(head + _Segments().caller(request.raw_prompt).out)
    stops = NATIVE_STOPS[fmt]
    if request.images and (media_marker is None or fmt == "translategemma_template"):
        image = request.images[0]
        raise invalid_request(
            f"{image.at[2:] or 'an image item'}: this model's runtime is given no images", param=image.at or None, model=request.model
        )
    marker = media_marker
    tools = request.tools if offers_tools(request) else None
    if fmt == "generic":
        return Prompt(_chatml(_with_system(request), marker=marker, tools=tools), stops)
    if fmt == "qwen3_template":
        if enable_thinking:
            return Prompt(_chatml(_with_system(request), marker=marker, tools=tools), stops)
        segments = _chatml(
            _with_system(request), prefix_user=QWEN3_NO_THINK, open_answer=QWEN3_EMPTY_THINK, marker=marker, tools=tools
        )
        return Prompt(segments, stops, suppress=["<think>", "</think>"])
    if fmt == "mistral_template":
        return Prompt(_mistral(_with_system(request), marker), stops)
    if not chat_template:
        raise invalid_request(
            f"prompt_format {fmt!r} needs the model's chat template, and this model has none",
            model=request.model,
        )
    stand_in = _StandIns()
    if fmt == "translategemma_template":
        src, tgt = request.source_lang_code, request.target_lang_code
        if not tgt:
            raise invalid_request(
                "translategemma models need target_lang_code", param="target_lang_code", model=request.model
            )
        # the codes go in as they are (the template maps them to language names); check_request
        # let through only codes of letters, digits, "-" and "_"
        text = stand_in(request.input)
        if mixed_source(src):
            # a source the template knows, and our instruction (markup) before the caller's text
            src = translategemma_fallback_source(tgt)
            text = MIXED_SOURCE_INSTRUCTION + text
        content = [{"type": "text", "source_lang_code": src, "target_lang_code": tgt, "text": text}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    else:
        messages = [_template_message(m, stand_in, marker) for m in _with_system(request)]
    template_tools = None
    if tools:  # issue 16: tools reach a template that reads them, as OpenAI-style dicts
        if "tools" not in chat_template:
            raise tools_unsupported(request.model, "its chat template does not render tools")
        template_tools = [stand_in.deep(json.loads(tool_json(t))) for t in tools]
    text = render_chat_template(
        chat_template,
        messages,
        bos_token=bos_token,
        eos_token=eos_token,
        enable_thinking=enable_thinking,
        tools=template_tools,
    )
    return Prompt(stand_in.segments(text), stops)


#: ``source_lang_code`` values that ask a translategemma model to detect the source itself.
MIXED_SOURCE_CODES = ("auto", "mixed")
#: Put before the caller's text when the source is mixed or unknown (the template still needs a
#: source language: :func:`translategemma_fallback_source`).
MIXED_SOURCE_INSTRUCTION = (
    "The text below may mix several languages. Detect the language of each segment and translate every segment.\n\n"
)


def mixed_source(code: str | None) -> bool:
    """Whether ``source_lang_code`` asks for detection: omitted, ``auto`` or ``mixed``."""
    return not code or code.lower() in MIXED_SOURCE_CODES


def translategemma_fallback_source(target: str) -> str:
    """The source code a translategemma template is given for a mixed source: English, or
    German when the target is English (a template has no "unknown" language, and a pair with the
    same language on both sides reads as a request to copy)."""
    return "de" if target.lower().split("-")[0].split("_")[0] == "en" else "en"


def thinking_enabled(configured: bool, request: GenerationRequest) -> bool:
    """Whether the prompt asks the model to think: the request's ``thinking`` (``enabled`` /
    ``disabled``), else the model's ``enable_thinking``."""
    return configured if request.thinking == "default" else request.thinking == "enabled"


def _template_content(m: Message, stand_in: _StandIns, marker: str | None) -> str:
    """A message's content for a chat template: its text's stand-in, or its items in order
    (newline-separated) with each image as the media ``marker``."""
    if m.parts is None or marker is None:
        return stand_in(m.content)
    return "\n".join(stand_in(p) if isinstance(p, str) else marker for p in m.parts)


def _template_message(m: Message, stand_in: _StandIns, marker: str | None) -> dict[str, Any]:
    """A message for a chat template, caller strings stood in; calls and tool results in Hugging
    Face's shape (``tool_calls[].function.arguments`` a JSON value, ``tool_call_id``)."""
    out: dict[str, Any] = {"role": m.role, "content": _template_content(m, stand_in, marker)}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": stand_in(c.id),
                "type": "function",
                "function": {"name": stand_in(c.name), "arguments": stand_in.deep(arguments_value(c.arguments))},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = stand_in(m.tool_call_id)
    return out


#: Prompt formats that render tools (issue 16): ChatML with Hermes calls, or the model's template.
TOOL_FORMATS = ("generic", "qwen3_template", "native")


def check_request(fmt: str, request: GenerationRequest) -> None:
    """Admission-time checks that need no model (raise 400 before the queue)."""
    for key in ("source_lang_code", "target_lang_code"):
        code = getattr(request, key)
        if code and not LANG_CODE.fullmatch(code):
            raise invalid_request(
                f"{key} may contain only letters, digits, '-' and '_'", param=key, model=request.model
            )
    if request.kind != "chat":  # a raw prompt or embeddings: no template to satisfy
        return
    if fmt == "translategemma_template" and not request.target_lang_code:
        # source_lang_code may be left out ("auto", "mixed"): the model then detects each segment's
        raise invalid_request(
            "translategemma models need target_lang_code", param="target_lang_code", model=request.model
        )
    if (offers_tools(request) or any(m.role == "tool" or m.tool_calls for m in request.messages)) and fmt not in TOOL_FORMATS:
        raise tools_unsupported(request.model, f"prompt_format {fmt!r} has no tool calls; {', '.join(TOOL_FORMATS)} do")
    if fmt in ("generic", "qwen3_template", "native"):
        return
    roles = [m.role for m in request.messages if m.role != "system"]
    if fmt == "translategemma_template" and roles != ["user"]:
        raise invalid_request(
            "translategemma models take exactly one user message", param="messages", model=request.model
        )


def check_prompt_length(model: str, n_tokens: int, n_ctx: int | None, *, reserve: int = 0) -> None:
    """Raise 400 for an empty prompt, or one that leaves no room in the context (``reserve``
    more positions are needed by runtimes that keep some)."""
    if n_tokens == 0:
        raise invalid_request("the input renders to an empty prompt", param="input", model=model)
    if n_ctx is not None and n_tokens + reserve >= n_ctx:
        raise invalid_request(
            f"the prompt has {n_tokens} tokens; model {model!r} has a context of {n_ctx}",
            param="input",
            model=model,
        )


def input_chars(request: GenerationRequest) -> int:
    """How many characters of caller text ``request`` carries: its turns, raw prompt, and (tool
    calling, issue 16) tool definitions and earlier calls."""
    chars = sum(len(m.content) for m in request.messages) + len(request.raw_prompt or "")
    chars += sum(len(tool_json(t)) for t in request.tools) if offers_tools(request) else 0
    return chars + sum(len(c.name) + len(c.arguments) for m in request.messages for c in m.tool_calls or ())


def check_input_size(request: GenerationRequest, n_ctx: int | None, max_token_chars: int) -> None:
    """Refuse (400), before anything is rendered or tokenized, a request that cannot fit the
    context whatever its tokens: more turns than the context has positions (in the formats
    llm-pool renders and in chat templates, a user or assistant turn comes with markup of its
    own, so it costs at least one token), or more caller characters than ``n_ctx`` tokens of
    the vocabulary's longest entry can hold (a token never stands for more characters than its
    vocabulary entry has, as long as the tokenizer does not merge characters in normalizing).

    Why before tokenizing: tokenizing runs on the replica's thread, and what it costs grows with
    the input (quadratically for llama.cpp's special-token partition), while every other job on
    that replica waits.  These bounds make it a function of the context size instead."""
    if n_ctx is None:
        return
    turns = len(request.messages)
    if turns > n_ctx:
        raise invalid_request(
            f"the conversation has {turns} turns; model {request.model!r} has a context of {n_ctx} tokens,"
            " and every turn takes at least one",
            param="messages",
            model=request.model,
        )
    chars = input_chars(request)
    limit = n_ctx * max(1, max_token_chars)
    if chars > limit:
        raise invalid_request(
            f"the input has {chars} characters; model {request.model!r} has a context of {n_ctx} tokens,"
            f" which hold at most {limit}",
            param="input",
            model=request.model,
        )


@dataclass(frozen=True)
class SpecialToken(Generic[T]):
    """A special (control) token: what it is called in the vocabulary, and whether it eats the
    whitespace on its left (``lstrip``) or right (``rstrip``), as llama.cpp and Hugging Face do."""

    text: str
    token: T
    lstrip: bool = False
    rstrip: bool = False


class Vocab(Generic[T]):
    """What prompt tokenization needs of a model's tokenizer.

    ``encode`` tokenizes plain text (special-token parsing *off*; no BOS/EOS added).
    ``specials`` are the tokens that special-token parsing would find (llama.cpp: control and
    unknown tokens; Hugging Face: added tokens marked special).  ``max_token_chars`` is the
    length of the longest vocabulary entry, in characters (an upper bound on the caller
    characters one token can consume: byte-level entries have one character per byte,
    SentencePiece entries one per character).  Tokens are ids (llama.cpp, exllamav3) or token
    strings (CTranslate2).  ``encode_after_special`` (default: ``encode``) tokenizes a run that
    does not start the prompt, for tokenizers that prefix only the prompt's first piece of text
    (Hugging Face's Metaspace ``prepend_scheme: "first"``)."""

    def __init__(
        self,
        encode: Callable[[str], list[T]],
        specials: Iterable[SpecialToken[T]],
        max_token_chars: int,
        *,
        encode_after_special: Callable[[str], list[T]] | None = None,
    ) -> None:
        self.encode = encode
        self.encode_after_special = encode_after_special or encode
        self.max_token_chars = max_token_chars
        self.specials: Mapping[str, SpecialToken[T]] = {s.text: s for s in specials if s.text}
        # longest first: at one position the longest special token wins, as in the runtimes
        names = sorted(self.specials, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None


def tokenize_segments(segments: list[Segment], vocab: Vocab[T], *, trust_caller: bool = False) -> list[T]:
    """The tokens of a rendered prompt: special tokens parsed in markup only (in caller text too
    with ``trust_caller``), everything between two special tokens tokenized as one run of plain
    text.  See the module docstring for why runs, not segments."""
    out: list[T] = []
    run: list[str] = []
    eat_space = False  # the last special token eats the whitespace that follows it

    def flush() -> None:
        text = "".join(run)
        run.clear()
        if text:
            out.extend((vocab.encode_after_special if out else vocab.encode)(text))

    def add(text: str) -> None:
        nonlocal eat_space
        if eat_space:
            text = text.lstrip()
            eat_space = not text
        if text:
            run.append(text)

    for text, trusted in segments:
        if vocab.pattern is None or not (trusted or trust_caller):
            add(text)
            continue
        for i, part in enumerate(vocab.pattern.split(text)):
            if not i % 2:
                add(part)
                continue
            special = vocab.specials[part]
            if special.lstrip:
                left = "".join(run).rstrip()
                run[:] = [left] if left else []
            flush()
            out.append(special.token)
            eat_space = special.rstrip
    flush()
    return out


class StopMatcher:
    """Cuts a text stream at the first stop string, never emitting part of one.

    ``push`` returns the text that is safe to emit now and whether a stop string was hit; text
    that could still become a stop string is held back until it can't (or ``flush`` at the end).
    Stop strings are only ever compared with generated *text*: a caller's stop string never
    becomes a token id.
    """

    def __init__(self, stops: list[str] | tuple[str, ...]) -> None:
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.buf = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[: min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.buf)), hold, -1):
                if self.buf.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.buf) - hold
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


class PromptPrep(Generic[T]):
    """A local backend's prompt step: render a job's prompt for the model's prompt format (with
    the model's chat template, special tokens and vocabulary, once :meth:`set_model` read them),
    note an ignored ``beam_size`` once, and (:meth:`prepare`) bound, tokenize and length-check it.

    ``allow_special_tokens_in_input`` (a model setting, for trusted callers only) parses special
    tokens in caller text too."""

    def __init__(self, model: ModelSettings, *, backend: str) -> None:
        self.model = model
        self.backend = backend
        self.chat_template: str | None = None
        self.bos = ""
        self.eos = ""
        self.vocab: Vocab[T] | None = None
        #: Whether the tokenizer starts a prompt with its BOS token (a raw prompt gets it).
        self.add_bos = False
        self._beam_warned = False

    def set_model(self, chat_template: str | None, bos: str, eos: str, vocab: Vocab[T]) -> None:
        self.chat_template, self.bos, self.eos, self.vocab = chat_template, bos, eos, vocab

    def note_beam(self, request: GenerationRequest) -> None:
        """Log once that ``beam_size`` is ignored (no local backend decodes with beams)."""
        if request.decoding.beam_size > 1 and not self._beam_warned:
            log.info("beam_size is not supported by the %s backend; decoding without beams", self.backend)
            self._beam_warned = True

    def render(self, request: GenerationRequest, *, media_marker: str | None = None) -> Prompt:
        self.note_beam(request)
        return render_prompt(
            self.model.prompt_format,
            request,
            chat_template=self.chat_template,
            bos_token=self.bos,
            eos_token=self.eos,
            enable_thinking=thinking_enabled(self.model.enable_thinking, request),
            media_marker=media_marker,
            add_bos=self.add_bos,
        )

    def check_size(self, request: GenerationRequest, n_ctx: int | None) -> None:
        """:func:`check_input_size` with this model's vocabulary."""
        assert self.vocab is not None, "set_model() first"
        check_input_size(request, n_ctx, self.vocab.max_token_chars)

    def tokenize(self, prompt: Prompt) -> list[T]:
        assert self.vocab is not None, "set_model() first"
        return tokenize_segments(prompt.segments, self.vocab, trust_caller=self.model.allow_special_tokens_in_input)

    def prepare(
        self, job: Job, n_ctx: int | None, *, reserve: int = 0, media_marker: str | None = None
    ) -> tuple[Prompt, list[T], StopMatcher]:
        """The job's prompt, its tokens and its stop matcher (the format's stops and the
        request's); raises the 400 of :func:`check_input_size` before rendering, and that of
        :func:`check_prompt_length` for a prompt that does not fit ``n_ctx``.  ``media_marker``:
        see :func:`render_prompt` (the tokens then count each image as its marker's text)."""
        req = job.request
        self.check_size(req, n_ctx)
        prompt = self.render(req, media_marker=media_marker)
        tokens = self.tokenize(prompt)
        check_prompt_length(req.model, len(tokens), n_ctx, reserve=reserve)
        return prompt, tokens, StopMatcher([*prompt.stop, *req.decoding.stop])
