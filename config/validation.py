"""msgspec's validation errors, read in one place and told in llm-pool's own words.

msgspec reports a rejected value only as text (``Expected `int` >= 1 - at `$.decoding.top_k```),
and that text is msgspec's, not ours: it changed between releases (0.23 reworded an error and
broke a test).  So exactly one function here reads it, :func:`read_validation_error`, and takes
from it two facts only: *what kind* of problem (an unknown field, a missing field, a bad value)
and *where* (the JSON path).  Everything a caller or an operator reads is written by
:func:`describe` from those two facts and the expected type itself (its msgspec ``Meta``
constraints, read with :mod:`msgspec.inspect`).  One canary test
(``tests/config/test_validation.py``) pins msgspec's format, so an upgrade that changes it
breaks that named test, not sixty.

This module imports nothing of llm-pool's: every layer may use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import msgspec
from msgspec import inspect as mi

Problem = Literal["unknown_field", "missing_field", "invalid_value"]

_AT = " - at `"
_FIELD = re.compile(r"^Object (contains unknown|missing required) field `([^`]*)`")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")


@dataclass(frozen=True)
class Invalid:
    """What was wrong with a decoded value, and where (a JSON path: ``$.decoding.stop[1]``;
    a dict key msgspec could not name is ``[...]``)."""

    problem: Problem
    path: str


def read_validation_error(error: msgspec.ValidationError) -> Invalid:
    """The one reader of msgspec's error text (see the module docstring)."""
    text = str(error)
    head, sep, at = text.rpartition(_AT)
    path = at.rstrip("`") if sep else "$"
    field = _FIELD.match(head if sep else text)
    if field is None:
        return Invalid("invalid_value", path)
    problem: Problem = "unknown_field" if field.group(1) == "contains unknown" else "missing_field"
    return Invalid(problem, f"{path}.{field.group(2)}")


def describe(invalid: Invalid, root: Any) -> str:
    """``invalid`` in our words: ``$.decoding.top_k: expected an integer from 1 to 200``
    (``root``: the type that was decoded)."""
    if invalid.problem == "unknown_field":
        return f"{invalid.path}: unknown field"
    if invalid.problem == "missing_field":
        return f"{invalid.path}: required field is missing"
    found = _type_at(_info(root), invalid.path)
    return f"{invalid.path}: expected {_expectation(found)}" if found is not None else f"{invalid.path}: invalid value"


@lru_cache(maxsize=64)
def _info(root: Any) -> mi.Type:
    return mi.type_info(root)


def _type_at(t: mi.Type, path: str) -> mi.Type | None:
    """The type expected at ``path`` below ``t`` (None if the path leaves the type)."""
    for name, index in _STEP.findall(path[1:]):
        t = _step(t, name, index)  # type: ignore[assignment]
        if t is None:
            return None
    return t


def _step(t: mi.Type, name: str, index: str) -> mi.Type | None:
    if isinstance(t, mi.UnionType):
        found = [f for option in t.types if (f := _step(option, name, index)) is not None]
        return found[0] if len(found) == 1 else mi.UnionType(tuple(found)) if found else None
    if name and isinstance(t, mi.StructType) and name == t.tag_field:  # a tagged union's tag
        return mi.LiteralType((t.tag,))
    if name and isinstance(t, mi.StructType | mi.DataclassType | mi.TypedDictType):
        return next((f.type for f in t.fields if f.encode_name == name), None)
    if isinstance(t, mi.DictType):
        return t.value_type
    if index and isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        return t.item_type
    return None


def _expectation(t: mi.Type) -> str:
    if isinstance(t, mi.UnionType):
        literals = tuple(v for o in t.types if isinstance(o, mi.LiteralType) for v in o.values)
        others = [_expectation(o) for o in t.types if not isinstance(o, mi.LiteralType)]
        # dict.fromkeys: a field that several Structs of a union share is described once
        return " or ".join(dict.fromkeys([*([_expectation(mi.LiteralType(literals))] if literals else []), *others]))
    if isinstance(t, mi.BoolType):
        return "true or false"
    if isinstance(t, mi.NoneType):
        return "null"
    if isinstance(t, mi.IntType):
        return "an integer" + _bounds(t.ge, t.gt, t.le, t.lt) + _multiple(t.multiple_of)
    if isinstance(t, mi.FloatType):
        return "a number" + _bounds(t.ge, t.gt, t.le, t.lt)
    if isinstance(t, mi.StrType):
        pattern = f" matching {t.pattern}" if t.pattern is not None else ""
        return "a string" + _length(t.min_length, t.max_length, "character") + pattern
    if isinstance(t, mi.LiteralType):
        values = [msgspec.json.encode(v).decode() for v in t.values]
        return values[0] if len(values) == 1 else "one of " + ", ".join(values)
    if isinstance(t, mi.ListType | mi.SetType | mi.FrozenSetType | mi.VarTupleType):
        return "a list" + _length(t.min_length, t.max_length, "item")
    if isinstance(t, mi.StructType | mi.DataclassType | mi.TypedDictType | mi.DictType):
        return "an object"
    return "a valid value"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _bounds(ge: Any, gt: Any, le: Any, lt: Any) -> str:
    if ge is not None and le is not None:
        return f" from {_num(ge)} to {_num(le)}"
    low = f"> {_num(gt)}" if gt is not None else f">= {_num(ge)}" if ge is not None else ""
    high = f"< {_num(lt)}" if lt is not None else f"<= {_num(le)}" if le is not None else ""
    return " " + " and ".join(b for b in (low, high) if b) if low or high else ""


def _multiple(step: Any) -> str:
    return f" (a multiple of {step})" if step is not None else ""


def _length(low: int | None, high: int | None, unit: str) -> str:
    plural = f"{unit}s"
    if low is not None and high is not None:
        return f" of {low} to {high} {plural}"
    if low is not None:
        return f" of at least {low} {unit if low == 1 else plural}"
    if high is not None:
        return f" of at most {high} {unit if high == 1 else plural}"
    return ""
