"""``make gpu-bundle``: build ``.gpu-bundle/``, everything the GPU run needs and the GPU machine lacks.

The GPU machine (bench/gpu/README.md) has Python 3.12 with torch, CUDA's nvcc, cmake and ninja, but
no package registry and no internet, and at most 64 MiB travels with the working tree.  So this
script, run here (it needs the registry), prepares what must travel:

* ``wheels/``: cp312 manylinux x86-64 wheels of every package the run imports that is NOT in
  ``bench/gpu/image-packages.txt`` (the machine's installed packages), found by walking the
  ``Requires-Dist`` of each carried wheel from :data:`ROOTS`, at the versions of our lock
  (``requirements/pool.txt``, hash-checked) or of :data:`EXTRA_PINS`.
* ``fallback/``: pure-Python wheels, at our lock's versions, of the packages the run needs that
  the machine does have.  Their versions there are unknown until the run: ``bench/gpu/deps.py``
  installs one of these only where the machine's version does not satisfy what we require.
* ``llama_cpp_python-<v>-trimmed.tar.gz``: the pinned llama-cpp-python sdist (hash-checked) minus
  what a library build never reads (:data:`TRIM`): llama.cpp's models, docs, examples, tests...
  ``run.sh`` builds it there with ``-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90``.
* ``manifest.json``: every file with its size and sha256, and the total.

It fails if the bundle and the tracked tree together exceed :data:`LIMIT_BYTES`.  This module
must not import llm_pool: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import email.parser
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / ".gpu-bundle"
SDIST_CACHE = Path.home() / ".cache" / "llm-pool" / "sdist"
#: What the device tool lets travel (working tree + carried paths), with 2 MiB kept spare for
#: files a session adds before it calls the machine.
LIMIT_BYTES = 64 * 1024 * 1024
SPARE_BYTES = 2 * 1024 * 1024

#: The machine's interpreter, for evaluating dependency markers (python3 there is 3.12.3).
TARGET_ENV = default_environment() | {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
#: pip download's view of the machine: every manylinux tag a cp312 x86-64 wheel may carry (pip
#: matches each ``manylinux_2_N`` exactly, so they are all named).
PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(5, 40)]

#: What the GPU run imports, besides llm-pool's own dependencies (read from pyproject.toml):
#: the test runner's trio plugin, the GGUF writer the model generators use, llama-cpp-python's
#: runtime dependencies (the library itself is built there from the sdist), and exllamav3.
ROOTS = ["pytest-trio", "gguf", "typing-extensions>=4.5.0", "numpy>=1.20.0", "diskcache>=5.6.1", "exllamav3==1.6.5"]
#: Versions (and sha256 of the cp312 / pure wheel) of what the run needs that our lock does not
#: hold: exllamav3 is an optional extra outside the lock; marisa-trie is one of its dependencies.
EXTRA_PINS = {
    "exllamav3": ("1.6.5", "550c0d04c755f249840e5c1edc26b0e80c7342c33b5d99ad17479abb407e8ded"),
    "marisa-trie": ("1.4.1", "4d51bdd22a7238ef4d681effd7c224a267ddae054b64b1cec9ce95bbcd2b6a88"),
}
#: Build tools the machine has at versions we cannot see: llm-pool's editable install needs
#: setuptools >= 77 (an SPDX ``license`` string) and the llama-cpp-python sdist
#: scikit-build-core >= 0.9.2.  Carried as fallbacks; deps.py installs one only if needed.
BUILD_FALLBACKS = {
    "setuptools": None,  # our lock's version
    "scikit-build-core": ("1.1.2", "7f4f959a467692db50bdd1ea7ce1507f2c7972e6023b753ee302d169bc4cec85"),
}
#: Declared dependencies we leave behind, and why.
SKIP = {
    # exllamav3 imports it only inside its grammar filter (generator/filter/llguidance.py), which
    # llm-pool never uses; the wheel is a large Rust extension.
    "llguidance": "imported only by exllamav3's grammar filter, unused by llm-pool",
}
#: Parts of the llama-cpp-python sdist a CUDA library build never reads: the git history (38 MB;
#: llama.cpp's build info falls back to "unknown"), everything vendor/llama.cpp adds only when
#: standalone (tests, examples, tools, server; LLAVA_BUILD=OFF skips mtmd), and the ggml backends
#: other than CPU, CUDA, BLAS and RPC (each is added only when its GGML_<NAME> option is on).
OTHER_GGML_BACKENDS = ["cann", "et", "hexagon", "hip", "metal", "musa", "opencl", "openvino", "sycl", "virtgpu",
                       "vulkan", "webgpu", "zdnn", "zendnn"]
TRIM = [
    ".git", "vendor/llama.cpp/.git", "docs", "examples", "tests", "docker", "scripts",
    "vendor/llama.cpp/models", "vendor/llama.cpp/docs", "vendor/llama.cpp/examples",
    "vendor/llama.cpp/tests", "vendor/llama.cpp/benches", "vendor/llama.cpp/media",
    "vendor/llama.cpp/tools", "vendor/llama.cpp/pocs", "vendor/llama.cpp/gguf-py",
    "vendor/llama.cpp/conversion", "vendor/llama.cpp/scripts", "vendor/llama.cpp/skills",
    "vendor/llama.cpp/ci", "vendor/llama.cpp/app", "vendor/llama.cpp/requirements",
    "vendor/llama.cpp/grammars", "vendor/llama.cpp/licenses",
] + [f"vendor/llama.cpp/ggml/src/ggml-{b}" for b in OTHER_GGML_BACKENDS]


# ------------------------------------------------------------------------------------ the lock
def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """``name -> (version, sha256 hashes)`` of a uv/pip-compile lock, its markers evaluated for
    the machine's Python (the lock pins numpy twice, for <3.12 and >=3.12)."""
    pins: dict[str, tuple[str, list[str]]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = [p.strip() for p in line.split("--hash=sha256:")]
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate(TARGET_ENV):
            continue
        (version,) = [s.version for s in req.specifier]
        pins[canonicalize_name(req.name)] = (version, [h.split()[0] for h in hashes])
    return pins


def image_packages() -> set[str]:
    lines = (ROOT / "bench/gpu/image-packages.txt").read_text().splitlines()
    return {canonicalize_name(n) for n in lines if n.strip() and not n.startswith("#")}


def project_requirements() -> list[str]:
    import tomllib

    return list(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


# --------------------------------------------------------------------------------- downloading
def pip_download(pins: dict[str, tuple[str, list[str]]], names: list[str], dest: Path) -> None:
    """Download exactly these pinned wheels for the machine (cp312, manylinux x86-64), hash-checked."""
    if not names:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for name in names:
            version, hashes = pins[name]
            f.write(f"{name}=={version} " + " ".join(f"--hash=sha256:{h}" for h in hashes) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none"]
    cmd += [a for p in PLATFORMS for a in ("--platform", p)] + ["-d", str(dest), "-r", f.name]
    try:
        subprocess.run(cmd, check=True, stderr=subprocess.PIPE, text=True)
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"pip download failed for {names}:\n{e.stderr[-3000:]}") from None
    finally:
        os.unlink(f.name)


def wheel_of(dest: Path, name: str) -> Path:
    want = canonicalize_name(name)
    for path in dest.glob("*.whl"):
        if canonicalize_name(path.name.split("-")[0]) == want:
            return path
    raise SystemExit(f"no wheel of {name} in {dest}")


def wheel_requires(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode())
    return msg.get_all("Requires-Dist") or []


def needed(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(TARGET_ENV | {"extra": e}) for e in (extras or {""}))


# ------------------------------------------------------------------------------------- closure
def collect_wheels(dest: Path, fallback: Path) -> dict[str, object]:
    """Walk the run's requirements; download what the machine lacks and our fallbacks for the rest."""
    lock = read_lock(ROOT / "requirements/pool.txt")
    pins = lock | {k: (v, [h]) for k, (v, h) in EXTRA_PINS.items()}
    image = image_packages()
    carried: dict[str, str] = {}  # name -> version
    on_image: dict[str, set[str]] = {}  # name -> the specifiers the run asks of it
    skipped: dict[str, str] = {}
    todo: list[tuple[Requirement, set[str]]] = [(Requirement(r), set()) for r in project_requirements() + ROOTS]
    while todo:
        batch: dict[str, set[str]] = {}
        for req, extras in todo:
            if not needed(req, extras):
                continue
            name = canonicalize_name(req.name)
            if name in SKIP:
                skipped[name] = SKIP[name]
            elif name in image:
                on_image.setdefault(name, set()).add(str(req.specifier))
            elif name not in carried:
                if name not in pins:
                    raise SystemExit(f"{name} is needed on the GPU machine but neither locked nor in EXTRA_PINS")
                if not req.specifier.contains(pins[name][0], prereleases=True):
                    raise SystemExit(f"{req} is needed but our pin is {name}=={pins[name][0]}")
                batch.setdefault(name, set()).update(req.extras)
        pip_download(pins, sorted(batch), dest)
        todo = []
        for name, extras in batch.items():
            carried[name] = pins[name][0]
            todo += [(Requirement(r), extras) for r in wheel_requires(wheel_of(dest, name))]
    # Fallbacks: pure-Python lock versions of the machine's packages we depend on (numpy, tokenizers
    # and the like are compiled and shared with torch: never shadowed).
    pure = [n for n in sorted(on_image) if n in lock]
    build = {n: (pin[0], [pin[1]]) if pin else lock[n] for n, pin in BUILD_FALLBACKS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        pip_download(lock, pure, tmpdir)
        pip_download(build, sorted(build), tmpdir)
        for path in tmpdir.glob("*.whl"):
            if path.name.endswith("-py3-none-any.whl") or path.name.endswith("-py2.py3-none-any.whl"):
                shutil.move(str(path), fallback / path.name)
    return {"carried": carried, "on_image": {k: sorted(v) for k, v in on_image.items()}, "skipped": skipped,
            "build_fallbacks": {n: v for n, (v, _) in build.items()}}


# --------------------------------------------------------------------------------------- sdist
def llama_sdist() -> Path:
    """The pinned sdist of requirements/llama.txt, downloaded once into a cache, hash-checked."""
    (pin,) = [p for p in read_lock(ROOT / "requirements/llama.txt").items()]
    name, (version, hashes) = pin
    path = SDIST_CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not path.exists() or sha256(path) not in hashes:
        SDIST_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary=:all:", "--require-hashes",
             "-d", str(SDIST_CACHE), "-r", str(ROOT / "requirements/llama.txt")],
            check=True,
        )
    if sha256(path) not in hashes:
        raise SystemExit(f"{path}: sha256 does not match requirements/llama.txt")
    return path


def trim_sdist(src: Path, dest: Path) -> dict[str, object]:
    """Copy the sdist into ``dest`` without the :data:`TRIM` folders (same top folder name)."""
    dropped = 0
    # gzip with mtime 0: the same sdist gives the same bytes (the dry run caches its build by hash)
    with tarfile.open(src) as tin, dest.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as tout:
        for member in tin:
            parts = member.name.split("/", 1)
            rel = parts[1] if len(parts) > 1 else ""
            if any(rel == t or rel.startswith(t + "/") for t in TRIM):
                dropped += member.size
                continue
            data = tin.extractfile(member) if member.isfile() else None
            tout.addfile(member, io.BytesIO(data.read()) if data else None)
    return {"source": src.name, "source_sha256": sha256(src), "trimmed": TRIM, "bytes_dropped": dropped}


# --------------------------------------------------------------------------------------- sizes
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tracked_bytes() -> int:
    """Bytes of the tracked and untracked-not-ignored files: what travels besides the bundle."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode()
    return sum((ROOT / p).stat().st_size for p in out.split("\0") if p and (ROOT / p).is_file())


def bundle_bytes(bundle: Path = BUNDLE) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=BUNDLE)
    args = parser.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    (out / "wheels").mkdir(parents=True)
    (out / "fallback").mkdir()
    manifest: dict[str, object] = {"target": "cp312 manylinux x86_64 (python 3.12.3), no registry"}
    manifest["wheels"] = collect_wheels(out / "wheels", out / "fallback")
    src = llama_sdist()
    version = re.search(r"-(\d[^-]*)\.tar\.gz$", src.name).group(1)  # type: ignore[union-attr]
    manifest["llama_cpp_python"] = trim_sdist(src, out / f"llama_cpp_python-{version}-trimmed.tar.gz")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    manifest["files"] = {str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files}
    total, tree = bundle_bytes(out), tracked_bytes()
    manifest["bundle_bytes"], manifest["tree_bytes"] = total, tree
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    mib = 1024 * 1024
    print(f"{out}: {len(files)} files, {total / mib:.1f} MiB; with the tracked tree ({tree / mib:.1f} MiB): "
          f"{(total + tree) / mib:.1f} MiB of {LIMIT_BYTES / mib:.0f} MiB")
    for name, version in sorted(manifest["wheels"]["carried"].items()):  # type: ignore[index]
        print(f"  carried: {name}=={version}")
    if total + tree > LIMIT_BYTES - SPARE_BYTES:
        raise SystemExit(f"the bundle is too large: {(total + tree) / mib:.1f} MiB > {(LIMIT_BYTES - SPARE_BYTES) / mib:.0f} MiB")


if __name__ == "__main__":
    main()
