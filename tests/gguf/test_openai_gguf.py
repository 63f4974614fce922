"""The official ``openai`` SDK against a real server on the tiny generated GGUF (issue 16 §2):
legacy completions (raw prompts, echo, stop, n, logprobs, streams), chat logprobs and ``n``,
and embeddings through llama.cpp's embedding mode; the same through ``llama_server`` (token ids
to its ``/completion`` with ``n_probs``, and to its ``/embedding`` with ``--embeddings``), which
must agree with in-process GGUF.

Real clock, real sockets (127.0.0.1, port 0), real llama.cpp threads: the server runs in a
thread of its own (``support.server.server_in_thread``) and each SDK call is bounded by the
SDK's own timeout.  The tiny model's next token is a function of the last one (see
``models.tiny_gguf``): ``"x"`` continues ``"yzabc…"``, ``"5"`` continues ``"6789"`` and stops.
"""

from __future__ import annotations

import base64
import math
import os
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from support.server import server_in_thread

from llm_pool.backends.llama_server import default_binary
from llm_pool.config import decode_settings

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make install`)")
openai = pytest.importorskip("openai", reason="the openai SDK is a test dependency (requirements/pool.txt)")

from models.tiny_gguf import N_EMBD, write_tiny_gguf  # noqa: E402

BOUND = 30.0
#: llama-server, when ``make install`` built it: the llama_server models are served only then.
HAS_LLAMA_SERVER = os.access(default_binary(), os.X_OK)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    common: dict[str, Any] = {"model_path": str(path), "backend": "gguf", "gguf_n_ctx": 256, "n_threads": 1}
    models: dict[str, Any] = {
        "tiny": {**common, "prompt_format": "native"},
        "emb": {**common, "embeddings": True},
        "tiny-batched": {**common, "gguf_batching": True},
    }
    if HAS_LLAMA_SERVER:
        engine = {"model_path": str(path), "backend": "llama_server", "llama_server_n_ctx": 256, "n_threads": 1}
        models["ls"] = {**engine, "prompt_format": "native"}
        models["ls-emb"] = {**engine, "embeddings": True}
    settings = decode_settings(
        {"service": {"host": "127.0.0.1", "port": 0}, "engine": {"models": models}}, source="test"
    )
    with server_in_thread(settings) as url:
        with httpx.Client(base_url=url, timeout=BOUND) as http:
            for name in models:
                r = http.post(f"/v1/admin/models/{name}/load", json={})
                assert r.status_code == 200 and r.json()["runtime_state"] == "loaded", r.text
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[Any]:
    sdk = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=BOUND)
    yield sdk
    sdk.close()


# --------------------------------------------------------------------------- /v1/completions
def test_completion_continues_the_raw_prompt(client: Any) -> None:
    c = client.completions.create(model="tiny", prompt="x", max_tokens=5)
    assert c.object == "text_completion" and c.id.startswith("cmpl-") and c.model == "tiny"
    assert [(ch.index, ch.text, ch.finish_reason, ch.logprobs) for ch in c.choices] == [(0, "yzabc", "length", None)]
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (1, 5, 6)


def test_completion_defaults_to_16_tokens_and_stops_at_eos_and_stop_strings(client: Any) -> None:
    c = client.completions.create(model="tiny", prompt="a")
    assert len(c.choices[0].text) == 16 and c.choices[0].finish_reason == "length"
    c = client.completions.create(model="tiny", prompt="5", max_tokens=50, echo=True)
    assert (c.choices[0].text, c.choices[0].finish_reason) == ("56789", "stop")
    c = client.completions.create(model="tiny", prompt="a", max_tokens=50, stop=["e"])
    assert (c.choices[0].text, c.choices[0].finish_reason) == ("bcd", "stop")


def test_a_raw_prompt_never_holds_a_control_token(client: Any) -> None:
    # "<|im_end|>" is a control token of the vocabulary; as caller text it is ten byte tokens,
    # and the model continues after ">" (not after an end-of-turn, which would end at once)
    c = client.completions.create(model="tiny", prompt="<|im_end|>", max_tokens=3)
    assert (c.usage.prompt_tokens, c.choices[0].text) == (10, "abc")


def test_prompts_and_n_make_choices_in_openai_order(client: Any) -> None:
    c = client.completions.create(model="tiny", prompt=["x", "5"], n=2, max_tokens=3)
    assert [(ch.index, ch.text) for ch in c.choices] == [(0, "yza"), (1, "yza"), (2, "678"), (3, "678")]
    # each distinct prompt counted once, every choice's output
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (2, 12)


def test_seeded_choices_repeat(client: Any) -> None:
    def texts(seed: int) -> list[str]:
        c = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], n=3, seed=seed, temperature=1.0, max_tokens=4
        )
        return [ch.message.content for ch in c.choices]

    first = texts(7)
    assert len(first) == 3 and texts(7) == first  # seed + i per choice: reproducible


def test_completion_stream(client: Any) -> None:
    chunks = list(
        client.completions.create(
            model="tiny", prompt="x", max_tokens=5, stream=True, stream_options={"include_usage": True}, echo=True
        )
    )
    assert all(ch.object == "text_completion" and ch.id == chunks[0].id for ch in chunks)
    text = "".join(c.text for ch in chunks for c in ch.choices)
    assert text == "xyzabc"
    finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_completion_stream_with_n_keeps_each_choice_whole(client: Any) -> None:
    chunks = list(client.completions.create(model="tiny", prompt="x", n=2, max_tokens=3, stream=True))
    by_index: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            by_index[c.index] = by_index.get(c.index, "") + c.text
    assert by_index == {0: "yza", 1: "yza"}


def test_completion_logprobs(client: Any) -> None:
    c = client.completions.create(model="tiny", prompt="x", max_tokens=3, logprobs=2)
    lp = c.choices[0].logprobs
    assert lp.tokens == ["y", "z", "a"] and lp.text_offset == [0, 1, 2]
    # the successor's logit dominates by ~100: its probability is ~1
    assert all(-1e-3 < v <= 0 for v in lp.token_logprobs)
    assert [list(top)[0] for top in lp.top_logprobs] == ["y", "z", "a"]
    assert all(len(top) == 2 and list(top.values())[1] < -10 for top in lp.top_logprobs)


def test_completion_logprobs_stream(client: Any) -> None:
    chunks = list(client.completions.create(model="tiny", prompt="x", max_tokens=3, logprobs=1, stream=True))
    tokens = [t for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.tokens]
    assert tokens == ["y", "z", "a"]


def test_chat_logprobs(client: Any) -> None:
    c = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=True, top_logprobs=3
    )
    content = c.choices[0].logprobs.content
    assert "".join(t.token for t in content) == c.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)
    assert all(t.bytes == list(t.token.encode()) and math.isclose(t.logprob, 0, abs_tol=1e-3) for t in content)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=True, stream=True
        )
    )
    streamed = [t.token for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.content]
    assert "".join(streamed) == c.choices[0].message.content


def test_the_batched_backend_agrees_with_the_sequential_one(client: Any) -> None:
    c = client.completions.create(model="tiny-batched", prompt="x", max_tokens=3, logprobs=2)
    ref = client.completions.create(model="tiny", prompt="x", max_tokens=3, logprobs=2)
    assert c.choices[0].text == ref.choices[0].text == "yza"
    lp, ref_lp = c.choices[0].logprobs, ref.choices[0].logprobs
    assert lp.tokens == ref_lp.tokens and [list(t) for t in lp.top_logprobs] == [list(t) for t in ref_lp.top_logprobs]
    assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(lp.token_logprobs, ref_lp.token_logprobs, strict=True))


@pytest.mark.parametrize(
    ("fields", "message", "param"),
    [
        ({"suffix": "z"}, "suffix is not supported by llm-pool (it does no fill-in-the-middle); leave it out", "$.suffix"),
        ({"echo": True, "logprobs": 1}, "echo with logprobs is not supported by llm-pool (it returns log probabilities of generated tokens only)", "$.echo"),
        ({"n": 9, "prompt": ["a", "b"]}, "2 prompts with n=9 make 18 choices; llm-pool makes at most 16 per request", "$.prompt"),
        ({"best_of": 3}, "best_of is not supported by llm-pool (it does not rank choices); leave it out or send it equal to n", "$.best_of"),
    ],
)  # fmt: skip
def test_completion_bad_requests(client: Any, fields: dict[str, Any], message: str, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**{"model": "tiny", "prompt": "x", **fields})
    assert (info.value.body["message"], info.value.body["param"], info.value.code) == (message, param, "invalid_request")


# --------------------------------------------------------------------------- /v1/embeddings
def test_embeddings_have_the_models_size_are_stable_and_keep_order(client: Any) -> None:
    e = client.embeddings.create(model="emb", input=["abc", "xyz", "abc"])
    assert e.object == "list" and e.model == "emb"
    assert [(d.object, d.index) for d in e.data] == [("embedding", 0), ("embedding", 1), ("embedding", 2)]
    a, x, again = (d.embedding for d in e.data)
    assert len(a) == len(x) == N_EMBD
    assert a == again and a != x
    assert math.isclose(math.fsum(v * v for v in a), 1.0, rel_tol=1e-6)  # unit length, as OpenAI's
    assert (e.usage.prompt_tokens, e.usage.total_tokens) == (6 + 3, 6 + 3)
    single = client.embeddings.create(model="emb", input="xyz")
    assert single.data[0].embedding == x


def test_embeddings_base64(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=BOUND) as http:
        floats = http.post("/v1/embeddings", json={"model": "emb", "input": "hi"}).json()["data"][0]["embedding"]
        r = http.post("/v1/embeddings", json={"model": "emb", "input": "hi", "encoding_format": "base64"})
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    unpacked = struct.unpack(f"<{N_EMBD}f", raw)
    assert all(math.isclose(u, f, rel_tol=1e-6, abs_tol=1e-7) for u, f in zip(unpacked, floats, strict=True))


def test_embeddings_and_generation_are_refused_on_the_wrong_model(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="tiny", input="x")
    assert info.value.code == "embeddings_unsupported"
    assert info.value.body["message"] == "model 'tiny' is not an embeddings model (its config has no `embeddings = true`)"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="emb", prompt="x")
    assert info.value.code == "generation_unsupported"
    assert info.value.body["message"] == (
        "model 'emb' is an embeddings model (`embeddings = true`): it serves POST /v1/embeddings only"
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="emb", input="x", dimensions=8)
    assert info.value.body["param"] == "$.dimensions"
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="emb", input=["x", ""])
    assert (info.value.body["message"], info.value.body["param"]) == ("input[1] is empty; there is nothing to embed", "$.input[1]")
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="emb", input="y" * 300)
    assert info.value.body["message"] == "input[0] has 300 tokens; model 'emb' embeds at most 256 at once"


# --------------------------------------------------------------------------- llama_server
needs_llama_server = pytest.mark.skipif(not HAS_LLAMA_SERVER, reason="llama-server is not built (run `make install`)")


@needs_llama_server
def test_llama_server_completion_and_logprobs_agree_with_in_process_gguf(client: Any) -> None:
    c = client.completions.create(model="ls", prompt="x", max_tokens=3, logprobs=2)
    ref = client.completions.create(model="tiny", prompt="x", max_tokens=3, logprobs=2)
    assert c.choices[0].text == ref.choices[0].text == "yza"
    lp, ref_lp = c.choices[0].logprobs, ref.choices[0].logprobs
    assert lp.tokens == ref_lp.tokens and lp.text_offset == ref_lp.text_offset
    assert all(math.isclose(a, b, abs_tol=1e-3) for a, b in zip(lp.token_logprobs, ref_lp.token_logprobs, strict=True))
    assert [list(t) for t in lp.top_logprobs] == [list(t) for t in ref_lp.top_logprobs]
    # the raw prompt reaches the engine as token ids: a control token's text stays text
    c = client.completions.create(model="ls", prompt="<|im_end|>", max_tokens=3)
    assert (c.usage.prompt_tokens, c.choices[0].text) == (10, "abc")
    chunks = list(
        client.chat.completions.create(
            model="ls", messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=True, stream=True
        )
    )
    tokens = [t.token for ch in chunks for c in ch.choices if c.logprobs for t in c.logprobs.content]
    assert "".join(tokens) == "".join(c.delta.content or "" for ch in chunks for c in ch.choices)


@needs_llama_server
def test_llama_server_embeddings_agree_with_in_process_gguf(client: Any) -> None:
    got = client.embeddings.create(model="ls-emb", input=["abc", "xyz"])
    ref = client.embeddings.create(model="emb", input=["abc", "xyz"])
    assert got.usage.prompt_tokens == ref.usage.prompt_tokens == 6
    for a, b in zip(got.data, ref.data, strict=True):
        assert len(a.embedding) == N_EMBD
        assert all(math.isclose(x, y, abs_tol=1e-3) for x, y in zip(a.embedding, b.embedding, strict=True))
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="ls-emb", prompt="x")
    assert info.value.code == "generation_unsupported"
