"""Images for a ``llama_server`` model (issue 16 §1): the multimodal prompt llama-server's
``/completion`` takes (``{"prompt_string", "multimodal_data"}``, as the pinned llama.cpp's
``tools/server`` README and ``tokenize_input_subprompt`` define it), built without a runtime.

Not tested: a real llama-server with a real projector (``--mmproj``): no multimodal GGUF can be
made or downloaded on this machine.  The canary at the end shows the pinned engine reads our
prompt as a multimodal one (and, without a projector, refuses it).  llama-server parses that prompt string for control
tokens itself, so caller text that spells one is refused before anything is sent.
"""

from __future__ import annotations

import pytest
import trio
from llama_server_kit import binary_or_skip
from models.tiny_gguf import write_tiny_gguf
from support.runtime import request as text_request
from support.runtime import result, run, running_manager, submit
from support.settings import make_settings

from llm_pool.backends.llama_server import MEDIA_MARKER, multimodal_prompt
from llm_pool.backends.prompts import SpecialToken, Vocab, render_prompt
from llm_pool.config import SettingsError, decode_settings
from llm_pool.pool.errors import PoolError
from llm_pool.pool.jobs import GenerationRequest, ImagePart, Message

PNG_B64 = "iVBORw0KGgoAAAAA"
VOCAB: Vocab[int] = Vocab(lambda s: list(range(len(s))), [SpecialToken("<|im_end|>", 2), SpecialToken("<|im_start|>", 1)], 12)


def request(*texts_and_images: str | ImagePart) -> GenerationRequest:
    text = "\n".join(p for p in texts_and_images if isinstance(p, str))
    return GenerationRequest(model="v", messages=[Message(role="user", content=text, parts=list(texts_and_images))])


def image(n: int = 0) -> ImagePart:
    return ImagePart(url=f"data:image/png;base64,{PNG_B64}{'A' * 4 * n}", at=f"$.input[{n}].image_url")


def test_the_prompt_string_has_a_marker_per_image_and_the_images_in_order() -> None:
    req = request("Compare", image(1), "with", image(3))
    prompt = render_prompt("generic", req, media_marker=MEDIA_MARKER)
    out = multimodal_prompt(prompt, req, VOCAB, trust_caller=False, bos="", engine_adds_bos=False)
    assert out == {
        "prompt_string": "<|im_start|>system\nYou are a helpful assistant. Return only the response.<|im_end|>\n"
        f"<|im_start|>user\nCompare\n{MEDIA_MARKER}\nwith\n{MEDIA_MARKER}<|im_end|>\n<|im_start|>assistant\n",
        "multimodal_data": [PNG_B64 + "AAAA", PNG_B64 + "AAAAAAAAAAAA"],
    }


@pytest.mark.parametrize(("text", "spelled"), [("hi<|im_end|>", "<|im_end|>"), (f"a {MEDIA_MARKER} b", MEDIA_MARKER)])
def test_caller_text_that_the_engine_would_parse_is_refused(text: str, spelled: str) -> None:
    req = request(text, image())
    prompt = render_prompt("generic", req, media_marker=MEDIA_MARKER)
    with pytest.raises(PoolError) as info:
        multimodal_prompt(prompt, req, VOCAB, trust_caller=False, bos="", engine_adds_bos=False)
    assert (info.value.status, info.value.code, info.value.param) == (400, "invalid_request", "messages")
    assert info.value.message == (
        "model 'v' is given images in a prompt its engine parses for control tokens;"
        f" text that spells one ({spelled!r}) cannot be sent with an image"
    )
    # a model whose callers are trusted with control tokens sends it as it is
    trusted = multimodal_prompt(prompt, req, VOCAB, trust_caller=True, bos="", engine_adds_bos=False)
    assert text in trusted["prompt_string"]


def test_the_engine_adds_the_bos_the_template_wrote() -> None:
    req = request("Describe", image())
    prompt = render_prompt("mistral_template", req, media_marker=MEDIA_MARKER)
    assert prompt.text.startswith("<s>[INST] ")
    added = multimodal_prompt(prompt, req, VOCAB, trust_caller=False, bos="<s>", engine_adds_bos=True)
    assert added["prompt_string"].startswith("[INST] ")
    kept = multimodal_prompt(prompt, req, VOCAB, trust_caller=False, bos="<s>", engine_adds_bos=False)
    assert kept["prompt_string"].startswith("<s>[INST] ")


def test_images_need_the_projector() -> None:
    with pytest.raises(SettingsError, match=r"\.modalities: model 'v' cannot take images without llama_server_mmproj_path"):
        make_settings({"v": {"backend": "llama_server", "modalities": ["text", "image"]}})
    ok = make_settings({"v": {"backend": "llama_server", "modalities": ["text", "image"], "llama_server_mmproj_path": "p.gguf"}})
    assert ok.engine.models["v"].modalities == ["text", "image"]


# ------------------------------------------------------------------ the pinned engine (canary)
async def test_the_pinned_llama_server_reads_our_prompt_as_a_multimodal_one(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Canary: the real llama-server, tiny model, no projector.  Our multimodal prompt reaches
    the engine's multimodal branch (``tokenize_input_subprompt``: an object with
    ``multimodal_data``), which, without ``--mmproj``, refuses it; the job fails cleanly and
    the replica serves on.  Pins the engine's words, like the msgspec canary: a llama.cpp
    update that changes the multimodal form fails here first."""
    binary_or_skip()
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    settings = decode_settings(
        {"engine": {"models": {"tiny": {"model_path": str(path), "backend": "llama_server", "prompt_format": "native",
                                         "llama_server_n_ctx": 256, "n_threads": 1}}}},
        source="test",
    )  # fmt: skip
    with trio.fail_after(30):
        async with running_manager(settings, autoload=True, load=["tiny"]) as (manager, _):
            req = text_request("hi")
            req.messages = [Message(role="user", content="hi", parts=["hi", image()])]
            with pytest.raises(PoolError) as info:
                await result(submit(manager, req))  # admission's modality check is the serving layer's
            assert (info.value.status, info.value.code) == (502, "backend_error")
            assert "Multimodal data provided, but model does not support multimodal requests" in info.value.message
            deltas, done = await run(manager, text_request("hi"))  # the replica serves on
            assert done.stats.output_tokens
