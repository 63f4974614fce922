"""The ``llm-pool`` command line (issue 19 §3): ``--version``, ``reload``, ``gpu``,
``status --watch``, ``load --set`` checking, the interactive ``chat``, and ``convert-gguf``'s
progress, overwrite guard and missing-source message.

The client commands talk to a real server (``pool.server.serve`` on port 0, the fake async
backend) on the real clock; each command runs in a worker thread (the CLI is synchronous httpx),
and every step is bounded by ``trio.fail_after``.  Nothing sleeps: ``status --watch`` gets a
``time.sleep`` that ends the watch."""

from __future__ import annotations

import functools
import io
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import trio
from support.fake_backend import FakeBackendFactory

from llm_pool.config import load_settings
from llm_pool.pool import cli, client
from llm_pool.pool.server import serve

BOUND = 10.0
CONFIG = """
[service]
host = "127.0.0.1"
port = 0

[engine.models.m]
model_path = "m.gguf"
replica_max = 2
"""


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("LLM_POOL_SETTINGS_PATH", "LLM_POOL_LOCAL_SETTINGS_PATH", "LLM_POOL_TOKEN", "LLM_POOL_URL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def control() -> FakeBackendFactory:
    return FakeBackendFactory.echo(token_delay=0.0)


@pytest.fixture
async def server(nursery: trio.Nursery, control: FakeBackendFactory, tmp_path: Path) -> str:
    config = tmp_path / "pool.toml"
    config.write_text(CONFIG)
    settings = load_settings(str(config))
    with trio.fail_after(BOUND):
        url: str = await nursery.start(
            functools.partial(serve, settings, config_path=str(config), backend_factory=control, handle_signals=False)
        )
        while "m#1" not in control.loaded:  # noqa: ASYNC110 - the load has no event outside the manager
            await trio.sleep(0.01)
    return url


async def run_cli(*argv: str) -> int:
    """``llm-pool *argv`` in a worker thread (its HTTP calls are blocking); the exit status."""

    def main() -> int:
        try:
            return cli.main(list(argv))
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=__import__("sys").stderr)
                return 1
            return int(e.code or 0)

    with trio.fail_after(BOUND):
        return await trio.to_thread.run_sync(main)


# --------------------------------------------------------------------------- arguments
def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"llm-pool {metadata.version('llm-pool')}\n"


def test_load_set_without_an_equals_sign_says_key_value_is_expected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["load", "m", "--set", "gguf_n_ctx"])
    assert exit.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == "llm-pool load: error: argument --set: expected KEY=VALUE (e.g. gguf_n_ctx=4096), got 'gguf_n_ctx'"


def test_status_watch_needs_a_sane_interval(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["status", "--watch", "0"])
    assert capsys.readouterr().err.splitlines()[-1] == "llm-pool status: error: argument --watch: expected at least 0.1 seconds, got '0'"


