"""The official ``openai`` Python SDK against a real pool server (issue 7, "OpenAI
compatibility"): chat completions and responses, streamed and not, models, errors, and the pool's
extensions through ``extra_body``.

The SDK's sync client runs on a worker thread (see ``conftest.py``); each test's SDK work is one
blocking function handed to :func:`openai_kit.in_thread`.
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseIncompleteEvent,
    ResponseInProgressEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseOutputMessage,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from openai_kit import BOUND, in_thread
from support.fake_backend import FakeBackendFactory
from support.replies import METRIC_KEYS

CHAT_ID = re.compile(r"^chatcmpl-[0-9a-f]{32}$")
RESP_ID = re.compile(r"^resp_[0-9a-f]{32}$")


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------ GET /v1/models
async def test_models_list(client: openai.OpenAI) -> None:
    page = await in_thread(client.models.list)
    assert [(m.id, m.object, m.owned_by) for m in page.data] == [("m", "model", "llm-pool"), ("r", "model", "llm-pool")]
    assert all(isinstance(m.created, int) and m.created > 1_600_000_000 for m in page.data)
    # the same body still has llm-pool's own shape
    raw = await in_thread(lambda: client.models.with_raw_response.list().http_response.json())
    assert raw["models"] == ["m", "r"] and raw["object"] == "list"


async def test_models_retrieve(client: openai.OpenAI, server: str) -> None:
    m = await in_thread(lambda: client.models.retrieve("m"))
    assert (m.id, m.object, m.owned_by) == ("m", "model", "llm-pool")
    listed = {c.id: c for c in (await in_thread(client.models.list)).data}
    assert m == listed["m"]  # the same card as the list's
    with pytest.raises(openai.NotFoundError) as info:
        await in_thread(lambda: client.models.retrieve("nope"))
    assert (info.value.code, info.value.body["message"]) == ("unknown_model", "unknown model 'nope'")
    # a configured model that is not loaded is not listed, and not retrievable either
    async with httpx.AsyncClient(base_url=server, timeout=BOUND) as http:
        r = await http.post("/v1/admin/models/m/unload", json={})
        assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError) as info:
        await in_thread(lambda: client.models.retrieve("m"))
    assert info.value.code == "not_found"
    assert info.value.body["message"] == "model 'm' is unloaded, not loaded (GET /v1/models lists the loaded models)"


# ------------------------------------------------------------------ chat completions
async def test_chat_completion(client: openai.OpenAI, control: FakeBackendFactory) -> None:
    c = await in_thread(
        lambda: client.chat.completions.create(
            model="m",
            messages=[{"role": "system", "content": "Be brief."}, *user("The capital of France")],
            temperature=0.5,
            top_p=0.9,
            max_tokens=64,
            stop=["\n\n"],
            user="someone",  # accepted and ignored
            seed=7,
            extra_body={"top_k": 40, "repetition_penalty": 1.1},
        )
    )
    assert isinstance(c, ChatCompletion)
    assert CHAT_ID.match(c.id) and c.object == "chat.completion" and c.model == "m"
    assert abs(c.created - time.time()) < 60
    [choice] = c.choices
    assert (choice.index, choice.message.role, choice.message.content) == (0, "assistant", "The capital of France")
    assert choice.finish_reason == "stop"
    assert c.usage is not None
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (4, 4, 8)
    metrics = (c.model_extra or {})["metrics"]  # llm-pool's extra field survives the SDK
    assert METRIC_KEYS <= set(metrics) and metrics["engine_output_tokens"] == 4
    seen = control.seen[-1]
    assert [(m.role, m.content) for m in seen.messages] == [("system", "Be brief."), ("user", "The capital of France")]
    d = seen.decoding
    assert (d.temperature, d.top_p, d.max_tokens, d.stop, d.top_k, d.repetition_penalty) == (
        0.5,
        0.9,
        64,
        ["\n\n"],
        40,
        1.1,
    )


async def test_chat_completion_cut_at_max_tokens_is_length(client: openai.OpenAI) -> None:
    c = await in_thread(
        lambda: client.chat.completions.create(model="m", messages=user("one two three four"), max_completion_tokens=2)
    )
    assert c.choices[0].message.content == "one two"
    assert c.choices[0].finish_reason == "length"


async def test_chat_completion_stream_with_usage(client: openai.OpenAI, control: FakeBackendFactory) -> None:
    control.configure(token_delay=0.05)

    def run() -> list[tuple[float, ChatCompletionChunk]]:
        t0 = time.monotonic()
        stream = client.chat.completions.create(
            model="m", messages=user("a b c d e"), stream=True, stream_options={"include_usage": True}
        )
        with stream:
            return [(time.monotonic() - t0, chunk) for chunk in stream]

    arrivals = await in_thread(run)
    chunks = [c for _, c in arrivals]
    assert all(isinstance(c, ChatCompletionChunk) and c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and CHAT_ID.match(chunks[0].id)
    first, *deltas, last, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert [d.choices[0].delta.content for d in deltas] == ["a", " b", " c", " d", " e"]
    assert all(d.choices[0].finish_reason is None for d in [first, *deltas])
    assert last.choices[0].finish_reason == "stop" and last.choices[0].delta.content is None
    assert METRIC_KEYS <= set((last.model_extra or {})["metrics"])
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens, usage.usage.total_tokens) == (5, 5, 10)
    # true streaming: the first word reached the SDK well before the last one was generated
    assert arrivals[1][0] < arrivals[-2][0] - 0.15


async def test_chat_stream_helper_and_final_completion(client: openai.OpenAI) -> None:
    def run() -> Any:
        with client.chat.completions.stream(model="m", messages=user("hello there")) as stream:
            kinds = [event.type for event in stream]
            return kinds, stream.get_final_completion()

    kinds, final = await in_thread(run)
    assert "content.done" in kinds
    assert final.choices[0].message.content == "hello there" and final.choices[0].finish_reason == "stop"


async def test_chat_stream_failure_raises_api_error(client: openai.OpenAI) -> None:
    def run() -> tuple[list[str | None], openai.APIError]:
        seen: list[str | None] = []
        stream = client.chat.completions.create(model="m", messages=user("fail"), stream=True)
        with stream, pytest.raises(openai.APIError) as info:
            for chunk in stream:
                seen.append(chunk.choices[0].delta.content)
        return seen, info.value

    seen, error = await in_thread(run)
    assert seen == ["", "partial"]
    assert error.message == "model 'm' failed: RuntimeError: fake backend exploded"
    assert (error.code, error.type) == ("backend_error", "server_error")


async def test_closing_a_stream_cancels_the_job_and_frees_the_replica(
    client: openai.OpenAI, control: FakeBackendFactory
) -> None:
    control.configure(token_delay=0.05)
    words = " ".join(f"w{i}" for i in range(100))  # 5 s if it ran to the end

    def run() -> tuple[str | None, float]:
        stream = client.chat.completions.create(model="m", messages=user(words), stream=True)
        with stream:
            for chunk in stream:
                if chunk.choices[0].delta.content:
                    break  # leave mid-stream: the SDK closes the connection
        assert control.job_ended.wait(10.0), "the job did not end"
        assert control.cancelled == [words], "the job was not cancelled"
        t0 = time.monotonic()
        c = client.chat.completions.create(model="m", messages=user("next"))
        return c.choices[0].message.content, time.monotonic() - t0

    content, took = await in_thread(run)
    assert content == "next" and took < 2.5  # the one replica was free again: not after the 5 s stream
    assert words not in control.finished


async def test_multi_turn_chat(client: openai.OpenAI, control: FakeBackendFactory) -> None:
    conversation: list[Any] = user("first question")
    c = await in_thread(lambda: client.chat.completions.create(model="m", messages=conversation))
    conversation += [c.choices[0].message, *user("second question")]  # the SDK's own message object sent back
    c = await in_thread(lambda: client.chat.completions.create(model="m", messages=conversation))
    assert c.choices[0].message.content == "second question"
    assert [(m.role, m.content) for m in control.seen[-1].messages] == [
        ("user", "first question"),
        ("assistant", "first question"),
        ("user", "second question"),
    ]


# ------------------------------------------------------------------ responses
async def test_responses_create(client: openai.OpenAI, control: FakeBackendFactory) -> None:
    r = await in_thread(lambda: client.responses.create(model="m", input="Hello there world", instructions="Be brief."))
    assert isinstance(r, Response)
    assert RESP_ID.match(r.id) and r.object == "response" and r.model == "m" and r.status == "completed"
    assert r.output_text == "Hello there world"  # the SDK's property, computed from r.output
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (3, 3, 6)
    assert METRIC_KEYS <= set((r.model_extra or {})["metrics"])
    assert [(m.role, m.content) for m in control.seen[-1].messages] == [
        ("system", "Be brief."),
        ("user", "Hello there world"),
    ]


async def test_responses_conversation_as_the_sdk_sends_it(client: openai.OpenAI, control: FakeBackendFactory) -> None:
    first = await in_thread(lambda: client.responses.create(model="m", input=[{"role": "user", "content": "Hello there"}]))
    # the SDK's way to continue: the earlier output items go back in, then the next user turn
    history: list[Any] = [{"role": "user", "content": "Hello there"}, *[o.model_dump() for o in first.output]]
    second = await in_thread(
        lambda: client.responses.create(model="m", input=[*history, {"role": "user", "content": "again"}])
    )
    assert second.status == "completed"
    assert [(m.role, m.content) for m in control.seen[-1].messages] == [
        ("user", "Hello there"),
        ("assistant", first.output_text),
        ("user", "again"),
    ]


async def test_responses_stream(client: openai.OpenAI) -> None:
    def run() -> list[Any]:
        with client.responses.create(model="m", input="one two three", stream=True) as stream:
            return list(stream)

    events = await in_thread(run)
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.metrics",  # llm-pool's own event; the SDK hands it over untyped
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, in_progress, item_added, part_added, *deltas, text_done, part_done, item_done, _, completed = events
    assert isinstance(created, ResponseCreatedEvent) and isinstance(in_progress, ResponseInProgressEvent)
    assert created.response.status == "in_progress" and RESP_ID.match(created.response.id)
    assert isinstance(item_added, ResponseOutputItemAddedEvent) and item_added.item.type == "message"
    assert isinstance(part_added, ResponseContentPartAddedEvent)
    assert all(isinstance(d, ResponseTextDeltaEvent) for d in deltas)
    assert [d.delta for d in deltas] == ["one", " two", " three"]
    item_id = item_added.item.id
    assert {(d.item_id, d.output_index, d.content_index) for d in deltas} == {(item_id, 0, 0)}
    assert isinstance(text_done, ResponseTextDoneEvent) and text_done.text == "one two three"
    assert isinstance(part_done, ResponseContentPartDoneEvent)
    assert isinstance(item_done, ResponseOutputItemDoneEvent) and isinstance(item_done.item, ResponseOutputMessage)
    assert item_done.item.status == "completed" and item_done.item.id == item_id
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.id == created.response.id
    assert completed.response.output_text == "one two three"
    assert (completed.model_extra or {})["output_text"] == "one two three"  # llm-pool's field, kept


async def test_responses_stream_cut_by_max_tokens_ends_incomplete(client: openai.OpenAI) -> None:
    """As OpenAI's own stream: a response cut by its token limit ends with
    ``response.incomplete``, not ``response.completed``."""

    def run() -> list[Any]:
        extra = {"decoding": {"max_tokens": 2}}
        with client.responses.create(model="m", input="one two three", stream=True, extra_body=extra) as stream:
            return list(stream)

    events = await in_thread(run)
    assert [e.type for e in events][-2:] == ["response.metrics", "response.incomplete"]
    last = events[-1]
    assert isinstance(last, ResponseIncompleteEvent)
    assert (last.response.status, last.response.output_text) == ("incomplete", "one two")
    assert last.response.incomplete_details is not None and last.response.incomplete_details.reason == "max_output_tokens"


async def test_responses_stream_helper_final_response(client: openai.OpenAI) -> None:
    def run() -> Response:
        with client.responses.stream(model="m", input="a b c") as stream:
            for _ in stream:
                pass
            return stream.get_final_response()

    final = await in_thread(run)
    assert final.output_text == "a b c" and final.status == "completed"


# ------------------------------------------------------------------ errors
async def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await in_thread(lambda: client.chat.completions.create(model="nope", messages=user("x")))
    e = info.value
    assert (e.status_code, e.code, e.param, e.type) == (404, "unknown_model", "model", "not_found_error")
    # our words are the body's; the SDK's own text around them is the SDK's, not asserted
    assert e.body["message"] == "unknown model 'nope'"
    with pytest.raises(openai.NotFoundError) as info:
        await in_thread(lambda: client.responses.create(model="nope", input="x"))
    assert info.value.body["message"] == "unknown model 'nope'"


async def test_bad_requests_are_bad_request_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(lambda: client.chat.completions.create(model="m", messages=user("x"), n=17))
    assert info.value.body["message"] == "invalid request body: $.n: expected an integer from 1 to 16 or null"
    assert (info.value.code, info.value.param) == ("invalid_request", "$.n")
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(
            lambda: client.chat.completions.create(model="m", messages=user("x"), extra_body={"best_of": 3})
        )
    assert info.value.body["message"] == "invalid request body: $.best_of: unknown field"
    assert info.value.param == "$.best_of"
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(
            lambda: client.chat.completions.create(
                model="m",
                messages=user("x"),
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            )
        )
    assert info.value.body["message"] == "tool_choice names function 'g', which is not in tools"


# ------------------------------------------------------------------ allow_remote (extra_body)
async def test_allow_remote_through_extra_body(client: openai.OpenAI, control: FakeBackendFactory) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        await in_thread(lambda: client.chat.completions.create(model="r", messages=user("hi remote")))
    assert (info.value.status_code, info.value.code, info.value.param) == (
        403,
        "remote_execution_disallowed",
        "allow_remote",
    )
    assert control.seen == []  # refused before any backend saw it
    with pytest.raises(openai.PermissionDeniedError):
        await in_thread(lambda: client.responses.create(model="r", input="hi remote"))

    c = await in_thread(
        lambda: client.chat.completions.create(model="r", messages=user("hi remote"), extra_body={"allow_remote": True})
    )
    assert c.choices[0].message.content == "hi remote"
    r = await in_thread(lambda: client.responses.create(model="r", input="hi again", extra_body={"allow_remote": True}))
    assert r.output_text == "hi again"
    assert [(s.model, s.input) for s in control.seen] == [("r", "hi remote"), ("r", "hi again")]


# ------------------------------------------------------------------ conversations, images, capabilities (issue 16)
async def test_sdk_conversations_images_and_capabilities(client: openai.OpenAI, control: FakeBackendFactory) -> None:
    """A Responses conversation through ``extra_body``, content items as ``input``, an image on a
    text-only model (``modality_unsupported``, which the SDK raises as BadRequestError), and the
    capabilities the SDK keeps on each model card."""
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}]

    def calls() -> tuple[Response, Response, openai.BadRequestError, dict[str, Any]]:
        chat = client.responses.create(model="m", instructions="Be brief.", extra_body={"messages": conversation}, input=openai.NOT_GIVEN)
        items = client.responses.create(model="m", input=[{"type": "input_text", "text": "two"}, {"type": "text", "text": "words"}])  # type: ignore[list-item]
        try:
            client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAAA"}}]}],
            )
        except openai.BadRequestError as e:
            refused = e
        card = client.models.retrieve("m")
        return chat, items, refused, card.model_extra or {}

    chat, items, refused, extra = await in_thread(calls)
    assert chat.output_text == "Again"  # the fake echoes the last user turn
    assert [m.role for m in control.seen[-2].messages] == ["system", "user", "assistant", "user"]
    assert items.output_text == "two\nwords"
    assert refused.code == "modality_unsupported" and refused.param == "$.messages[0].content[0].image_url.url"
    assert extra["capabilities"]["modalities"] == ["text"]
