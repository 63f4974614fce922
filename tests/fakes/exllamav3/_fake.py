"""
Fake-only internals of the CPU stand-in for exllamav3 1.6.5 (not part of the real API).

- FakeTensor: a tiny, torch-free stand-in for the CPU int64/float tensors the real library hands out
  (Tokenizer.encode() -> shape (1, n), result["token_ids"] -> shape (1, n)). It supports the duck-typed
  subset an adapter should restrict itself to: .shape, .ndim/.dim(), .numel(), .tolist(), .item(),
  indexing/slicing, len(), iteration, .view()/.reshape() (with -1), .flatten(), .squeeze()/.unsqueeze(),
  .device.type == "cpu", .cpu(), .to(...), .clone(), .long().
- FakeVocab: the character-level vocabulary read from the fake model directory's tokenizer.json.
- successor(): the deterministic "model": next token = successor of the last token.
- partial_strings_match(): a Python port of the extension's stop-string matcher
  (exllamav3_ext/generator/strings.cpp).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

MARKER_FILENAME = "fake_exllamav3.json"


class FakeDevice:
    """Stand-in for torch.device("cpu")."""

    def __init__(self, type: str = "cpu", index: int | None = None):
        self.type = type
        self.index = index

    def __repr__(self) -> str:
        return f"device(type='{self.type}')" if self.index is None else f"device(type='{self.type}', index={self.index})"

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FakeDevice):
            return (self.type, self.index) == (other.type, other.index)
        if isinstance(other, str):
            return str(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.type, self.index))


_CPU = FakeDevice("cpu")


def _shape_of(data: Any) -> tuple[int, ...]:
    shape: list[int] = []
    while isinstance(data, list):
        shape.append(len(data))
        if not data:
            break
        data = data[0]
    return tuple(shape)


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    for x in data:
        out.extend(_flatten(x))
    return out


def _nest(flat: list, shape: Sequence[int]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return list(flat[: shape[0]])
    step = 1
    for s in shape[1:]:
        step *= s
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


class FakeTensor:
    """
    Minimal immutable-ish CPU tensor (no torch). dtype is "int64" (token ids) or "float32" (probabilities).
    """

    __slots__ = ("_data", "_shape", "dtype")

    def __init__(self, data: Any, dtype: str = "int64", shape: Sequence[int] | None = None):
        if isinstance(data, FakeTensor):
            data = data.tolist()
        self._data = data
        self._shape = tuple(shape) if shape is not None else _shape_of(data)
        self.dtype = dtype

    # -- construction helpers
    @staticmethod
    def ids(ids: Sequence[int]) -> FakeTensor:
        """Token ids as a (1, n) int64 tensor."""
        row = [int(i) for i in ids]
        return FakeTensor([row], "int64", (1, len(row)))

    # -- torch-like surface
    def new_tensor(self, data: Any, dtype: str | None = None, device: Any = None) -> FakeTensor:
        """Real: ``torch.Tensor.new_tensor``: a new tensor of ``data``, with this one's dtype and
        device unless given."""
        return FakeTensor(data, dtype or self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def size(self, dim: int | None = None) -> Any:
        return self._shape if dim is None else self._shape[dim]

    @property
    def ndim(self) -> int:
        return len(self._shape)

    def dim(self) -> int:
        return len(self._shape)

    def numel(self) -> int:
        n = 1
        for s in self._shape:
            n *= s
        return n

    @property
    def device(self) -> FakeDevice:
        return _CPU

    @property
    def is_cuda(self) -> bool:
        return False

    def tolist(self) -> Any:
        return _nest(_flatten(self._data), self._shape) if self._shape else self._data

    def item(self) -> Any:
        flat = _flatten(self._data)
        if len(flat) != 1:
            raise RuntimeError(f"a Tensor with {len(flat)} elements cannot be converted to Scalar")
        return flat[0]

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of a 0-d tensor")
        return self._shape[0]

    def __iter__(self) -> Iterator[FakeTensor]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, idx: Any) -> FakeTensor:
        if not isinstance(idx, tuple):
            idx = (idx,)
        data = self.tolist()
        result, shape = self._index(data, list(self._shape), list(idx))
        return FakeTensor(result, self.dtype, shape)

    @classmethod
    def _index(cls, data: Any, shape: list[int], idx: list) -> tuple[Any, list[int]]:
        if not idx:
            return data, shape
        first, rest = idx[0], idx[1:]
        if first is Ellipsis:
            extra = len(shape) - len([i for i in rest if i is not None])
            return cls._index(data, shape, [slice(None)] * extra + rest)
        if first is None:
            sub, sub_shape = cls._index(data, shape, rest)
            return [sub], [1] + sub_shape
        if not shape:
            raise IndexError("too many indices for tensor")
        if isinstance(first, bool) or not isinstance(first, (int, slice)):
            raise TypeError(f"unsupported index type {type(first).__name__} for FakeTensor")
        if isinstance(first, int):
            n = shape[0]
            i = first + n if first < 0 else first
            if not 0 <= i < n:
                raise IndexError(f"index {first} is out of bounds for dimension 0 with size {n}")
            return cls._index(data[i], shape[1:], rest)
        positions = range(*first.indices(shape[0]))
        sub_shape = cls._result_shape(shape[1:], rest)
        return [cls._index(data[i], shape[1:], rest)[0] for i in positions], [len(positions)] + sub_shape

    @classmethod
    def _result_shape(cls, shape: list[int], idx: list) -> list[int]:
        if not idx:
            return list(shape)
        first, rest = idx[0], idx[1:]
        if first is Ellipsis:
            extra = len(shape) - len([i for i in rest if i is not None])
            return cls._result_shape(shape, [slice(None)] * extra + rest)
        if first is None:
            return [1] + cls._result_shape(shape, rest)
        if not shape:
            raise IndexError("too many indices for tensor")
        if isinstance(first, int):
            return cls._result_shape(shape[1:], rest)
        return [len(range(*first.indices(shape[0])))] + cls._result_shape(shape[1:], rest)

    def view(self, *shape: Any) -> FakeTensor:
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        n = self.numel()
        shape_l = [int(s) for s in shape]
        if shape_l.count(-1) > 1:
            raise RuntimeError("only one dimension can be inferred")
        if -1 in shape_l:
            known = _prod([s for s in shape_l if s != -1])
            if known == 0 or n % known:
                raise RuntimeError(f"shape '{list(shape)}' is invalid for input of size {n}")
            shape_l[shape_l.index(-1)] = n // known
        if _prod(shape_l) != n:
            raise RuntimeError(f"shape '{list(shape)}' is invalid for input of size {n}")
        return FakeTensor(_nest(_flatten(self._data), shape_l), self.dtype, shape_l)

    reshape = view

    def flatten(self) -> FakeTensor:
        return self.view(-1)

    def squeeze(self, dim: int | None = None) -> FakeTensor:
        if dim is None:
            new = [s for s in self._shape if s != 1]
        else:
            d = dim + self.ndim if dim < 0 else dim
            new = list(self._shape)
            if new[d] == 1:
                del new[d]
        return self.view(*new) if new else FakeTensor(self.item(), self.dtype, ())

    def unsqueeze(self, dim: int) -> FakeTensor:
        d = dim + self.ndim + 1 if dim < 0 else dim
        new = list(self._shape)
        new.insert(d, 1)
        return self.view(*new)

    def clone(self) -> FakeTensor:
        return FakeTensor(self.tolist(), self.dtype, self._shape)

    def cpu(self) -> FakeTensor:
        return self

    def to(self, *args: Any, **kwargs: Any) -> FakeTensor:
        return self

    def long(self) -> FakeTensor:
        return FakeTensor(self.tolist(), "int64", self._shape)

    def __repr__(self) -> str:
        return f"tensor({self.tolist()!r})" if self.dtype == "int64" else f"tensor({self.tolist()!r}, dtype={self.dtype})"


def _prod(xs: Sequence[int]) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def as_id_rows(input_ids: Any) -> list[list[int]]:
    """Accept a FakeTensor, a torch tensor or a list of either; return plain rows of ints."""
    items = input_ids if isinstance(input_ids, list) else [input_ids]
    rows: list[list[int]] = []
    for t in items:
        data = t.tolist()
        if data and isinstance(data[0], list):
            rows.extend([[int(x) for x in r] for r in data])
        else:
            rows.append([int(x) for x in data])
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Vocabulary and the deterministic model


class FakeVocab:
    """Character-level vocabulary of a fake model directory (read from tokenizer.json)."""

    def __init__(self, directory: str):
        path = os.path.join(directory, "tokenizer.json")
        with open(path, encoding="utf8") as f:
            tj = json.load(f)
        vocab: dict[str, int] = dict(tj["model"]["vocab"])
        self.unk_token: str | None = tj["model"].get("unk_token")
        self.piece_to_id = vocab
        size = max(vocab.values()) + 1
        self.id_to_piece: list[str] = [""] * size
        for p, i in vocab.items():
            self.id_to_piece[i] = p
        self.special_piece_to_id: dict[str, int] = {}
        self.unspecial_added: dict[str, int] = {}
        for t in tj.get("added_tokens", []):
            if t.get("special", False):
                self.special_piece_to_id[t["content"]] = t["id"]
            else:
                self.unspecial_added[t["content"]] = t["id"]
        self.special_ids = set(self.special_piece_to_id.values())
        self.size = size
        self.unk_id = vocab.get(self.unk_token) if self.unk_token else None


def successor(vocab: FakeVocab, token_id: int, eos_token_id: int) -> int:
    """
    The fake model's next-token rule: lowercase letters cycle a->b->...->z->a, digits 0->1->...->9 and
    9 -> EOS, anything else (space, punctuation, capitals, special tokens, EOS) -> "a".
    """
    piece = vocab.id_to_piece[token_id] if 0 <= token_id < vocab.size else ""
    if token_id not in vocab.special_ids and len(piece) == 1:
        if "a" <= piece <= "z":
            return vocab.piece_to_id[chr((ord(piece) - ord("a") + 1) % 26 + ord("a"))]
        if "0" <= piece <= "9":
            if piece == "9":
                return eos_token_id
            return vocab.piece_to_id[chr(ord(piece) + 1)]
    return vocab.piece_to_id["a"]


def fallback_order(vocab: FakeVocab) -> list[int]:
    """Second-choice tokens (by falling 'logit') when the successor is masked, e.g. by min_new_tokens."""
    first = [vocab.piece_to_id[c] for c in "a "]
    return first + [i for i in range(vocab.size) if i not in first]


def partial_strings_match(text: str, strings: Sequence[str]) -> int:
    """
    Port of ext.partial_strings_match (exllamav3_ext/generator/strings.cpp):
        >= 0: index in text of the earliest full match of any string
        -2:   some string starts earlier than any full match and runs off the end of text (partial match)
        -1:   no match
    Empty strings are ignored.
    """
    q_len = len(text)
    none = q_len + 1
    best_full = none
    best_partial = none
    for s in strings:
        s_len = len(s)
        if s_len <= 0:
            continue
        limit = min(best_full, best_partial)
        a0 = 0
        while a0 < q_len and a0 < limit:
            k = 0
            while a0 + k < q_len and k < s_len and text[a0 + k] == s[k]:
                k += 1
            if k == s_len:
                best_full = a0
                break
            if a0 + k == q_len:
                best_partial = a0
                break
            a0 += 1
    if best_partial < best_full:
        return -2
    if best_full < none:
        return best_full
    return -1


FAULT_PREFILL = "FAKE_FAIL_PREFILL"
FAULT_ITERATE = "FAKE_FAIL_ITERATE"
