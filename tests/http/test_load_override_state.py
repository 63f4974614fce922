"""``load_override`` is the runtime-only override active on the model now (issue 13 §6): the last
load's override while that load lives, ``{}`` once the model is unloaded (or failed, or loaded
without one)."""

from __future__ import annotations

import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.server import start_pool

import llm_pool.admin.gpu

CATALOG = {"g": {"model_path": "g.gguf", "gguf_n_ctx": 2048}}
OVERRIDE = {"gguf_n_ctx": 1024, "gguf_flash_attn": "on"}


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm_pool.admin.gpu, "read_gpus", lambda: ([], "NVML unavailable (test)"))


async def test_load_override_is_empty_once_unloaded(nursery: trio.Nursery, control: FakeBackendFactory) -> None:
    with trio.fail_after(10):
        pool = await start_pool(nursery, control, models=CATALOG, autoload=False)
        before = (await pool.get("/v1/admin/models/g")).json["load_override"]
        loaded = (await pool.post("/v1/admin/models/g/load", OVERRIDE)).json["load_override"]
        unloaded = (await pool.post("/v1/admin/models/g/unload")).json["load_override"]
        row = (await pool.get("/v1/admin/models/g")).json["load_override"]
        plain = (await pool.post("/v1/admin/models/g/load")).json["load_override"]
        await pool.post("/v1/admin/models/g/unload")
        control.configure("g", fail_load="no weights")
        await pool.post("/v1/admin/models/g/load", OVERRIDE)
        failed = (await pool.get("/v1/admin/models/g")).json
    assert before == {}
    assert loaded == OVERRIDE
    assert unloaded == row == {}
    assert plain == {}
    assert (failed["runtime_state"], failed["load_override"]) == ("failed", {})
