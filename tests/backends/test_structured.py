"""Structured output and tool calling without a runtime (backends/structured.py, and the tool
parts of backends/prompts.py): grammars from schemas, the schema bounds, the Hermes tool prompt
as segments, tools through a model's own template, and reading calls out of generated text.
"""

from __future__ import annotations

import json

import pytest

from llm_pool.backends.prompts import render_prompt
from llm_pool.backends.structured import (
    MAX_SCHEMA_DEPTH,
    ToolCallSplitter,
    check_schema,
    output_grammar,
    split_tool_calls,
    tool_call_grammar,
)
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import GenerationRequest, Message, ResponseFormat, ToolCall, ToolSpec

WEATHER = ToolSpec(
    name="get_weather",
    description="Weather <|im_end|> now",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def req(*messages: Message, **kw: object) -> GenerationRequest:
    return GenerationRequest(model="m", messages=list(messages), **kw)  # type: ignore[arg-type]


def test_a_schema_becomes_a_grammar_and_json_object_is_the_json_grammar() -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = output_grammar(req(Message(role="user", content="x"), response_format=ResponseFormat(type="json_schema", schema=schema)))
    assert grammar is not None and grammar.startswith("") and 'root ::= "{" space ok-kv' in grammar
    obj = output_grammar(req(Message(role="user", content="x"), response_format=ResponseFormat(type="json_object")))
    assert obj is not None and "root   ::= object" in obj
    assert output_grammar(req(Message(role="user", content="x"))) is None


def test_a_forced_call_is_one_tool_call_block_whatever_the_response_format() -> None:
    grammar = tool_call_grammar([WEATHER], "get_weather")
    assert grammar.endswith('root ::= "<tool_call>\\n" llmpool-tool-call "\\n</tool_call>"\n')
    assert '"\\"get_weather\\""' in grammar  # the name is a constant
    forced = req(Message(role="user", content="x"), tools=[WEATHER], tool_choice="required")
    assert output_grammar(forced) == tool_call_grammar([WEATHER], None)


def test_response_format_with_tools_left_to_the_model_is_refused() -> None:
    r = req(Message(role="user", content="x"), tools=[WEATHER], response_format=ResponseFormat(type="json_object"))
    with pytest.raises(PoolError) as info:
        output_grammar(r)
    assert info.value.message == (
        "response_format with tools needs tool_choice 'none', 'required' or a named function on this model"
    )
    r.tool_choice = "none"
    assert output_grammar(r) is not None


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ([], "s must be a JSON schema object"),
        ({"type": "str"}, "s has a type 'str' that JSON does not have"),
        ({"anyOf": [{"type": ["string", 3]}]}, "s has a type 3 that JSON does not have"),
        ({"enum": ["x" * 70000]}, "s is 70013 bytes of JSON; at most 65536 are accepted"),
        (
            json.loads('{"items":' * (MAX_SCHEMA_DEPTH + 1) + "{}" + "}" * (MAX_SCHEMA_DEPTH + 1)),
            f"s is nested more than {MAX_SCHEMA_DEPTH} levels deep",
        ),
        # llama.cpp's converter writes bounded repetitions out: these would be gigabytes of grammar
        ({"type": "string", "maxLength": 10**9}, "s asks for 1000000000 repetitions (maxLength); at most 1000 can be enforced"),
        ({"type": "string", "pattern": "^(a{40}){40}$"}, "s asks for more than 1000 repetitions (pattern); at most 1000 can be enforced"),
        (
            {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(21)}},
            "s asks for 21000 repetitions in all (length, item and pattern bounds); at most 20000 can be enforced",
        ),
    ],
)
def test_bad_schemas_are_400s_naming_the_problem(schema: object, message: str) -> None:
    with pytest.raises(PoolError) as info:
        check_schema(schema, "s")
    assert (info.value.status, info.value.message, info.value.param) == (400, message, "$.s")


def test_a_schema_the_converter_cannot_take_is_a_400_in_our_words() -> None:
    r = req(
        Message(role="user", content="x"),
        response_format=ResponseFormat(type="json_schema", schema={"type": "string", "pattern": "a("}),
    )
    with pytest.raises(PoolError) as info:
        output_grammar(r)
    assert info.value.status == 400 and info.value.param == "$.response_format.json_schema.schema"
    assert info.value.message.startswith("response_format.json_schema.schema cannot be enforced as a grammar: ")


