"""One import name: the wheel holds ``llm_pool/`` alone, and nothing generic can shadow it.

Before, the distribution installed four generic top-level packages (``pool``, ``backends``,
``admin``, ``config``): a user's own ``config.py`` in the working directory shadowed ours.  These
tests build the real wheel and run the real console script from a folder full of such names.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import trio
from support.server_process import ServerLog, open_serve

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 60


def test_the_wheel_holds_llm_pool_alone(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("llm_pool-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/", 1)[0] for name in names}
    assert tops == {"llm_pool", "llm_pool-0.1.0.dist-info"}
    for module in ("llm_pool/pool/server.py", "llm_pool/config/settings.py", "llm_pool/admin/static/index.html"):
        assert module in names


def test_the_installed_package_has_no_import_cycle(tmp_path: Path) -> None:
    """import-linter's layers contract (make lint) forbids imports upward between layers; this
    checks what it cannot: no cycle at all, inside a layer's package too (grimp's graph of the
    installed copy; function-level imports count)."""
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(ROOT)],
        check=True,
        capture_output=True,
    )
    script = (
        "import grimp, json, sys\n"
        "g = grimp.build_graph('llm_pool')\n"
        "seen = {m: g.find_modules_directly_imported_by(m) for m in g.modules}\n"
        "print(json.dumps({m: sorted(d) for m, d in seen.items()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=site, env={"PYTHONPATH": str(site)}, check=True,
                         capture_output=True, text=True).stdout
    graph: dict[str, list[str]] = json.loads(out)
    assert len(graph) > 30  # the real package, not an empty namespace
    assert cycles_in(graph) == []


def cycles_in(graph: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def shadowing_folder(folder: Path) -> None:
    """Generic names that explode when imported, as a user's project might hold them."""
    boom = "raise SystemExit('a generic module shadowed llm-pool')\n"
    (folder / "config.py").write_text(boom)
    for package in ("pool", "admin", "backends"):
        (folder / package).mkdir()
        (folder / package / "__init__.py").write_text(boom)
    (folder / "pool.toml").write_text('[service]\nhost = "127.0.0.1"\nport = 0\n')


async def test_serve_from_a_folder_with_its_own_config_pool_and_admin(tmp_path: Path) -> None:
    shadowing_folder(tmp_path)
    script = Path(sys.executable).with_name("llm-pool")  # the console script, not python -m
    log = ServerLog()
    with trio.fail_after(LIMIT_S):
        proc = await open_serve(Path("pool.toml"), command=[str(script)], cwd=tmp_path)  # relative, as a user types it
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(log.read, proc)
                url = (await log.wait_for("serving"))["urls"][0]
                async with httpx.AsyncClient(base_url=url) as client:
                    assert (await client.get("/health/live")).json() == {"status": "live"}
                    assert (await client.get("/v1/models")).json()["models"] == []
                proc.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
