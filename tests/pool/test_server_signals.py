"""Signals on a real ``llm-pool serve`` subprocess (issue 13 §6): SIGHUP reloads the settings,
as ``POST /v1/admin/settings/reload`` does, and logs it; it used to kill the server at once
(exit 129).  Real clock and a real process: every step is bounded by ``trio.fail_after`` and
waits on the server's own log lines, never on a sleep."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import trio
from support.server_process import ServerLog, open_serve

LIMIT_S = 60
CONFIG = """
[service]
host = "127.0.0.1"
port = 0
log_level = "info"

[engine.models.a]
model_path = "a.gguf"
enabled = false
"""


async def test_sighup_reloads_the_settings_and_keeps_serving(tmp_path: Path) -> None:
    config = tmp_path / "pool.toml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_POOL_")}
    log = ServerLog()
    with trio.fail_after(LIMIT_S):
        proc = await open_serve(config, env=env)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(log.read, proc)
                url = (await log.wait_for("serving"))["urls"][0]
                async with httpx.AsyncClient(base_url=url) as client:
                    config.write_text(CONFIG + '\n[engine.models.b]\nmodel_path = "b.gguf"\nenabled = false\n')
                    mark = len(log.records)
                    proc.send_signal(signal.SIGHUP)
                    reloaded = await log.wait_for("SIGHUP: settings reloaded", mark)
                    models = (await client.get("/v1/admin/models")).json()["models"]

                    config.write_text(CONFIG + "\n[engine.models.c]\nbackend = 5\n")  # not valid
                    mark = len(log.records)
                    proc.send_signal(signal.SIGHUP)
                    refused = await log.wait_for("SIGHUP: settings not reloaded", mark)
                    still = (await client.get("/v1/admin/models")).json()["models"]
                    live = await client.get("/health/live")
                assert proc.returncode is None
                proc.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert (reloaded["level"], reloaded["action"], reloaded["added_models"]) == ("info", "reload", ["b"])
    assert reloaded["unchanged_models"] == ["a"] and reloaded["service_restart_required"] is False
    assert [m["name"] for m in models] == ["a", "b"]
    assert (refused["level"], refused["code"]) == ("error", "invalid_settings")
    assert refused["message"].startswith("settings not reloaded: "), refused
    assert [m["name"] for m in still] == ["a", "b"]
    assert live.status_code == 200
