"""Conversations, content arrays, images, thinking and capabilities on the inference routes
(issue 16 §1), through quart's in-memory client with the fake backend: what each request
becomes for the backend, and the 400 of each request a model cannot honour."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.replies import assert_error
from support.server import Pool, start_pool
from support.settings import make_settings
from trio.testing import MockClock

from llm_pool.config import SettingsError
from llm_pool.pool.jobs import ImagePart, Message

CHAT = "/v1/chat/completions"
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(40))).decode()
MODELS: dict[str, Any] = {
    "m": {},
    "q": {"prompt_format": "qwen3_template"},
    "tg": {"prompt_format": "translategemma_template"},
    "eye": {
        "backend": "openai_compatible",
        "model_path": None,
        "remote_base_url": "http://127.0.0.1:9/v1",
        "remote_model": "vision",
        "modalities": ["text", "image"],
    },
    "web": {
        "backend": "openai_compatible",
        "model_path": None,
        "remote_base_url": "http://127.0.0.1:9/v1",
        "remote_model": "vision",
        "modalities": ["text", "image"],
        "image_url_fetch": True,
    },
}


@pytest.fixture
async def pool(nursery: trio.Nursery, control: FakeBackendFactory) -> Pool:
    return await start_pool(nursery, control, models=MODELS)


async def test_a_conversation_reaches_the_backend_turn_by_turn(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    r = await pool.respond(
        {
            "model": "m",
            "instructions": "Be brief.",
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": [{"type": "text", "text": "How"}, {"type": "input_text", "text": "are you"}]},
            ],
        }
    )
    assert r.status == 200, r.json
    assert control.seen[-1].messages == [
        Message(role="system", content="Be brief."),
        Message(role="user", content="Hi"),
        Message(role="assistant", content="Hello"),
        Message(role="user", content="How\nare you"),  # text items joined with newlines
    ]


async def test_an_input_list_of_message_items_is_a_conversation(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    # what the official SDK sends: EasyInputMessage items, an earlier answer's output item sent back
    r = await pool.respond(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "Hi"},
                {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                 "content": [{"type": "output_text", "text": "Bonjour", "annotations": []}]},
                {"role": "user", "content": [{"type": "input_text", "text": "<|im_end|>How are you"}]},
            ],
        }
    )
    assert r.status == 200, r.json
    assert control.seen[-1].messages == [
        Message(role="system", content="Be brief.\n\nAnswer in French."),
        Message(role="user", content="Hi"),
        Message(role="assistant", content="Bonjour"),
        Message(role="user", content="<|im_end|>How are you"),
    ]


@pytest.mark.parametrize(
    ("items", "message", "param"),
    [
        ([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}],
         "input[1] is a system message after the conversation began; system and developer messages come first",
         "$.input[1].role"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
         "the last message must be a user message (llm-pool generates the next assistant turn)", "$.input[1].role"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}],
         'invalid request body: $.input[1].role: expected one of "assistant", "developer", "system", "user"',
         "$.input[1].role"),
        ([{"role": "user", "content": "x", "bogus": 1}], "invalid request body: $.input[0].bogus: unknown field", "$.input[0].bogus"),
        ([{"type": "text", "text": "x"}, {"role": "user", "content": "y"}],
         "invalid request body: $.input[1].type: required field is missing", "$.input[1].type"),
    ],
)
async def test_a_bad_input_list_is_a_400_naming_the_item(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, items: list[Any], message: str, param: str
) -> None:
    n = len(control.seen)
    assert_error(await pool.respond({"model": "m", "input": items}), 400, "invalid_request", message, param=param)
    assert len(control.seen) == n


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"input": "x", "messages": [{"role": "user", "content": "x"}]}, "send either input or messages, not both", "$.messages"),
        ({}, "the request needs input (or messages)", "$.input"),
        ({"messages": []}, "messages must hold at least one message", "$.messages"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
            "the last message must be a user message (llm-pool generates the next assistant turn)",
            "$.messages[1].role",
        ),
        ({"messages": [{"role": "user", "content": "a\u0000"}]}, "messages[0].content contains a NUL character", "$.messages[0].content"),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "input_image", "image_url": PNG}]}, {"role": "user", "content": "x"}]},
            "messages[0] is an assistant message with an image; images go in user messages",
            "$.messages[0].content",
        ),
        ({"input": [{"type": "text", "text": "\u0000"}]}, "input[0].text contains a NUL character", "$.input[0].text"),
    ],
)
async def test_a_conversation_that_cannot_be_answered_is_a_400(
    autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, body: dict[str, Any], message: str, param: str
) -> None:
    assert_error(await pool.respond({"model": "m", **body}), 400, "invalid_request", message, param=param)
    assert not control.seen


async def test_a_wrong_role_or_item_names_its_path(autojump_clock: MockClock, pool: Pool) -> None:
    r = await pool.respond({"model": "m", "messages": [{"role": "system", "content": "x"}]})
    assert_error(r, 400, "invalid_request", 'invalid request body: $.messages[0].role: expected one of "assistant", "user"', param="$.messages[0].role")
    r = await pool.respond({"model": "m", "input": [{"type": "input_file", "file_id": "f"}]})
    assert r.json["error"]["param"] == "$.input[0].type"


# ------------------------------------------------------------------ images
@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}, "$.input[1].image_url.url"),
        ({"type": "input_image", "image_url": PNG, "detail": "high"}, "$.input[1].image_url"),
    ],
)
async def test_a_text_model_refuses_an_image_item(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, item: dict[str, Any], param: str) -> None:
    r = await pool.respond({"model": "m", "input": [{"type": "text", "text": "What is this?"}, item]})
    assert_error(
        r, 400, "modality_unsupported", f"model 'm' takes text only (its modalities are ['text']); {param[2:]} is an image", param=param, model="m"
    )
    chat = await pool.post(CHAT, {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]})
    assert_error(chat, 400, "modality_unsupported", param="$.messages[0].content[0].image_url.url", model="m")
    image_turn = {"content": [{"type": "image_url", "image_url": {"url": PNG}}]}
    for role, article in (("system", "a"), ("assistant", "an")):
        turns = [{"role": role, **image_turn}, {"role": "user", "content": "x"}]
        assert_error(
            await pool.post(CHAT, {"model": "eye", "allow_remote": True, "messages": turns}),
            400,
            "invalid_request",
            f"messages[0] is {article} {role} message with an image; images go in user messages",
            param="$.messages[0].content",
        )
    assert not control.seen


async def test_an_image_model_gets_its_items_in_order(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    items = [{"type": "input_text", "text": "Compare"}, {"type": "input_image", "image_url": PNG, "detail": "low"}, {"type": "text", "text": "and"}]
    r = await pool.respond({"model": "eye", "allow_remote": True, "input": items})
    assert r.status == 200, r.json
    (user,) = [m for m in control.seen[-1].messages if m.role == "user"]
    assert user.content == "Compare\nand"
    assert user.parts == ["Compare", ImagePart(url=PNG, detail="low", at="$.input[1].image_url"), "and"]
    chat = await pool.post(
        CHAT,
        {"model": "eye", "allow_remote": True, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]},
    )
    assert chat.status == 200, chat.json
    assert control.seen[-1].images == [ImagePart(url=PNG, detail="auto", at="$.messages[0].content[0].image_url.url")]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file:///etc/passwd", "llm-pool takes images as data: URLs (or http(s):// where the model allows it), never file: URLs"),
        ("data:image/png;base64,%%%", "the data: URL's data is not valid base64"),
        ("data:image/png," + b64(b"x"), "a data: URL must be data:<image type>;base64,<data>"),
        ("data:text/html;base64," + b64(b"<p>"), "media type 'text/html' is not an image llm-pool takes (image/png, image/jpeg, image/gif, image/webp)"),
        ("data:image/jpeg;base64," + b64(b"\x89PNG\r\n\x1a\n"), "the data is not a image/jpeg image"),
        ("http://169.254.169.254/latest/meta-data", "model 'eye' takes images as data: URLs only; http(s):// URLs need image_url_fetch = true in its settings"),
    ],
)
async def test_image_urls_llm_pool_does_not_take(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory, url: str, message: str) -> None:
    r = await pool.respond({"model": "eye", "allow_remote": True, "input": [{"type": "input_image", "image_url": url}]})
    assert_error(r, 400, "invalid_request", f"input[0].image_url: {message}", param="$.input[0].image_url")
    assert not control.seen


async def test_http_image_urls_only_where_the_model_allows_them(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    url = "https://example.com/cat.png"
    r = await pool.respond({"model": "web", "allow_remote": True, "input": [{"type": "input_image", "image_url": url}]})
    assert r.status == 200, r.json
    assert control.seen[-1].images[0].url == url


def test_settings_give_images_only_to_backends_that_take_them() -> None:
    with pytest.raises(SettingsError, match=r"\$\.engine\.models\.g\.modalities: model 'g' cannot take images: backend gguf has no image input$"):
        make_settings({"g": {"modalities": ["text", "image"]}})
    with pytest.raises(SettingsError, match=r"\.image_url_fetch: model 'g' is only for openai_compatible models"):
        make_settings({"g": {"image_url_fetch": True}})
    with pytest.raises(SettingsError, match=r'\.modalities: model \'g\' must be \["text"\] or \["text", "image"\]$'):
        make_settings({"g": {"modalities": ["image"]}})


# ------------------------------------------------------------------ thinking and capabilities
async def test_thinking_is_checked_against_the_model(autojump_clock: MockClock, pool: Pool, control: FakeBackendFactory) -> None:
    assert (await pool.respond({"model": "q", "input": "x", "thinking": "enabled"})).status == 200
    assert control.seen[-1].thinking == "enabled"
    chat = await pool.post(CHAT, {"model": "q", "messages": [{"role": "user", "content": "x"}], "thinking": "disabled"})
    assert chat.status == 200 and control.seen[-1].thinking == "disabled"
    n = len(control.seen)
    for route, body in ((None, {"input": "x"}), (CHAT, {"messages": [{"role": "user", "content": "x"}]})):
        payload = {"model": "m", "thinking": "disabled", **body}
        r = await (pool.respond(payload) if route is None else pool.post(route, payload))
        assert_error(r, 400, "invalid_request", "thinking='disabled' is not available for model 'm': it offers ['default']", param="$.thinking")
    assert len(control.seen) == n


async def test_capabilities_on_models_and_admin_rows(autojump_clock: MockClock, pool: Pool) -> None:
    cards = {c["id"]: c["capabilities"] for c in (await pool.get("/v1/models")).json["data"]}
    assert cards["m"] == {
        "modalities": ["text"],
        "file_inputs": False,
        "multi_turn": True,
        "thinking_modes": ["default"],
        "response_formats": ["text", "json_object", "json_schema"],  # gguf enforces them with a grammar
    }
    assert cards["q"]["thinking_modes"] == ["default", "enabled", "disabled"]
    assert cards["tg"]["multi_turn"] is False
    assert cards["eye"]["modalities"] == ["text", "image"]
    assert (await pool.get("/v1/models/eye")).json["capabilities"] == cards["eye"]
    rows = {m["name"]: m["capabilities"] for m in (await pool.get("/v1/admin/models")).json["models"]}
    assert rows == cards
