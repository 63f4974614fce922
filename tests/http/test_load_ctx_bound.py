"""The ``gguf_n_ctx`` load override is bounded by the model's trained context (issue 13 §5):
``4294967296`` used to wrap around llama.cpp's uint32 and load with another context, ``10**12``
spent 42 s failing.  Both, and anything above ``n_ctx_train`` from the GGUF header, are a 400
naming ``gguf_n_ctx`` now, before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from models.tiny_gguf import write_tiny_gguf
from support.fake_backend import FakeBackendFactory
from support.replies import assert_error
from support.server import start_pool

import llm_pool.admin.gpu
from llm_pool.backends.gguf_header import trained_context

#: The tiny GGUF's llama.context_length.
TRAINED = 4096


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm_pool.admin.gpu, "read_gpus", lambda: ([], "NVML unavailable (test)"))


def test_trained_context_is_read_from_the_header(tmp_path: Path) -> None:
    assert trained_context(write_tiny_gguf(tmp_path / "t.gguf")) == TRAINED
    (tmp_path / "not.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 7)  # truncated
    assert trained_context(tmp_path / "not.gguf") is None
    assert trained_context(tmp_path / "missing.gguf") is None


async def test_gguf_n_ctx_above_the_trained_context_is_400(
    nursery: trio.Nursery, control: FakeBackendFactory, tmp_path: Path
) -> None:
    path = write_tiny_gguf(tmp_path / "g.gguf")
    models = {"g": {"model_path": str(path), "enabled": False}}
    with trio.fail_after(10):
        pool = await start_pool(nursery, control, models=models)
        wrapped = await pool.post("/v1/admin/models/g/load", {"gguf_n_ctx": 4294967296})
        huge = await pool.post("/v1/admin/models/g/load", {"gguf_n_ctx": 10**12})
        above = await pool.post("/v1/admin/models/g/load", {"gguf_n_ctx": TRAINED + 1})
        state = pool.manager.entries["g"].state
        ok = await pool.post("/v1/admin/models/g/load", {"gguf_n_ctx": TRAINED})
    for reply in (wrapped, huge):
        assert_error(
            reply, 400, "invalid_load_request", "invalid load override: $.gguf_n_ctx: expected an integer from 1 to 4294967295",
            param="$.gguf_n_ctx", model="g",
        )
    assert_error(
        above, 400, "invalid_load_request",
        f"gguf_n_ctx {TRAINED + 1} exceeds the context model 'g' was trained for ({TRAINED}, n_ctx_train in its GGUF header)",
        param="$.gguf_n_ctx", model="g",
    )
    assert state == "unloaded"  # nothing was loaded by the refused calls
    assert ok.status == 200 and ok.json["load_override"] == {"gguf_n_ctx": TRAINED}
    assert [c.model.gguf_n_ctx for c in control.contexts] == [TRAINED]
