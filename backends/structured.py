"""Structured output and tool calling for the runtimes that render prompts here (issue 16).

Three pieces, shared by every llama.cpp-based backend (in-process, batched, ``llama_server``):

* **Grammars.**  :func:`output_grammar` turns a request's ``response_format`` or forced tool call
  into a llama.cpp grammar (GBNF), with llama-cpp-python's port of llama.cpp's
  ``json_schema_to_grammar`` (pure Python: it runs at admission, so a schema it cannot take is a
  400 before the queue).  ``json_object`` is llama.cpp's JSON grammar (an object at the root).
  Schemas are bounded (:data:`MAX_SCHEMA_BYTES`, :data:`MAX_SCHEMA_DEPTH`) before conversion.
* **The tool-call convention**: Hermes / Qwen's ``<tool_call>{"name": ..., "arguments": ...}
  </tool_call>``, which Qwen2.5/Qwen3 and Hermes models are trained on and whose system prompt
  the ChatML formats render (:mod:`backends.prompts`).  A forced call (``tool_choice``
  ``required`` or a named function) is a grammar for exactly one such block.
* **Parsing**: :class:`ToolCallSplitter` takes the generated text (whole, or as a stream) and
  separates the answer's content from its ``<tool_call>`` blocks, holding back any text that
  could start one.  A block that is not a valid call leaves the text as content, never a call
  invented from it.

Nothing here touches a runtime: ``llama_cpp.llama_grammar`` is pure Python, imported lazily.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from llm_pool.pool.errors import invalid_request, response_format_unsupported, tools_unsupported
from llm_pool.pool.jobs import GenerationRequest, ToolCall, ToolSpec

#: Largest schema (as compact JSON) a request may send: the grammar and its conversion grow with it.
MAX_SCHEMA_BYTES = 64 * 1024
#: Deepest nesting of objects and arrays in a schema (the converter recurses over it).
MAX_SCHEMA_DEPTH = 32
#: Most repetitions one bound may ask for (``maxLength``, ``maxItems``..., a pattern's ``{m,n}``):
#: llama.cpp's converter writes each bounded repetition out in full, so ``maxLength: 10**9``
#: would be a grammar of gigabytes.
MAX_REPEAT = 1000
#: Most repetitions a whole schema may ask for, all bounds together (keeps the grammar < ~1 MB).
MAX_REPEAT_TOTAL = 20_000
#: Largest grammar handed to a runtime (a last guard; the bounds above keep grammars far smaller).
MAX_GRAMMAR_BYTES = 2 * 1024 * 1024
_REPEAT_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
#: JSON schema ``type`` names (a schema naming another cannot be enforced).
JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.S)


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d <= MAX_SCHEMA_DEPTH:
                stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def check_schema(schema: Any, where: str) -> None:
    """400 naming ``where`` (a path, ``param`` is ``$.<where>``) for a schema that is not a JSON
    object, too big or too deep, or names a ``type`` JSON has not."""
    param = "$." + where
    if not isinstance(schema, dict):
        raise invalid_request(f"{where} must be a JSON schema object", param=param)
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise invalid_request(f"{where} is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES} are accepted", param=param)
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise invalid_request(f"{where} is nested more than {MAX_SCHEMA_DEPTH} levels deep", param=param)
    stack: list[Any] = [schema]
    total = 0
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            t = v.get("type")
            for name in t if isinstance(t, list) else [t]:
                if name is not None and (not isinstance(name, str) or name not in JSON_TYPES):
                    raise invalid_request(f"{where} has a type {name!r} that JSON does not have", param=param)
            # (key, how to name the count, the count): floats too, the converter takes 1e9 as well
            counts = [
                (k, f"{v[k]:g}" if isinstance(v[k], float) else str(v[k]), min(v[k], MAX_REPEAT_TOTAL + 1))
                for k in _REPEAT_KEYS
                if isinstance(v.get(k), int | float) and not isinstance(v.get(k), bool) and v[k] == v[k]
            ]
            if isinstance(v.get("pattern"), str):
                product = 1
                for low, high in _QUANTIFIER.findall(v["pattern"]):
                    product *= max(int(low), int(high or 0), 1)  # nested or not: counted as nested
                    product = min(product, MAX_REPEAT + 1)
                counts.append(("pattern", f"more than {MAX_REPEAT}", product))
            for key, shown, n in counts:
                if n > MAX_REPEAT:
                    raise invalid_request(
                        f"{where} asks for {shown} repetitions ({key}); at most {MAX_REPEAT} can be enforced",
                        param=param,
                    )
                total += int(n)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    if total > MAX_REPEAT_TOTAL:
        raise invalid_request(
            f"{where} asks for {total} repetitions in all (length, item and pattern bounds); at most {MAX_REPEAT_TOTAL}"
            " can be enforced",
            param=param,
        )


def schema_grammar(schema: dict[str, Any], where: str) -> str:
    """The GBNF grammar of ``schema`` (root rule ``root``), or a 400 naming ``where``."""
    check_schema(schema, where)
    param = "$." + where
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except RecursionError:
        raise invalid_request(f"{where} refers to itself too deeply to become a grammar", param=param) from None
    except Exception as e:  # the converter asserts and raises freely on schemas it cannot take
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise invalid_request(f"{where} cannot be enforced as a grammar: {reason}", param=param) from None
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise invalid_request(f"{where} gives a grammar of {len(grammar)} bytes; at most {MAX_GRAMMAR_BYTES} are enforced", param=param)
    return grammar


def json_object_grammar() -> str:
    """llama.cpp's JSON grammar: one JSON object."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def tool_call_grammar(tools: list[ToolSpec], name: str | None) -> str:
    """A grammar for exactly one ``<tool_call>`` block calling ``name`` (any of ``tools`` when
    None), its arguments matching the function's ``parameters`` schema."""
    chosen = [t for t in tools if name is None or t.name == name]
    schemas = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    body = re.sub(r"^root ::=", "llmpool-tool-call ::=", schema_grammar(schema, "tools"), count=1, flags=re.M)
    return body + f'\nroot ::= "{TOOL_CALL_OPEN}\\n" llmpool-tool-call "\\n{TOOL_CALL_CLOSE}"\n'