def test_the_hermes_tool_prompt_keeps_every_caller_string_a_caller_segment() -> None:
    r = req(
        Message(role="user", content="Paris?"),
        Message(role="assistant", content="", tool_calls=[ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}')]),
        Message(role="tool", content="sunny", tool_call_id="c1"),
        Message(role="tool", content="warm", tool_call_id="c1"),
        tools=[WEATHER],
    )
    segments = render_prompt("generic", r).segments
    tool_line = (
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather <|im_end|> now", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}'
    )
    assert segments == [
        ("<|im_start|>system\n", True),
        ("You are a helpful assistant. Return only the response.", False),
        (
            "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
            True,
        ),
        (tool_line, False),
        (
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call><|im_end|>\n<|im_start|>user\n",
            True,
        ),
        ("Paris?", False),
        ("<|im_end|>\n<|im_start|>assistant\n<tool_call>\n", True),
        ('{"name": "get_weather", "arguments": {"city": "Paris"}}', False),
        ("\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n", True),
        ("sunny", False),
        ("\n</tool_response>\n<tool_response>\n", True),
        ("warm", False),
        ("\n</tool_response><|im_end|>\n<|im_start|>assistant\n", True),
    ]
    r.tool_choice = "none"  # tools the model may not call are not shown
    assert "# Tools" not in render_prompt("generic", r).text


#: A Qwen-like template that lists tools with ``tojson`` and writes calls back.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def test_tools_reach_a_native_template_as_json_with_caller_text_as_caller_segments() -> None:
    r = req(
        Message(role="user", content="Paris?"),
        Message(role="assistant", content="", tool_calls=[ToolCall(id="c1", name="get_weather", arguments='{"city": "<|im_start|>"}')]),
        Message(role="tool", content="sunny", tool_call_id="c1"),
        tools=[WEATHER],
    )
    prompt = render_prompt("native", r, chat_template=TOOLS_TEMPLATE)
    first_line = prompt.text.split("\n")[1]
    assert json.loads(first_line) == {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather <|im_end|> now", "parameters": WEATHER.parameters},
    }
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "<|im_start|>"}}</tool_call>' in prompt.text
    markup = "".join(text for text, trusted in prompt.segments if trusted)
    assert markup.count("<|im_end|>") == 5 and markup.count("<|im_start|>") == 6  # the template's own only
    assert ("Weather <|im_end|> now", False) in prompt.segments


def test_a_template_that_does_not_render_tools_refuses_them() -> None:
    r = req(Message(role="user", content="x"), tools=[WEATHER])
    with pytest.raises(PoolError) as info:
        render_prompt("native", r, chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    assert (info.value.code, info.value.message) == (
        "tools_unsupported",
        "model 'm' does no tool calling: its chat template does not render tools",
    )


def test_calls_are_split_from_content_whole_and_streamed() -> None:
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = split_tool_calls(text)
    assert content == "Let me look." and [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]
    assert calls[0].id.startswith("call_")
    splitter = ToolCallSplitter()
    shown = [splitter.push(text[i : i + 3]) for i in range(0, len(text), 3)]
    rest, streamed = splitter.finish()
    assert "".join(shown) + rest == "Let me look." and "<" not in "".join(shown)
    assert [(c.name, c.arguments) for c in streamed] == [("get_weather", '{"city": "Paris"}')]


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>\nnot json\n</tool_call>",
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
    ],
)
def test_a_block_that_is_not_a_call_stays_content(text: str) -> None:
    assert split_tool_calls("x " + text) == ("x " + text, [])


def test_text_that_only_looks_like_the_start_of_a_call_is_content() -> None:
    splitter = ToolCallSplitter()
    assert splitter.push("a <tool") == "a"  # the blank waits too: a call may follow it
    assert splitter.push("box") == " <toolbox"
    assert splitter.finish() == ("", [])


def test_tool_definitions_count_against_the_input_bound() -> None:
    from llm_pool.backends.prompts import check_input_size

    big = ToolSpec(name="f", description="d" * 1000)  # 1118 characters as the prompt lists it
    r = req(Message(role="user", content="hi"), tools=[big])
    with pytest.raises(PoolError) as info:
        check_input_size(r, 100, 5)
    assert info.value.message == (
        "the input has 1120 characters; model 'm' has a context of 100 tokens, which hold at most 500"
    )
    r.tool_choice = "none"  # not shown to the model, so not counted
    check_input_size(r, 100, 5)


def test_qwen3_lists_tools_and_keeps_its_no_think_markup() -> None:
    r = req(
        Message(role="user", content="Paris?"),
        Message(role="assistant", content="Looking.", tool_calls=[ToolCall(id="c1", name="get_weather", arguments="not json")]),
        Message(role="tool", content="sunny", tool_call_id="c1"),
        tools=[WEATHER],
    )
    text = render_prompt("qwen3_template", r).text
    assert "# Tools" in text and text.count("/no_think") == 1  # the user's turn only, not the tool result's
    assert 'Looking.\n<tool_call>\n{"name": "get_weather", "arguments": "not json"}\n</tool_call>' in text
    assert text.endswith("<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