# --------------------------------------------------------------------------- client commands
async def test_load_set_sends_the_override(server: str, control: FakeBackendFactory, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("unload", "m", "--url", server) == 0
    assert await run_cli("load", "m", "--url", server, "--set", "gguf_n_ctx=2048", "--replicas", "2") == 0
    assert capsys.readouterr().out == "m: unloaded\nm: loaded (2 replica(s))\n"
    assert control.contexts[-1].model.gguf_n_ctx == 2048


async def test_reload_prints_what_changed(server: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "pool.toml").write_text(CONFIG + '\n[engine.models.n]\nmodel_path = "n.gguf"\nenabled = false\n')
    assert await run_cli("reload", "--url", server) == 0
    assert capsys.readouterr().out.splitlines() == ["added: n", "removed: -", "updated: -", "unchanged: m"]


async def test_gpu_prints_gpus_then_each_models_estimate(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("gpu", "--url", server) == 0
    lines = capsys.readouterr().out.splitlines()
    blank = lines.index("")
    assert lines[0].startswith("no GPU: ") or lines[0].split() == ["GPU", "NAME", "USED_MIB", "TOTAL_MIB", "USED"]
    assert lines[blank + 1].split() == ["MODEL", "STATE", "VRAM_MIB", "SOURCE"]
    assert lines[blank + 2].split()[:2] == ["m", "loaded"]


async def test_status_watch_redraws_until_ctrl_c(
    server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(client.time, "sleep", sleep)
    assert await run_cli("status", "--watch", "0.5", "--url", server) == 0
    out = capsys.readouterr().out
    assert naps == [0.5, 0.5]
    heads = [line for line in out.splitlines() if line.startswith("MODEL ")]
    assert len(heads) == 2 and client.CLEAR not in out  # not a terminal: no clearing codes
    assert re.search(rf"^{re.escape(server)}  every 0.5s  \d\d:\d\d:\d\d  \(Ctrl-C to stop\)$", out, re.M)


class TerminalInput(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_chat_on_a_terminal_is_a_conversation_with_history(
    server: str, control: FakeBackendFactory, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client.sys, "stdin", TerminalInput("one\ntwo\n/reset\nthree\n"))
    assert await run_cli("chat", "m", "--url", server) == 0
    turns = [[(m.role, m.content) for m in seen.messages] for seen in control.seen]
    assert turns == [
        [("user", "one")],
        [("user", "one"), ("assistant", "one"), ("user", "two")],
        [("user", "three")],
    ]
    out = capsys.readouterr().out
    assert out.splitlines()[0] == client.CHAT_HELP.format(model="m")
    assert "> one\n> two\n> (conversation forgotten)\n> three\n> \n" == re.sub(r"^[^>].*\n", "", out, flags=re.M)


async def test_chat_with_a_prompt_streams_one_reply(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_cli("chat", "m", "hello there", "--url", server) == 0
    assert capsys.readouterr().out == "hello there\n"


# --------------------------------------------------------------------------- convert-gguf
def test_convert_a_missing_source_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["convert-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"llm-pool: no such GGUF file: {tmp_path / 'nope.gguf'}\n"


def test_convert_refuses_to_overwrite_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, dst = tmp_path / "m.gguf", tmp_path / "out"
    src.write_bytes(b"GGUF")
    dst.mkdir()
    (dst / "keep").write_text("mine")
    assert cli.main(["convert-gguf", str(src), str(dst)]) == 2
    assert capsys.readouterr().err == f"llm-pool: {dst} exists; pass --force to replace it\n"
    assert (dst / "keep").read_text() == "mine"


def test_convert_shows_its_progress_and_replaces_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converter's stages reach stderr (the conversion itself is tests/models/test_ct2_convert.py's)."""
    from llm_pool.backends import ct2_convert

    def convert(src: Path, dst: Path, *, quantization: str, progress: Any) -> Path:
        progress("read", 0, 1)
        progress("read", 1, 1)
        for done in range(9):
            progress("layers", done, 8)
        progress("write", 0, 1)
        dst.mkdir(exist_ok=True)
        (dst / "model.bin").write_bytes(quantization.encode())
        progress("write", 1, 1)
        return dst

    monkeypatch.setattr(ct2_convert, "convert_gguf_to_ct2", convert)
    src, dst = tmp_path / "tiny.gguf", tmp_path / "out"
    src.write_bytes(b"GGUF")
    dst.mkdir()
    assert cli.main(["convert-gguf", str(src), str(dst), "--force", "--quantization", "float32"]) == 0
    out, err = capsys.readouterr()
    assert re.fullmatch(rf'wrote {re.escape(str(dst))} in \d+\.\d s; serve it with backend = "ct2", model_path = "{re.escape(str(dst))}"\n', out)
    stages = [re.sub(r" \(\d+\.\d s\)$", "", line) for line in err.splitlines()]
    assert stages == [  # not a terminal: a line at every quarter of the layers
        "reading the GGUF file...",
        "dequantizing layers 0/8",
        "dequantizing layers 2/8",
        "dequantizing layers 4/8",
        "dequantizing layers 6/8",
        "dequantizing layers 8/8",
        "quantizing and writing...",
    ]
    assert (dst / "model.bin").read_bytes() == b"float32"


def test_convert_progress_on_a_terminal_redraws_one_line() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = cli.ConvertProgress(stream, 0.0)
    for done in range(4):
        progress("layers", done, 3)
    lines = re.sub(r" \(\d+\.\d s\)", "", stream.getvalue())
    assert lines == "\rdequantizing layers 0/3\rdequantizing layers 1/3\rdequantizing layers 2/3\rdequantizing layers 3/3\n"
