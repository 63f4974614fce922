"""The one adapter of msgspec's error text (:mod:`llm_pool.config.validation`).

``test_msgspec_error_format_canary`` is the only test in the suite that asserts msgspec's own
words: if a msgspec release changes them, it fails here, by name, and the adapter is the one
place to mend.  Every other test asserts our words.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
import pytest

from llm_pool.config.validation import Invalid, describe, read_validation_error


class Part(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="text"):
    text: str


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    k: Annotated[int, msgspec.Meta(ge=1, le=9)]
    step: Annotated[int, msgspec.Meta(ge=256, multiple_of=256)] = 256


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=8)]
    inner: Inner | None = None
    flag: bool = False
    ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    mode: Literal["a", "b"] = "a"
    parts: Annotated[list[Part], msgspec.Meta(max_length=2)] = []
    table: dict[str, Inner] = {}


def error_of(value: object) -> msgspec.ValidationError:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(value, Outer)
    return info.value


def test_msgspec_error_format_canary() -> None:
    """msgspec's format, as the adapter reads it: ``<text> - at `<path>```, and the unknown or
    missing field named only inside the text (at the root, no `` - at ``)."""
    assert str(error_of({"name": "x", "inner": {"k": 0}})).endswith(" - at `$.inner.k`")
    assert str(error_of({"name": "x", "bogus": 1})).startswith("Object contains unknown field `bogus`")
    assert " - at `" not in str(error_of({"name": "x", "bogus": 1}))
    assert str(error_of({"name": "x", "inner": {}})) == "Object missing required field `k` - at `$.inner`"
    assert str(error_of({"name": "x", "table": {"a": {"k": 0}}})).endswith(" - at `$.table[...].k`")


@pytest.mark.parametrize(
    ("value", "invalid", "message"),
    [
        ({"name": "x", "bogus": 1}, Invalid("unknown_field", "$.bogus"), "$.bogus: unknown field"),
        ({"name": "x", "inner": {"k": 1, "z": 2}}, Invalid("unknown_field", "$.inner.z"), "$.inner.z: unknown field"),
        ({}, Invalid("missing_field", "$.name"), "$.name: required field is missing"),
        ({"name": "x", "inner": {}}, Invalid("missing_field", "$.inner.k"), "$.inner.k: required field is missing"),
        ({"name": ""}, Invalid("invalid_value", "$.name"), "$.name: expected a string of 1 to 8 characters"),
        ({"name": 5}, Invalid("invalid_value", "$.name"), "$.name: expected a string of 1 to 8 characters"),
        ({"name": "x", "inner": {"k": 10}}, Invalid("invalid_value", "$.inner.k"), "$.inner.k: expected an integer from 1 to 9"),
        (
            {"name": "x", "inner": {"k": 1, "step": 300}},
            Invalid("invalid_value", "$.inner.step"),
            "$.inner.step: expected an integer >= 256 (a multiple of 256)",
        ),
        ({"name": "x", "inner": []}, Invalid("invalid_value", "$.inner"), "$.inner: expected an object or null"),
        ({"name": "x", "flag": "yes"}, Invalid("invalid_value", "$.flag"), "$.flag: expected true or false"),
        ({"name": "x", "ratio": 0}, Invalid("invalid_value", "$.ratio"), "$.ratio: expected a number > 0 and <= 1"),
        ({"name": "x", "mode": "c"}, Invalid("invalid_value", "$.mode"), '$.mode: expected one of "a", "b"'),
        ({"name": "x", "parts": [{"type": "t", "text": "x"}]}, Invalid("invalid_value", "$.parts[0].type"), '$.parts[0].type: expected "text"'),
        ({"name": "x", "parts": [{"type": "text", "text": "x"}] * 3}, Invalid("invalid_value", "$.parts"), "$.parts: expected a list of at most 2 items"),
        ([], Invalid("invalid_value", "$"), "$: expected an object"),
    ],
)
def test_errors_in_our_words(value: object, invalid: Invalid, message: str) -> None:
    read = read_validation_error(error_of(value))
    assert read == invalid
    assert describe(read, Outer) == message


def test_a_dict_value_is_described_by_its_type() -> None:
    read = read_validation_error(error_of({"name": "x", "table": {"a": {"k": 0}}}))
    assert read == Invalid("invalid_value", "$.table[...].k")
    assert describe(read, Outer) == "$.table[...].k: expected an integer from 1 to 9"


def test_a_path_outside_the_type_still_gets_a_message() -> None:
    assert describe(Invalid("invalid_value", "$.nowhere.deep"), Outer) == "$.nowhere.deep: invalid value"
