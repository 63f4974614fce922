"""Load GGUFs with every layer on the GPU and say what llama.cpp did: ``python -m bench.gpu.check_offload M...``.

For each model: llama.cpp's own load log lines about offloading (``offloaded 17/17 layers to
GPU``, the CUDA buffers), a short greedy generation, its tokens/s, and the GPU memory in use
(NVML) before and after.  Exit status 1 if a model did not put all its layers on the GPU (unless
``--allow-cpu``, for the dry run on a CPU build).  Not a test of outputs: the exact-output tests
run under ``pytest -p bench.gpu.cuda_gguf``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

LOG_LINES = re.compile(r"offload|CUDA|ggml_cuda|GPU", re.IGNORECASE)


def gpu_used_mib() -> float | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        return info.used / 2**20
    except Exception:
        return None


def check(path: Path, tokens: int) -> tuple[bool, list[str]]:
    import llama_cpp

    before = gpu_used_mib()
    with tempfile.TemporaryFile("w+") as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            llm = llama_cpp.Llama(model_path=str(path), n_gpu_layers=-1, n_ctx=1024, flash_attn=True, verbose=True)
            prompt = "<|im_start|>user\nWrite a story.<|im_end|>\n<|im_start|>assistant\n"
            llm.create_completion(prompt, max_tokens=8, temperature=0.0)  # warm-up
            t0 = time.perf_counter()
            out = llm.create_completion(prompt, max_tokens=tokens, temperature=0.0)
            dt = time.perf_counter() - t0
            llm.close()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        lines = [ln.rstrip() for ln in log if LOG_LINES.search(ln)]
    after = gpu_used_mib()
    n = out["usage"]["completion_tokens"]
    offload = [ln for ln in lines if "offloaded" in ln]
    m = re.search(r"offloaded (\d+)/(\d+) layers", " ".join(offload))
    full = bool(m and m.group(1) == m.group(2))
    report = [
        f"{path.name}: llama_supports_gpu_offload={llama_cpp.llama_supports_gpu_offload()} "
        f"all layers on the GPU={full} ({m.group(0) if m else 'no offload line'})",
        f"{path.name}: {n} tokens in {dt:.3f} s = {n / dt:.1f} tok/s (greedy, one stream, prompt included)",
        f"{path.name}: GPU memory used before / after load (MiB): {before} / {after}",
    ] + [f"  llama.cpp: {ln}" for ln in lines[:12]]
    return full, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", type=Path, nargs="+")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--allow-cpu", action="store_true", help="report, but do not fail, a CPU-only load")
    args = parser.parse_args()
    ok = True
    for path in args.models:
        full, report = check(path, args.tokens)
        ok &= full
        print("\n".join(report), flush=True)
    if not ok and not args.allow_cpu:
        raise SystemExit("not every layer was offloaded to the GPU")


if __name__ == "__main__":
    main()