def forces_call(request: GenerationRequest) -> bool:
    return bool(request.tools) and (request.tool_choice == "required" or request.tool_name is not None)


def offers_tools(request: GenerationRequest) -> bool:
    """Whether the model is shown ``tools`` (any, and ``tool_choice`` is not ``none``)."""
    return bool(request.tools) and request.tool_choice != "none"


def output_grammar(request: GenerationRequest) -> str | None:
    """The grammar a local runtime enforces for ``request``; None: free text.  A forced call
    wins; ``response_format`` with tools the model may call or not (``auto``) is a 400: one
    grammar cannot leave the choice to the model and still bind both answers."""
    if forces_call(request):
        return tool_call_grammar(request.tools, request.tool_name)
    rf = request.response_format
    if rf is None:
        return None
    if offers_tools(request):
        raise invalid_request(
            "response_format with tools needs tool_choice 'none', 'required' or a named function on this model",
            param="$.tool_choice",
            model=request.model,
        )
    if rf.type == "json_object" or rf.schema is None:
        return json_object_grammar()
    return schema_grammar(rf.schema, "response_format.json_schema.schema")


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_json(tool: ToolSpec) -> str:
    """A tool as the Hermes system prompt lists it (OpenAI's ``{"type": "function", ...}``)."""
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    function["parameters"] = tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
    return json.dumps({"type": "function", "function": function}, ensure_ascii=False)


