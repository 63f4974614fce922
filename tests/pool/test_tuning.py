"""``llm-pool tune`` and ``replicas = "auto"`` (:mod:`llm_pool.pool.tuning`) on the tiny generated
GGUF, with real llama.cpp in-process and real ``llama-server`` children.

Real clock and real threads/processes: every test is bounded by ``trio.fail_after``.  The tuning
cache goes to a temporary folder (``LLM_POOL_TUNE_CACHE_DIR``), never the user's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio
from support.runtime import request, run, running_manager
from support.settings import make_settings

from llm_pool.admin.routes import model_row
from llm_pool.pool import cli, tuning
from llm_pool.pool.tuning import Layout, Row, TuneError, TuneResult
from llm_pool.pool.workload import Cell

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make install`)")

from models.tiny_gguf import write_tiny_gguf  # noqa: E402

LIMIT_S = 120


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tune") / "tiny.gguf")


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "tune-cache"
    monkeypatch.setenv("LLM_POOL_TUNE_CACHE_DIR", str(folder))
    return folder


def settings_for(path: Path, **model: Any) -> Any:
    fields = {"model_path": str(path), "prompt_format": "native", "gguf_n_ctx": 256, **model}
    return make_settings({"tiny": fields})


@pytest.mark.skipif(tuning.machine_cores() < 2, reason="the sweep cuts 2 cores; this machine has 1")
async def test_a_sweep_measures_every_layout_prints_its_table_and_records_the_best(
    tiny_gguf: Path, cache: Path
) -> None:
    settings = settings_for(tiny_gguf)
    lines: list[str] = []
    with trio.fail_after(LIMIT_S):
        result = await tuning.sweep(settings, "tiny", cores=2, concurrencies=(1, 2), tokens=4, progress=lines.append)
    expected = tuning.layouts(tuning.ENGINES, 2, (1, 2))
    assert [r.layout for r in result.rows] == expected
    # every engine, both replica counts (2 x 1 thread, 1 x 2 threads), never more than 2 cores
    assert {(lay.engine, lay.replicas, lay.threads) for lay in expected} >= {
        ("gguf", 1, 2), ("gguf", 2, 1), ("gguf_batched", 1, 2), ("llama_server", 2, 1)
    }  # fmt: skip
    assert all(lay.replicas * lay.threads <= 2 for lay in expected)
    for row in result.rows:
        assert (row.error, row.skipped) == (None, None), row.layout
        assert sorted(row.cells) == [1, 2]
        for c, cell in row.cells.items():
            assert cell.requests == 2 and cell.zero_token_answers == 0 and cell.tokens_per_s > 0, (row.layout, c)
    assert not result.partial
    assert lines[0] == "tuning tiny: 7 layouts within 2 cores, concurrency 1,2, at most 600 s"
    assert sum(1 for line in lines if re.fullmatch(r"\[\d/7\] .*", line)) == 7

    table = tuning.format_table(result)
    assert table[0] == "# tune tiny: 2 cores, 4 tokens per request, greedy, streaming"
    assert table[1] == ("| layout | replicas | threads | slots | c=1 tok/s | c=1 TTFT p50 ms | c=2 tok/s | "
                        "c=2 TTFT p50 ms |")
    rows = table[3 : 3 + len(expected)]
    assert [r.split(" | ")[:4] for r in rows] == [
        [f"| {lay.engine}", str(lay.replicas), str(lay.threads), str(lay.slots)] for lay in expected
    ]
    assert [line.split(":")[0] for line in table if line.startswith("best at")] == ["best at c=1", "best at c=2"]
    gguf, server = result.recommended("gguf"), result.recommended("llama_server")
    assert gguf is not None and server is not None
    assert table.count('backend = "gguf"') == 1 and table.count('backend = "llama_server"') == 1
    assert f"replicas = {gguf.layout.replicas}" in table

    # one record per engine family, each naming its recommended layout
    records = _records(cache)
    assert sorted(r["family"] for r in records) == ["gguf", "llama_server"]
    by_family = {r["family"]: r for r in records}
    assert by_family["gguf"]["recommended"] == vars(gguf.layout)
    assert by_family["llama_server"]["recommended"] == vars(server.layout)
    assert by_family["gguf"]["cores"] == 2 and str(tiny_gguf) not in json.dumps(records)


def _records(cache: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(cache.glob("*.json"))] if cache.exists() else []


def _recorded(path: Path, settings: Any, layout: Layout) -> None:
    """A tuning result (figures made up) whose best gguf layout is ``layout``."""
    result = TuneResult(model="tiny", backend="gguf", cores=tuning.cores_for(settings), concurrencies=(1,), tokens=4)
    result.rows = [
        Row(Layout("gguf", 1, tuning.cores_for(settings), 1), cells={1: Cell(10.0, 0.1, 0, 2, 1.0)}),
        Row(layout, cells={1: Cell(50.0, 0.1, 0, 2, 1.0)}),
    ]
    assert tuning.record_result(result, path, settings) == ["gguf"]


async def test_replicas_auto_loads_the_recorded_layout_and_says_so(tiny_gguf: Path) -> None:
    settings = settings_for(tiny_gguf, replicas="auto")
    tuned = Layout("gguf_batched", 2, 1, 3)
    _recorded(tiny_gguf, settings, tuned)
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings, load=["tiny"]) as (manager, _):
            entry = manager.entries["tiny"]
            runtime = entry.runtime
            assert runtime is not None
            assert [(r.capacity, r.backend.describe()["n_threads"]) for r in runtime.replicas] == [(3, 1), (3, 1)]
            assert type(runtime.replicas[0].backend).__name__ == "BatchedGGUFBackend"
            row = model_row(manager, entry)
            assert (row.replicas_source, row.replicas, row.replica_max) == ("tuned", 2, 2)
            _, done = await run(manager, request("x", max_tokens=3))
            assert done.text == "yza"
            # the tuned count is the load's ceiling: a resize may use it
            await manager.resize("tiny", 1)
            await manager.resize("tiny", 2)


async def test_replicas_auto_without_a_record_loads_one_replica_on_every_core(tiny_gguf: Path) -> None:
    settings = settings_for(tiny_gguf, replicas="auto", n_threads=None)
    with trio.fail_after(LIMIT_S):
        async with running_manager(settings) as (manager, _):
            assert model_row(manager, manager.entries["tiny"]).replicas_source == "auto"
            await manager.load("tiny")
            runtime = manager.entries["tiny"].runtime
            assert runtime is not None and len(runtime.replicas) == 1
            assert runtime.replicas[0].backend.describe()["n_threads"] == tuning.cores_for(settings)
            assert model_row(manager, manager.entries["tiny"]).replicas_source == "default"


def test_a_record_for_another_file_is_not_used(tiny_gguf: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    data = bytearray(tiny_gguf.read_bytes())
    data[-1] ^= 0xFF  # one byte of its last tensor differs: another file
    other.write_bytes(bytes(data))
    _recorded(other, settings_for(other, replicas="auto"), Layout("gguf", 2, 1, 1))
    settings = settings_for(tiny_gguf, replicas="auto")
    assert tuning.resolve_auto(settings, settings.engine.models["tiny"]) == ({"replicas": 1}, "default")
    mine = settings_for(other, replicas="auto")
    assert tuning.resolve_auto(mine, mine.engine.models["tiny"])[1] == "tuned"


async def test_a_sweep_past_its_time_bound_measures_nothing_more_and_records_nothing(
    tiny_gguf: Path, cache: Path
) -> None:
    with trio.fail_after(LIMIT_S):
        result = await tuning.sweep(settings_for(tiny_gguf), "tiny", cores=1, concurrencies=(1,), tokens=4, max_s=0)
    assert result.partial and result.rows
    assert {r.skipped for r in result.rows} == {"time budget spent"} and all(not r.cells for r in result.rows)
    assert _records(cache) == []
    assert "(time budget spent)" in tuning.format_table(result)[3]


async def test_more_cores_than_the_machine_has_are_refused(tiny_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    have = tuning.machine_cores()
    with pytest.raises(TuneError, match=rf"^requested {have + 1} cores but this machine has {have}$"):
        await tuning.sweep(settings_for(tiny_gguf), "tiny", cores=have + 1)
    settings = make_settings({"tiny": {"model_path": str(tiny_gguf)}}, {"engine": {"cpu_cores": have + 3}})
    with pytest.raises(TuneError, match=rf"^engine.cpu_cores asks for {have + 3} cores but this machine has {have}$"):
        await tuning.sweep(settings, "tiny")


def test_the_cli_refuses_too_many_cores_and_a_model_it_cannot_tune(
    tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "pool.toml"
    config.write_text(
        f'[engine.models.tiny]\nmodel_path = "{tiny_gguf}"\nprompt_format = "native"\n'
        '[engine.models.far]\nbackend = "openai_compatible"\nremote_base_url = "http://127.0.0.1:9"\nremote_model = "m"\n'
    )
    have = tuning.machine_cores()
    assert cli.main(["tune", "tiny", "--config", str(config), "--cores", str(have + 1)]) == 2
    assert capsys.readouterr().err == f"llm-pool: requested {have + 1} cores but this machine has {have}\n"
    assert cli.main(["tune", "far", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        "llm-pool: model 'far' uses backend openai_compatible; tune measures gguf and llama_server models\n"
    )
    assert cli.main(["tune", "tiny", "--config", str(config), "--concurrency", "1,x"]) == 2
    assert capsys.readouterr().err == "llm-pool: --concurrency must be a comma list of integers >= 1, not '1,x'\n"


def test_the_cli_prints_progress_then_the_table(tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], cache: Path) -> None:
    config = tmp_path / "pool.toml"
    config.write_text(f'[engine.models.tiny]\nmodel_path = "{tiny_gguf}"\nprompt_format = "native"\ngguf_n_ctx = 256\n')
    code = cli.main(["tune", "tiny", "--config", str(config), "--cores", "1", "--concurrency", "1,2", "--tokens", "4",
                     "--engines", "gguf,gguf_batched", "--no-record"])
    out, err = capsys.readouterr()
    assert code == 0
    assert err.splitlines()[0] == "tuning tiny: 2 layouts within 1 cores, concurrency 1,2, at most 600 s"
    assert out.splitlines()[0] == "# tune tiny: 1 cores, 4 tokens per request, greedy, streaming"
    assert 'backend = "gguf"' in out.splitlines()
    assert not cache.exists()


def test_a_fixed_llama_server_port_keeps_auto_at_one_replica(tiny_gguf: Path) -> None:
    settings = make_settings({"tiny": {"model_path": str(tiny_gguf), "backend": "llama_server", "replicas": "auto"}})
    result = TuneResult(model="tiny", backend="llama_server", cores=tuning.cores_for(settings), concurrencies=(1,), tokens=4)
    result.rows = [Row(Layout("llama_server", 2, 1, 4), cells={1: Cell(50.0, 0.1, 0, 2, 1.0)})]
    assert tuning.record_result(result, tiny_gguf, settings) == ["llama_server"]
    model = settings.engine.models["tiny"]
    assert tuning.resolve_auto(settings, model) == (
        {"replicas": 2, "replica_max": 2, "n_threads": 1, "target_inflight": 4}, "tuned"
    )
    fixed = make_settings({"tiny": {"model_path": str(tiny_gguf), "backend": "llama_server", "replicas": "auto",
                                    "llama_server_port": 8999}})  # fmt: skip
    assert tuning.resolve_auto(fixed, fixed.engine.models["tiny"]) == ({"replicas": 1}, "default")


def test_ctrl_c_stops_the_cli_tune_and_records_nothing(tiny_gguf: Path, tmp_path: Path, cache: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "pool.toml"
    config.write_text(f'[engine.models.tiny]\nmodel_path = "{tiny_gguf}"\nprompt_format = "native"\ngguf_n_ctx = 256\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_pool.pool.cli", "tune", "tiny", "--config", str(config), "--cores", "1",
         "--concurrency", "64", "--tokens", "200", "--engines", "gguf,gguf_batched"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "LLM_POOL_TUNE_CACHE_DIR": str(cache)},
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + LIMIT_S
        while not (line := proc.stderr.readline()).startswith("[2/2]"):  # the first one measured
            assert line and time.monotonic() < deadline, "the tune never reached its second layout"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=LIMIT_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "llm-pool: tune stopped; nothing recorded", err
    assert "Traceback" not in err and "Warning" not in err, err
    assert out == "" and _records(cache) == []
