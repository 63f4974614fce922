"""The admin API's tune (issue 21): ``POST/GET/DELETE /v1/admin/models/{name}/tune`` over the
quart test client, the sweep's layouts served by the fake backend (the real engines are
tests/pool/test_tuning.py's).  Real clock (the sweep reads the model file on a worker thread),
every test bounded by ``trio.fail_after``; the tuning cache is a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from support.fake_backend import FakeBackendFactory
from support.replies import assert_error
from support.server import start_pool

from llm_pool.pool.tuning import machine_cores

LIMIT_S = 30
TUNE = "/v1/admin/models/m/tune"


@pytest.fixture
def models(tmp_path: Path) -> dict[str, dict[str, object]]:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(64))  # the fake backend never reads it; the fingerprint does
    return {
        "m": {"model_path": str(path), "replica_max": 3},
        "far": {"backend": "openai_compatible", "remote_base_url": "http://127.0.0.1:9", "remote_model": "x"},
    }


async def test_a_tune_runs_in_the_background_then_answers_its_table(
    nursery: trio.Nursery, control: FakeBackendFactory, models: dict[str, dict[str, object]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_POOL_TUNE_CACHE_DIR", str(tmp_path / "cache"))
    with trio.fail_after(LIMIT_S):
        pool = await start_pool(nursery, control, models=models)
        own = pool.manager.entries["m"].runtime
        r = await pool.post(TUNE, {"cores": 1, "concurrency": [1, 2], "engines": ["gguf", "gguf_batched"], "tokens": 3})
        assert r.status == 202, r.text
        assert (r.json["state"], r.json["concurrencies"], r.json["report"]) == ("running", [1, 2], [])
        assert_error(await pool.post(TUNE, {}), 409, "tune_running",
                     "a tune of model 'm' is running; cancel it or wait for its end")  # fmt: skip
        await pool.manager.tunes["m"].finished.wait()
        r = await pool.get(TUNE)
    body = r.json
    assert (body["state"], body["error"], body["cores"], body["partial"]) == ("done", None, 1, False)
    assert [(x["engine"], x["replicas"], x["threads"], x["slots"]) for x in body["rows"]] == [
        ("gguf", 1, 1, 1), ("gguf_batched", 1, 1, 2)
    ]  # fmt: skip
    for row in body["rows"]:
        assert [c["concurrency"] for c in row["cells"]] == [1, 2]
        assert all(c["tokens_per_s"] > 0 and c["requests"] == 2 for c in row["cells"])
    assert [b["concurrency"] for b in body["best"]] == [1, 2]
    assert body["report"][0] == "# tune m: 1 cores, 3 tokens per request, greedy, streaming"
    assert 'backend = "gguf"' in body["report"]
    assert body["progress"][0] == "tuning m: 2 layouts within 1 cores, concurrency 1,2, at most 600 s"
    # the model itself was never touched, and the best layout was recorded
    assert pool.manager.entries["m"].state == "loaded" and pool.manager.entries["m"].runtime is own
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert str(tmp_path) not in r.text


async def test_cancelling_a_tune_unloads_its_layout_and_records_nothing(
    nursery: trio.Nursery, control: FakeBackendFactory, models: dict[str, dict[str, object]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_POOL_TUNE_CACHE_DIR", str(tmp_path / "cache"))
    with trio.fail_after(LIMIT_S):
        pool = await start_pool(nursery, control, models=models)
        control.configure("m", load_gate=trio.Event())  # the tune's first layout never finishes loading
        assert (await pool.post(TUNE, {"cores": 1, "engines": ["gguf"]})).status == 202
        r = await pool.request("DELETE", TUNE)
    assert r.status == 200
    assert (r.json["state"], r.json["partial"]) == ("cancelled", True)
    assert r.json["rows"][0]["cells"] == []
    assert not (tmp_path / "cache").exists()
    assert pool.manager.entries["m"].state == "loaded"


async def test_tune_refusals_name_what_is_wrong(
    nursery: trio.Nursery, control: FakeBackendFactory, models: dict[str, dict[str, object]]
) -> None:
    have = machine_cores()
    with trio.fail_after(LIMIT_S):
        pool = await start_pool(nursery, control, models=models)
        assert_error(await pool.post(TUNE, {"cores": have + 1}), 400, "invalid_request",
                     f"requested {have + 1} cores but this machine has {have}", param="$.cores")  # fmt: skip
        assert_error(await pool.post("/v1/admin/models/far/tune", {}), 400, "invalid_request",
                     "model 'far' uses backend openai_compatible; tune measures gguf and llama_server models")  # fmt: skip
        assert_error(await pool.post(TUNE, {"max_s": 0}), 400, "invalid_request",
                     "invalid request body: $.max_s: expected a number > 0 and <= 1800", param="$.max_s")  # fmt: skip
        assert_error(await pool.post(TUNE, {"engines": ["ct2"]}), 400, "invalid_request")
        assert_error(await pool.get(TUNE), 404, "not_found", "model 'm' has not been tuned by this server")
        assert_error(await pool.get("/v1/admin/models/nope/tune"), 404, "unknown_model")
    assert pool.manager.tunes == {}


async def test_a_layout_that_fails_to_load_is_a_row_with_its_error_and_nothing_is_recorded(
    nursery: trio.Nursery, control: FakeBackendFactory, models: dict[str, dict[str, object]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_POOL_TUNE_CACHE_DIR", str(tmp_path / "cache"))
    with trio.fail_after(LIMIT_S):
        pool = await start_pool(nursery, control, models=models)
        control.configure("m", fail_load="no room for it")  # every layout's load fails
        assert (await pool.post(TUNE, {"cores": 1, "concurrency": [1], "engines": ["gguf", "llama_server"]})).status == 202
        await pool.manager.tunes["m"].finished.wait()
        r = await pool.get(TUNE)
    assert r.json["state"] == "done"
    assert [(x["engine"], x["error"], x["cells"]) for x in r.json["rows"]] == [
        ("gguf", "load failed: no room for it", []), ("llama_server", "load failed: no room for it", [])
    ]  # fmt: skip
    assert r.json["best"] == [] and not (tmp_path / "cache").exists()
    assert pool.manager.entries["m"].state == "loaded"
