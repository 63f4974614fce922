"""Read a GGUF file's trained context length from its header, without llama.cpp.

The admin load bounds ``gguf_n_ctx`` by it (``n_ctx_train``, the ``<arch>.context_length``
metadata key): llama.cpp takes ``n_ctx`` as a uint32, so ``4294967296`` wrapped around and the
model reported ``loaded`` with another context, and ``10**12`` spent 42 s failing.  Only the
metadata section is read (a few hundred KB at most: the tokenizer's arrays are skipped as they
are read), never the tensors.  Blocking file I/O: call it on a worker thread.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
#: Fixed sizes of the scalar value types, by GGUF type id (8 is a string, 9 an array).
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
STRING, ARRAY = 8, 9


class _Bad(Exception):
    pass


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Bad("truncated")
    return data


def _u32(f: BinaryIO) -> int:
    return int(struct.unpack("<I", _read(f, 4))[0])


def _u64(f: BinaryIO) -> int:
    return int(struct.unpack("<Q", _read(f, 8))[0])


def _string(f: BinaryIO) -> str:
    return _read(f, _u64(f)).decode("utf-8", "replace")


def _skip(f: BinaryIO, kind: int) -> None:
    if kind in _SCALARS:
        f.seek(_SCALARS[kind], 1)
    elif kind == STRING:
        f.seek(_u64(f), 1)
    elif kind == ARRAY:
        item, count = _u32(f), _u64(f)
        if item in _SCALARS:
            f.seek(_SCALARS[item] * count, 1)
        else:
            for _ in range(count):
                _skip(f, item)
    else:
        raise _Bad(f"unknown value type {kind}")


def trained_context(path: str | Path) -> int | None:
    """The model's trained context length (``<arch>.context_length``), or None when the file is
    not a readable GGUF or does not say."""
    try:
        with open(path, "rb") as f:
            if _read(f, 4) != MAGIC or _u32(f) < 2:
                return None
            _u64(f)  # tensor count
            values: dict[str, int | str] = {}
            for _ in range(_u64(f)):
                key, kind = _string(f), _u32(f)
                if key == "general.architecture" and kind == STRING:
                    values[key] = _string(f)
                elif key.endswith(".context_length") and kind in _INTS:
                    values[key] = int(struct.unpack(_INTS[kind], _read(f, _SCALARS[kind]))[0])
                else:
                    _skip(f, kind)
                arch = values.get("general.architecture")
                if isinstance(arch, str) and isinstance(found := values.get(f"{arch}.context_length"), int):
                    return found
    except (OSError, _Bad, struct.error, OverflowError):
        return None
    return None
