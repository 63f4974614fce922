"""The settings contract (issue 2 §3): strict schema, file + key path in every error, the local
file merged deeply over the shipped one, the two path variables, ``pkg:`` model paths, and a
missing model file failing only its own model at load."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from support.fake_backend import FakeBackend, FakeBackendFactory
from support.replies import assert_error
from support.server import start_pool

from llm_pool.backends import create_backend
from llm_pool.config import SettingsError, load_settings, resolve_model_path, settings_paths

BASE = """
[engine.models.m]
model_path = "m.gguf"
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def error_of(path: Path | None = None) -> str:
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    return str(info.value)


# ------------------------------------------------------------------ strict schema
def test_unknown_model_key_names_file_and_key_path(tmp_path: Path) -> None:
    main = write(tmp_path / "pool.toml", BASE + "replicaz = 2\n")
    assert error_of(main) == f"{main}: $.engine.models.m.replicaz: unknown field"


def test_unknown_key_in_a_quoted_model_name(tmp_path: Path) -> None:
    main = write(tmp_path / "pool.toml", '[engine.models."qwen3.5-9b"]\nmodel_path = "q.gguf"\ngguf_n_ctxx = 4\n')
    assert error_of(main) == (
        f'{main}: $.engine.models."qwen3.5-9b".gguf_n_ctxx: unknown field'
    )


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[service]\nprot = 8000\n", "$.service.prot: unknown field"),
        ("[engine]\nbakend = 'gguf'\n", "$.engine.bakend: unknown field"),
        ("[engine.decoding]\ntopk = 3\n", "$.engine.decoding.topk: unknown field"),
        ("[servce]\nport = 1\n", "$.servce: unknown field"),
        ("base_dir = '/'\n", "$.base_dir: unknown field"),
    ],
)
def test_unknown_keys_anywhere(tmp_path: Path, toml: str, message: str) -> None:
    main = write(tmp_path / "pool.toml", toml + BASE)
    assert error_of(main) == f"{main}: {message}"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[service]\nport = '80'\n", "$.service.port: expected an integer from 0 to 65535"),
        ("[service]\nport = 70000\n", "$.service.port: expected an integer from 0 to 65535"),
        ("[engine.decoding]\ntop_k = 0\n", "$.engine.decoding.top_k: expected an integer from 1 to 200"),
        ("[engine.decoding]\nstop = 'x'\n", "$.engine.decoding.stop: expected a list of at most 16 items"),
        ("[engine]\nbackend = 'vllm'\n", "$.engine.backend: expected one of \"ct2\", \"exllamav3\", \"gguf\", \"llama_server\", \"openai_compatible\", \"vllm_serve\""),
    ],
)
def test_wrong_types_and_values(tmp_path: Path, toml: str, message: str) -> None:
    main = write(tmp_path / "pool.toml", toml + BASE)
    assert error_of(main) == f"{main}: {message}"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("replicas = '2'", "$.engine.models.m.replicas: expected \"auto\" or an integer >= 1"),
        ("enabled = 'yes'", "$.engine.models.m.enabled: expected true or false"),
        ("gguf_flash_attn = 'maybe'", "$.engine.models.m.gguf_flash_attn: expected one of \"auto\", \"off\", \"on\""),
        ("backend = 'exllamav3'\nexllama_cache_size = 300", "$.engine.models.m.exllama_cache_size: expected an integer >= 256 (a multiple of 256)"),
        ("exllama_cache_size = 512", "$.engine.models.m.exllama_cache_size: unknown field"),  # not a gguf field
        ("replicas = 0", "$.engine.models.m.replicas: expected \"auto\" or an integer >= 1"),
    ],
)
def test_wrong_model_values_name_the_model(tmp_path: Path, line: str, message: str) -> None:
    main = write(tmp_path / "pool.toml", BASE + line + "\n")
    assert error_of(main) == f"{main}: {message}"


def test_replicas_above_replica_max(tmp_path: Path) -> None:
    main = write(tmp_path / "pool.toml", BASE + "replicas = 3\nreplica_max = 2\n")
    assert error_of(main) == (
        f"{main}: $.engine.models.m.replicas: model 'm' has replicas=3 greater than replica_max=2"
    )


