"""What the GPU run (bench/gpu/, issue 20) needs from this CPU machine: a bundle that fits what
travels, and model generators whose files load.

The bundle is built by ``make gpu-bundle`` (it needs the package registry); where it was not
built, its tests skip with that reason.  The generators run at tiny shapes here (the random
1B-shape GGUF is 1.3 GB): each file is loaded by the library that will read it there.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.gpu import make_bundle, models  # noqa: E402
from bench.gpu.cuda_gguf import _all_layers_on_gpu  # noqa: E402

BUNDLE = ROOT / ".gpu-bundle"
MIB = 1024 * 1024
TINY_GGUF = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_head_kv": 2, "n_ff": 128, "n_vocab": 512}


@pytest.fixture(scope="module")
def manifest() -> dict[str, object]:
    if not (BUNDLE / "manifest.json").exists():
        pytest.skip("the GPU bundle was not built here (make gpu-bundle; it needs the package registry)")
    return json.loads((BUNDLE / "manifest.json").read_text())


# ------------------------------------------------------------------------------------ bundle
def test_bundle_and_tree_fit_in_what_travels(manifest: dict[str, object]) -> None:
    total = make_bundle.bundle_bytes(BUNDLE) + make_bundle.tracked_bytes()
    assert total <= make_bundle.LIMIT_BYTES - make_bundle.SPARE_BYTES, f"{total / MIB:.1f} MiB"


def test_manifest_lists_every_file_as_it_is(manifest: dict[str, object]) -> None:
    files = manifest["files"]
    assert isinstance(files, dict)
    on_disk = {str(p.relative_to(BUNDLE)) for p in BUNDLE.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk
    for name, entry in files.items():
        assert (BUNDLE / name).stat().st_size == entry["bytes"], name


def test_bundle_carries_what_the_machine_lacks_and_nothing_it_has(manifest: dict[str, object]) -> None:
    wheels = manifest["wheels"]
    assert isinstance(wheels, dict)
    carried = set(wheels["carried"])
    assert {"trio", "quart-trio", "hypercorn", "msgspec", "pytest-trio", "gguf", "diskcache", "exllamav3"} <= carried
    assert not carried & make_bundle.image_packages()
    for path in (BUNDLE / "wheels").glob("*.whl"):
        tags = path.name[:-4].split("-")[-3:]
        assert tags[0] in ("py3", "py2.py3", "cp312"), path.name
        assert tags[2] == "any" or "x86_64" in tags[2], path.name


def test_trimmed_sdist_keeps_the_cuda_build_and_drops_the_rest(manifest: dict[str, object]) -> None:
    (sdist,) = BUNDLE.glob("llama_cpp_python-*-trimmed.tar.gz")
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    assert "CMakeLists.txt" in names and "pyproject.toml" in names
    assert "vendor/llama.cpp/ggml/src/ggml-cuda/CMakeLists.txt" in names
    assert any(n.startswith("vendor/llama.cpp/ggml/src/ggml-cuda/template-instances/") for n in names)
    for gone in ("vendor/llama.cpp/models/", "vendor/llama.cpp/docs/", "vendor/llama.cpp/tests/", ".git/"):
        assert not any(n.startswith(gone) for n in names), gone


# ------------------------------------------------------------------------------ the closure
def test_the_lock_is_read_for_the_machines_python() -> None:
    lock = make_bundle.read_lock(ROOT / "requirements/pool.txt")
    assert lock["trio"][1], "hashes are kept"
    # numpy is pinned twice, by Python version: the machine's is 3.12
    numpy = [line for line in (ROOT / "requirements/pool.txt").read_text().splitlines() if line.startswith("numpy==")]
    assert any(">= '3.12'" in line and lock["numpy"][0] in line for line in numpy)


def test_cuda_plugin_puts_every_gguf_layer_on_the_gpu_unless_told() -> None:
    raw = {"engine": {"models": {
        "a": {"model_path": "a.gguf"},
        "b": {"model_path": "b.gguf", "gguf_n_gpu_layers": 3},
        "c": {"model_path": "c", "backend": "ct2"},
    }}}
    models_ = _all_layers_on_gpu(raw)["engine"]["models"]
    assert [m.get("gguf_n_gpu_layers") for m in models_.values()] == [-1, 3, None]
    assert raw["engine"]["models"]["a"] == {"model_path": "a.gguf"}  # the caller's mapping is untouched


def test_run_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "bench/gpu/run.sh")], check=True)


# ------------------------------------------------------------------------------ generators
@pytest.mark.parametrize("qtype", ["q8_0", "f16"])
def test_random_llama_gguf_loads_and_generates_exactly_n_tokens(tmp_path: Path, qtype: str) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make install`)")
    path = models.write_random_llama_gguf(tmp_path / "r.gguf", qtype=qtype, **TINY_GGUF)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    try:
        assert llm.n_vocab() == TINY_GGUF["n_vocab"]
        prompt = "<|im_start|>user\nWrite a story.<|im_end|>\n<|im_start|>assistant\n"
        out = llm.create_completion(prompt, max_tokens=12, temperature=0.0)
    finally:
        llm.close()
    # never an early EOS, and only text that tokenizes back to one token per token (see models.py)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 12
    assert all(0x20 <= ord(ch) <= 0x7E for ch in out["choices"][0]["text"])


def test_random_llama_gguf_default_shape_is_llama_3_2_1b() -> None:
    import inspect

    params = inspect.signature(models.write_random_llama_gguf).parameters
    shape = {k: params[k].default for k in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_vocab")}
    assert shape == {"n_embd": 2048, "n_layer": 16, "n_head": 32, "n_head_kv": 8, "n_ff": 8192, "n_vocab": 128256}


def test_tiny_gguf_is_the_tests_model(tmp_path: Path) -> None:
    path = models.write_tiny(tmp_path / "tiny.gguf")
    assert path.stat().st_size > 0
    import gguf

    assert gguf.GGUFReader(str(path)).fields["general.architecture"].contents() == "llama"


def test_random_hf_llama_is_a_consistent_checkpoint(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    folder = models.write_random_hf_llama(tmp_path / "hf", hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, vocab=512)
    config = json.loads((folder / "config.json").read_text())
    raw = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__")
    assert len(header) == 3 + 9 * config["num_hidden_layers"]
    assert header["model.embed_tokens.weight"]["shape"] == [config["vocab_size"], config["hidden_size"]]
    assert header["model.layers.1.mlp.down_proj.weight"]["shape"] == [config["hidden_size"], config["intermediate_size"]]
    end = max(t["data_offsets"][1] for t in header.values())
    assert len(raw) == 8 + n + end and (8 + n) % 8 == 0
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "<|im_start|>user\nhéllo, 世界<|im_end|>"
    ids = tok.encode(text).ids
    assert ids[0] == 257 and ids[-1] == 258 and max(ids) < config["vocab_size"]
    assert tok.decode(ids, skip_special_tokens=False) == text
