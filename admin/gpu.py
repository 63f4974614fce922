"""GPU memory through NVML (nvidia-ml-py's ``pynvml``), never by parsing nvidia-smi.

No GPU or no driver is a normal state: :func:`read_gpus` then returns no devices and the reason.
NVML calls are quick but blocking, so async callers run them with ``trio.to_thread``.
"""

from __future__ import annotations

import threading
from typing import Any

import msgspec

_lock = threading.Lock()
_init_error: str | None = None
_initialized = False


class GpuInfo(msgspec.Struct, kw_only=True):
    index: int
    name: str
    used_mib: int
    total_mib: int
    free_mib: int
    used_over_total: str


def _init() -> Any:
    global _initialized, _init_error
    import pynvml

    with _lock:
        if not _initialized and _init_error is None:
            try:
                pynvml.nvmlInit()
                _initialized = True
            except pynvml.NVMLError as e:
                _init_error = f"NVML unavailable (no NVIDIA GPU or driver): {e}"
    return pynvml


def read_gpus() -> tuple[list[GpuInfo], str | None]:
    """Every visible GPU's memory, and None; or ``[]`` and why none could be read."""
    pynvml = _init()
    if _init_error is not None:
        return [], _init_error
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            used, total = mem.used // 2**20, mem.total // 2**20
            gpus.append(
                GpuInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    used_mib=used,
                    total_mib=total,
                    free_mib=mem.free // 2**20,
                    used_over_total=f"{used}MiB / {total}MiB",
                )
            )
        return gpus, None
    except pynvml.NVMLError as e:
        return [], f"NVML error: {e}"


def used_mib() -> float | None:
    """Total GPU memory in use across devices, or None without GPUs (for load deltas)."""
    gpus, _ = read_gpus()
    return float(sum(g.used_mib for g in gpus)) if gpus else None