@pytest.mark.parametrize("backend", ["gguf", "ct2", "exllamav3"])
def test_local_model_needs_model_path(tmp_path: Path, backend: str) -> None:
    main = write(tmp_path / "pool.toml", f"[engine.models.m]\nbackend = '{backend}'\n")
    assert error_of(main) == (
        f"{main}: $.engine.models.m.model_path: model 'm' needs model_path for backend {backend}"
    )


def test_engine_backend_is_the_default_for_model_path_check(tmp_path: Path) -> None:
    main = write(tmp_path / "pool.toml", "[engine]\nbackend = 'ct2'\n[engine.models.m]\nreplicas = 1\n")
    assert "needs model_path for backend ct2" in error_of(main)


def test_remote_model_needs_no_model_path_but_its_url_and_model(tmp_path: Path) -> None:
    ok = write(
        tmp_path / "pool.toml",
        "[engine.models.r]\nbackend = 'openai_compatible'\nremote_base_url = 'http://127.0.0.1:9/v1'\nremote_model = 'x'\n",
    )
    assert load_settings(ok).engine.models["r"].model_path is None
    bad = write(tmp_path / "bad.toml", "[engine.models.r]\nbackend = 'openai_compatible'\nremote_model = 'x'\n")
    assert error_of(bad) == (
        f"{bad}: $.engine.models.r.remote_base_url: model 'r' needs remote_base_url for backend openai_compatible"
    )


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    main = write(tmp_path / "pool.toml", "[service\n")
    assert error_of(main).startswith(f"{main}: invalid TOML: ")
    assert error_of(tmp_path / "nope.toml") == f"settings file not found: {tmp_path / 'nope.toml'}"


# ------------------------------------------------------------------ local file and paths
MAIN = """
[service]
host = "127.0.0.1"
port = 8000

[engine.decoding]
top_k = 1
temperature = 0.1
stop = ["a", "b"]

[engine.models.m]
model_path = "m.gguf"
replicas = 1
replica_max = 2
prompt_format = "generic"
"""

LOCAL = """
[service]
port = 9000

[engine.decoding]
temperature = 0.5
stop = ["z"]

[engine.models.m]
replicas = 2

[engine.models.extra]
model_path = "extra.gguf"
enabled = false
"""


def test_local_file_merges_deeply_and_wins(tmp_path: Path) -> None:
    main = write(tmp_path / "pool.toml", MAIN)
    write(tmp_path / "pool.local.toml", LOCAL)
    s = load_settings(main)
    assert (s.service.host, s.service.port) == ("127.0.0.1", 9000)
    assert (s.engine.decoding.top_k, s.engine.decoding.temperature) == (1, 0.5)
    assert s.engine.decoding.stop == ["z"]  # arrays are values: replaced, not concatenated
    m = s.engine.models["m"]
    assert (m.model_path, m.replicas, m.replica_max, m.prompt_format) == ("m.gguf", 2, 2, "generic")
    assert list(s.engine.models) == ["m", "extra"]
    assert s.engine.models["extra"].enabled is False


def test_errors_in_the_merge_name_both_files(tmp_path: Path) -> None:
    main = write(tmp_path / "pool.toml", MAIN)
    local = write(tmp_path / "pool.local.toml", "[engine.models.m]\nreplicas = 3\n")
    assert error_of(main) == (
        f"{main} (merged with {local}): $.engine.models.m.replicas: model 'm' has replicas=3 greater than replica_max=2"
    )


def test_missing_local_file_means_no_overrides(tmp_path: Path) -> None:
    main = write(tmp_path / "pool.toml", MAIN)
    s = load_settings(main)
    assert s.service.port == 8000 and s.engine.models["m"].replicas == 1


