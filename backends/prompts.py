"""Prompt formats and stop-string handling, shared by every local backend.

``render_prompt`` turns a :class:`~pool.jobs.GenerationRequest` into the exact text a model
sees, plus the stop strings native to that format.  :class:`StopMatcher` applies stop strings to
a stream without ever emitting a partial stop string.  Nothing here touches a runtime library;
model chat templates (``native``, ``gemma4_template``, ``translategemma_template``) are rendered
with jinja2's sandbox, the way Hugging Face and llama.cpp render them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from llm_pool.config import DEFAULT_SYSTEM_PROMPT
from llm_pool.pool.errors import invalid_request
from llm_pool.pool.jobs import GenerationRequest, Job, Message

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
QWEN3_NO_THINK = "/no_think\n"
QWEN3_EMPTY_THINK = "<think>\n\n</think>\n\n"


@dataclass
class Prompt:
    text: str
    #: Stop strings native to the format (the request's own are added by the backend).
    stop: tuple[str, ...] = ()
    #: Sequences a runtime should never generate (CT2's ``suppress_sequences``).
    suppress: list[str] = field(default_factory=list)


def _with_system(request: GenerationRequest) -> list[Message]:
    if any(m.role == "system" for m in request.messages):
        return list(request.messages)
    return [Message(role="system", content=DEFAULT_SYSTEM_PROMPT), *request.messages]


def _chatml(messages: list[Message], *, prefix_user: str = "", open_answer: str = "") -> str:
    parts = []
    for m in messages:
        content = prefix_user + m.content if m.role == "user" and prefix_user else m.content
        parts.append(f"<|im_start|>{m.role}\n{content}<|im_end|>\n")
    return "".join(parts) + "<|im_start|>assistant\n" + open_answer


def _mistral(messages: list[Message]) -> str:
    system = next((m.content for m in messages if m.role == "system"), "")
    turns = [m for m in messages if m.role != "system"]
    out, first = "<s>", True
    for m in turns:
        if m.role == "user":
            text = f"{system}\n\n{m.content}" if first and system else m.content
            out += f"[INST] {text} [/INST]"
            first = False
        else:
            out += f" {m.content}</s>"
    return out


@lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    enable_thinking: bool = False,
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
            )
        )
    except TemplateError as e:
        raise invalid_request(f"the model's chat template rejected the conversation: {e}") from None


def render_prompt(
    fmt: str,
    request: GenerationRequest,
    *,
    chat_template: str | None = None,
    bos_token: str = "",
    eos_token: str = "",
    enable_thinking: bool = False,
) -> Prompt:
    """The prompt text for ``request`` in format ``fmt``, with the format's stop strings."""
    stops = NATIVE_STOPS[fmt]
    if fmt == "generic":
        return Prompt(_chatml(_with_system(request)), stops)
    if fmt == "qwen3_template":
        if enable_thinking:
            return Prompt(_chatml(_with_system(request)), stops)
        text = _chatml(_with_system(request), prefix_user=QWEN3_NO_THINK, open_answer=QWEN3_EMPTY_THINK)
        return Prompt(text, stops, suppress=["<think>", "</think>"])
    if fmt == "mistral_template":
        return Prompt(_mistral(_with_system(request)), stops)
    if not chat_template:
        raise invalid_request(
            f"prompt_format {fmt!r} needs the model's chat template, and this model has none",
            model=request.model,
        )
    if fmt == "translategemma_template":
        src, tgt = request.source_lang_code, request.target_lang_code
        if not src or not tgt:
            raise invalid_request(
                "translategemma models need source_lang_code and target_lang_code",
                param="source_lang_code" if not src else "target_lang_code",
                model=request.model,
            )
        content = [{"type": "text", "source_lang_code": src, "target_lang_code": tgt, "text": request.input}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
    else:
        messages = [{"role": m.role, "content": m.content} for m in _with_system(request)]
    text = render_chat_template(
        chat_template, messages, bos_token=bos_token, eos_token=eos_token, enable_thinking=enable_thinking
    )
    return Prompt(text, stops)


def check_request(fmt: str, request: GenerationRequest) -> None:
    """Admission-time checks that need no model (raise 400 before the queue)."""
    if fmt == "translategemma_template":
        for key in ("source_lang_code", "target_lang_code"):
            if not getattr(request, key):
                raise invalid_request(
                    f"translategemma models need source_lang_code and target_lang_code; {key} is missing",
                    param=key,
                    model=request.model,
                )
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


class StopMatcher:
    """Cuts a text stream at the first stop string, never emitting part of one.

    ``push`` returns the text that is safe to emit now and whether a stop string was hit; text
    that could still become a stop string is held back until it can't (or ``flush`` at the end).
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


class PromptPrep:
    """A local backend's prompt step: render a job's prompt for the model's prompt format (with
    the model's chat template and special tokens, once :meth:`set_model` read them), note an
    ignored ``beam_size`` once, and (:meth:`prepare`) tokenize and length-check it."""

    def __init__(self, model: ModelSettings, *, backend: str) -> None:
        self.model = model
        self.backend = backend
        self.chat_template: str | None = None
        self.bos = ""
        self.eos = ""
        self._beam_warned = False

    def set_model(self, chat_template: str | None, bos: str, eos: str) -> None:
        self.chat_template, self.bos, self.eos = chat_template, bos, eos

    def render(self, request: GenerationRequest) -> Prompt:
        if request.decoding.beam_size > 1 and not self._beam_warned:
            log.info("beam_size is not supported by the %s backend; decoding without beams", self.backend)
            self._beam_warned = True
        return render_prompt(
            self.model.prompt_format,
            request,
            chat_template=self.chat_template,
            bos_token=self.bos,
            eos_token=self.eos,
            enable_thinking=self.model.enable_thinking,
        )

    def prepare(self, job: Job, tokenize: Callable[[bytes], list[int]], n_ctx: int) -> tuple[list[int], StopMatcher]:
        """The job's prompt tokens and its stop matcher (the format's stops and the request's);
        raises the 400 of :func:`check_prompt_length` for a prompt that does not fit ``n_ctx``."""
        req = job.request
        prompt = self.render(req)
        tokens = tokenize(prompt.text.encode("utf-8"))
        check_prompt_length(req.model, len(tokens), n_ctx)
        return tokens, StopMatcher([*prompt.stop, *req.decoding.stop])