def arguments_value(arguments: str) -> Any:
    """A call's ``arguments`` text as the JSON value a template shows (the text itself if it
    is not JSON)."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def call_json(call: ToolCall) -> str:
    """An earlier call as the model wrote it inside ``<tool_call>``."""
    return json.dumps({"name": call.name, "arguments": arguments_value(call.arguments)}, ensure_ascii=False)


def _parse_call(text: str) -> ToolCall | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(id=new_call_id(), name=obj["name"], arguments=json.dumps(args, ensure_ascii=False))


class ToolCallSplitter:
    """Separates an answer's content from its ``<tool_call>`` blocks, as a stream.

    :meth:`push` returns the content safe to show now: text before the first ``<tool_call>``,
    minus a tail that could still begin one; :meth:`finish` returns the rest of the content
    and the calls.  If any block is not a valid call (``{"name": str, "arguments": object}``),
    everything from the first block on is content and there are no calls."""

    def __init__(self) -> None:
        self._pending = ""  # content not shown yet: trailing whitespace, or a possible TOOL_CALL_OPEN start
        self._calls: str | None = None  # everything from the first TOOL_CALL_OPEN on
        self._shown = False

    def push(self, text: str) -> str:
        if self._calls is not None:
            self._calls += text
            return ""
        self._pending += text
        at = self._pending.find(TOOL_CALL_OPEN)
        if at >= 0:
            out, self._calls = self._pending[:at], self._pending[at:]
            body = out.rstrip()
            self._pending = out[len(body) :]  # given back only if the blocks are not calls
            return self._show(body)
        hold = 0
        for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self._pending)), 0, -1):
            if self._pending.endswith(TOOL_CALL_OPEN[:k]):
                hold = k
                break
        cut = len(self._pending) - hold
        body = self._pending[:cut].rstrip()  # trailing whitespace waits: a call may follow
        out, self._pending = body, self._pending[len(body) :]
        return self._show(out)

    def _show(self, text: str) -> str:
        if not self._shown:
            text = text.lstrip()
        self._shown = self._shown or bool(text)
        return text

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not returned yet, and the calls (none if any block is not a call)."""
        rest, self._pending = self._pending, ""
        if self._calls is None:
            return self._show(rest), []
        calls_text, self._calls = self._calls, None
        calls = [_parse_call(m.group(1)) for m in _CALL.finditer(calls_text)]
        if calls and all(c is not None for c in calls):
            return "", [c for c in calls if c is not None]
        return self._show(rest + calls_text), []

    @property
    def shown(self) -> bool:
        """Whether any content was returned."""
        return self._shown


def split_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A whole answer's content (stripped) and its calls."""
    splitter = ToolCallSplitter()
    content = splitter.push(text)
    rest, calls = splitter.finish()
    return (content + rest).strip(), calls


def check_tool_request(request: GenerationRequest) -> None:
    """400 for a ``tool_name`` that is not among the tools, and for schemas that cannot be used."""
    names = [t.name for t in request.tools]
    if request.tool_name is not None and request.tool_name not in names:
        raise invalid_request(
            f"tool_choice names function {request.tool_name!r}, which is not in tools", param="$.tool_choice"
        )
    for i, t in enumerate(request.tools):
        if t.parameters is not None:
            check_schema(t.parameters, f"tools[{i}].function.parameters")



def admit(kind: Any, request: GenerationRequest) -> None:
    """Admission for ``request`` on a model of ``kind`` (a :class:`~backends.base.BackendKind`):
    400 ``response_format_unsupported`` / ``tools_unsupported`` where the runtime cannot honour
    them, 400 for schemas it cannot use; and, for a runtime that enforces grammars here, the
    request's :attr:`~pool.jobs.GenerationRequest.grammar`."""
    rf = request.response_format
    given = rf.type if rf is not None else "text"
    if given not in kind.response_formats:
        raise response_format_unsupported(request.model, given, kind.response_formats, kind.name)
    if offers_tools(request) and not kind.tools:
        raise tools_unsupported(request.model, f"the {kind.name} runtime cannot constrain or parse calls")
    check_tool_request(request)
    if rf is not None and rf.schema is not None:
        check_schema(rf.schema, "response_format.json_schema.schema")
    if not kind.remote:
        request.grammar = output_grammar(request)