def test_settings_path_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    main = write(tmp_path / "a" / "custom.toml", MAIN)
    write(tmp_path / "a" / "pool.local.toml", "[service]\nport = 1111\n")  # beside main
    other_local = write(tmp_path / "b" / "mine.toml", "[service]\nport = 2222\n")
    monkeypatch.chdir(tmp_path)  # no ./pool.toml here

    monkeypatch.setenv("LLM_POOL_SETTINGS_PATH", str(main))
    assert settings_paths().main == main
    assert load_settings().service.port == 1111  # the local file beside the main one

    monkeypatch.setenv("LLM_POOL_LOCAL_SETTINGS_PATH", str(other_local))
    assert settings_paths() == type(settings_paths())(main=main, local=other_local)
    assert load_settings().service.port == 2222

    monkeypatch.setenv("LLM_POOL_LOCAL_SETTINGS_PATH", str(tmp_path / "b" / "absent.toml"))
    assert load_settings().service.port == 8000  # a missing local file: no overrides

    # an explicit path (--config) wins over the variable
    explicit = write(tmp_path / "b" / "explicit.toml", MAIN.replace("port = 8000", "port = 3333"))
    monkeypatch.delenv("LLM_POOL_LOCAL_SETTINGS_PATH")
    assert load_settings(explicit).service.port == 3333


def test_relative_model_paths_resolve_beside_the_main_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    main = write(tmp_path / "conf" / "pool.toml", MAIN)
    (tmp_path / "conf" / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    s = load_settings(main)
    assert resolve_model_path(s, s.engine.models["m"]) == (tmp_path / "conf" / "m.gguf").resolve()


# ------------------------------------------------------------------ pkg: model paths
def test_pkg_model_path_found_without_importing_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "llmpool_testpkg_weights"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    main = write(tmp_path / "pool.toml", "[engine.models.m]\nmodel_path = 'pkg:llmpool_testpkg_weights/tiny.gguf'\n")
    s = load_settings(main)
    assert resolve_model_path(s, s.engine.models["m"]) == pkg / "tiny.gguf"

    s2 = load_settings(write(tmp_path / "p2.toml", "[engine.models.m]\nmodel_path = 'pkg:llmpool_testpkg_weights/gone.gguf'\n"))
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path(s2, s2.engine.models["m"])
    assert str(info.value) == (
        f"model_path 'pkg:llmpool_testpkg_weights/gone.gguf': no such file or directory: {pkg / 'gone.gguf'}"
    )

    s3 = load_settings(write(tmp_path / "p3.toml", "[engine.models.m]\nmodel_path = 'pkg:no_such_pkg_llmpool/x.gguf'\n"))
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path(s3, s3.engine.models["m"])
    assert str(info.value) == "model_path 'pkg:no_such_pkg_llmpool/x.gguf': Python package 'no_such_pkg_llmpool' is not installed"


# ------------------------------------------------------------------ a missing model file at load
async def test_missing_model_file_fails_only_that_model(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Real clock: the ``missing`` model uses the real GGUF backend (a real worker thread)."""
    control = FakeBackendFactory.echo()

    def factory(ctx):  # type: ignore[no-untyped-def]
        return create_backend(ctx) if ctx.name == "missing" else FakeBackend(ctx, control)

    raw = {
        "engine": {
            "models": {
                "good": {"model_path": "good.gguf"},
                "missing": {"model_path": "nowhere/missing.gguf", "backend": "gguf"},
            }
        }
    }
    with trio.fail_after(20):
        pool = await start_pool(nursery, control, raw, base_dir=tmp_path, factory=factory)
        assert pool.manager.entries["good"].state == "loaded"
        missing = pool.manager.entries["missing"]
        assert missing.state == "failed"
        expected = f"model_path 'nowhere/missing.gguf': no such file or directory: {tmp_path / 'nowhere' / 'missing.gguf'}"
        assert missing.last_error == expected

        ok = await pool.respond({"model": "good", "input": "still serving"})
        assert ok.status == 200 and ok.json["output_text"] == "still serving"
        assert_error(
            await pool.respond({"model": "missing", "input": "x"}),
            409,
            "model_failed",
            # an inference caller is told no path (issue 13 §4); the admin row below has them
            "model 'missing' failed to load: model_path '[path]': no such file or directory: [path]",
            model="missing",
        )
        assert (await pool.get("/v1/models")).json["models"] == ["good"]
        row = next(r for r in (await pool.get("/v1/admin/models")).json["models"] if r["name"] == "missing")
        assert (row["runtime_state"], row["is_loaded"], row["last_error"]) == ("failed", False, expected)

