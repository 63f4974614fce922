"""Set up the GPU run's Python with no registry: ``python3 bench/gpu/deps.py VENV [--bundle .gpu-bundle]``.

Run by ``bench/gpu/run.sh`` with the machine's own ``python3`` (the one that holds torch).  It

1. makes a virtual environment ``VENV`` that sees the machine's packages through a ``.pth`` line
   (``site.addsitedir`` of every site-packages folder of that python: its own ``.pth`` files
   count too), so what we install there comes first and nothing of the machine is changed;
2. installs the bundle's ``wheels/`` into it (``--no-index --no-deps``: every one was chosen by
   ``make gpu-bundle`` as missing there) and llm-pool itself, editable, exactly as
   ``make install`` lays it out (so ``python -m bench...`` from the repository works the same);
3. checks every requirement of llm-pool and of the carried wheels against what that python then
   sees, and installs a ``fallback/`` wheel (our lock's version) for each package whose version
   there does not satisfy it.  Prints one line per requirement it had to look at.

A requirement still unmet is printed as ``UNMET`` (the run goes on: it may not matter); an install
that fails ends it.  Standard library and ``packaging`` only (the machine has packaging); this
module must not import llm_pool.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import importlib.metadata as md, json, sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
roots = json.loads(sys.argv[1])
seen, out, todo = set(), [], [(r, "") for r in roots]
while todo:
    text, extra = todo.pop()
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": extra}):
        continue
    name = canonicalize_name(req.name)
    key = (name, str(req.specifier))
    if key in seen:
        continue
    seen.add(key)
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        out.append([name, str(req.specifier), None, False])
        continue
    ok = req.specifier.contains(dist.version, prereleases=True)
    out.append([name, str(req.specifier), dist.version, ok])
    for sub in dist.requires or []:
        todo.append((sub, ""))
    for e in req.extras:
        todo += [(sub, e) for sub in dist.requires or [] if "extra" in sub]
print(json.dumps(out))
"""


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd[:6]), "..." if len(cmd) > 6 else "", flush=True)
    subprocess.run(cmd, check=True)


def make_venv(target: Path) -> Path:
    """A venv whose site-packages come before the machine's (see the module docstring)."""
    venv.EnvBuilder(with_pip=False, clear=True).create(target)
    py = target / "bin" / "python"
    site_dir = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    import site

    machine = [p for p in site.getsitepackages() if Path(p).is_dir()]
    lines = [f"import site; site.addsitedir({p!r})" for p in machine]
    (Path(site_dir) / "_machine_site_packages.pth").write_text("\n".join(lines) + "\n")
    return py


def pip_install(py: Path, *args: str) -> None:
    run([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
         "--disable-pip-version-check", *args])


def check(py: Path, roots: list[str]) -> list[list[object]]:
    out = subprocess.run([str(py), "-c", CHECK, json.dumps(roots)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


#: What building llm-pool (SPDX license string) and the llama-cpp-python sdist need.
BUILD_TOOLS = ["setuptools>=77", "scikit-build-core>=0.9.2"]


def satisfy(py: Path, roots: list[str], fallback: dict[str, Path], skipped: set[str]) -> list[list[object]]:
    """Install a fallback wheel for each unmet requirement of ``roots``; the requirements still unmet."""
    bad = [r for r in check(py, roots) if not r[3] and r[0] not in skipped]
    fix = [str(fallback[name]) for name, *_ in bad if name in fallback]
    for name, spec, version, _ in bad:
        print(f"deps: {name} {version or 'missing'} does not satisfy {spec or 'any'}"
              + ("; installing our lock's version" if name in fallback else ""), flush=True)
    if not fix:
        return bad
    pip_install(py, "--ignore-installed", *fix)
    return [r for r in check(py, roots) if not r[3] and r[0] not in skipped]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("venv", type=Path)
    parser.add_argument("--bundle", type=Path, default=ROOT / ".gpu-bundle")
    args = parser.parse_args()
    py = make_venv(args.venv)
    wheels = sorted(str(p) for p in (args.bundle / "wheels").glob("*.whl"))
    pip_install(py, "--ignore-installed", *wheels)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    fallback = {p.name.split("-")[0].lower().replace("_", "-"): p for p in (args.bundle / "fallback").glob("*.whl")}
    skipped = set(manifest["wheels"].get("skipped", {}))  # left behind on purpose (make_bundle.SKIP)
    # the build tools first: the editable install below needs them
    satisfy(py, BUILD_TOOLS, fallback, skipped)
    pip_install(py, "--no-build-isolation", "-e", str(ROOT))
    carried = manifest["wheels"]["carried"]
    roots = ["llm-pool"] + [f"{n}=={v}" for n, v in carried.items()] + BUILD_TOOLS
    bad = satisfy(py, roots, fallback, skipped)
    for name, spec, version, _ in bad:
        print(f"deps: UNMET {name}{spec} (found {version or 'nothing'})", flush=True)
    print(f"deps: {len(wheels)} wheels + llm-pool (editable) in {args.venv}; "
          f"{'all requirements met' if not bad else f'{len(bad)} unmet'}", flush=True)


if __name__ == "__main__":
    main()
