"""Private detail stays behind the admin token (issue 13 §4).

A load error often names files (``model_path '…': no such file or directory: /srv/…``): the
admin API shows it whole, but an inference caller's 409 ``model_failed`` and the unauthenticated
readiness probes name no filesystem path.  And ``last_error`` is always one printable line of
bounded length, whatever bytes the runtime put in its exception (a random ``model.bin``)."""

from __future__ import annotations

import trio
from support.fake_backend import FakeBackendFactory
from support.replies import assert_error
from support.server import start_pool

from llm_pool.pool.errors import ERROR_TEXT_MAX, printable, without_paths

CATALOG = {"m": {"model_path": "m.gguf"}, "g": {"model_path": "g.gguf"}}
PATH_ERROR = (
    "model_path 'models/g.gguf': no such file or directory: /srv/llm/models/g.gguf "
    "(also tried '~/weights/g.gguf' and /home/ann/g.gguf)"
)


def test_without_paths_keeps_urls_and_words() -> None:
    assert without_paths(PATH_ERROR) == (
        "model_path '[path]': no such file or directory: [path] (also tried '[path]' and [path])"
    )
    kept = "cannot connect to the upstream at http://127.0.0.1:8080/v1: ConnectError: 3/4 tries"
    assert without_paths(kept) == kept
    assert without_paths("/") == "[path]"


def test_printable_is_one_bounded_line() -> None:
    binary = bytes(range(256)).decode("latin-1") * 2 + "\ufffd" * 40
    text = printable(f"bad model.bin: {binary} end\nsecond line")
    assert text.isprintable() and len(text) <= ERROR_TEXT_MAX, text
    assert text.startswith("bad model.bin: [32 unprintable characters] !\"#$%&'()*+,-./0123")
    assert "end second line" not in text  # cut: the garbage is long
    assert printable("short\n\ttext") == "short text"
    assert printable("x" * 1000) == "x" * (ERROR_TEXT_MAX - 1) + "…"


async def test_model_failed_names_no_path_outside_the_admin_api(
    nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    control.configure("g", fail_load=PATH_ERROR)
    with trio.fail_after(10):
        pool = await start_pool(nursery, control, models=CATALOG)
        assert pool.manager.entries["g"].state == "failed"
        public = "model_path '[path]': no such file or directory: [path] (also tried '[path]' and [path])"
        for body in ({"model": "g", "input": "x"}, {"model": "g", "input": "x", "stream": True}):
            assert_error(
                await pool.respond(body), 409, "model_failed", f"model 'g' failed to load: {public}", model="g"
            )
        chat = {"model": "g", "messages": [{"role": "user", "content": "x"}]}
        assert_error(
            await pool.post("/v1/chat/completions", chat),
            409,
            "model_failed",
            f"model 'g' failed to load: {public}",
            model="g",
        )
        ready = await pool.get("/health/ready")
        one = await pool.get("/health/ready/g")
        row = (await pool.get("/v1/admin/models/g")).json
        load = await pool.post("/v1/admin/models/g/load")
    assert ready.status == 503 and ready.json["not_ready"][0]["last_error"] == public
    assert one.status == 503 and one.json["last_error"] == public
    for reply in (ready, one):
        assert b"/srv/" not in reply.raw and b"/home/" not in reply.raw
    # the admin API keeps the detail
    assert row["last_error"] == PATH_ERROR
    assert_error(load, 500, "model_load_failed", f"model 'g' failed to load: {PATH_ERROR}", model="g")


async def test_binary_in_a_load_error_becomes_a_printable_bounded_last_error(
    nursery: trio.Nursery, control: FakeBackendFactory
) -> None:
    garbage = bytes(range(256)).decode("latin-1") + "".join(chr(0xDC80 + b) for b in range(128)) + "\ufffd" * 30
    control.configure("g", fail_load=f"unreadable model.bin header {garbage!s}")
    with trio.fail_after(10):
        pool = await start_pool(nursery, control, models=CATALOG)
        row = (await pool.get("/v1/admin/models/g")).json
        listed = (await pool.get("/v1/admin/models")).json["models"]
    error = row["last_error"]
    assert error.startswith("unreadable model.bin header [32 unprintable characters] !\"#$%&'()*+,-./0123"), error
    assert error.isprintable() and len(error) <= ERROR_TEXT_MAX, error
    assert next(r for r in listed if r["name"] == "g")["last_error"] == error
    assert pool.manager.entries["g"].last_error == error
