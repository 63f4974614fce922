"""``StopMatcher`` (backends/prompts.py), against its specification, with Hypothesis.

The specification, as engines apply stop strings (checked after each token, i.e. chunk): the
text emitted (every ``push``'s safe text, then ``flush`` if no stop was hit) is the stream cut at
the start of the first stop string to *complete*, or the whole stream if none does; and no part
of that stop string is ever emitted, even when it arrives split across chunks.  (With stops
``<`` and ``><<``, chunks ``><`` + ``<`` stop at the first ``<``: generation ends there, and
``><<`` never completes.)
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_pool.backends.prompts import StopMatcher

#: A small alphabet so stop strings actually occur, overlap and split across chunks.
ALPHABET = "ab<|>\n"
texts = st.text(ALPHABET, max_size=40)
stops = st.lists(st.text(ALPHABET, min_size=1, max_size=5), max_size=4)


def expected(chunks: list[str], stop_strings: list[str]) -> tuple[str, bool]:
    seen = ""
    for chunk in chunks:
        seen += chunk
        hits = [i for i in (seen.find(s) for s in stop_strings) if i >= 0]
        if hits:
            return seen[: min(hits)], True
    return seen, False


def run(chunks: list[str], stop_strings: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stop_strings)
    out: list[str] = []
    for chunk in chunks:
        safe, hit = matcher.push(chunk)
        out.append(safe)
        if hit:
            return out, True
    out.append(matcher.flush())
    return out, False


@st.composite
def chunked(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(texts)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@given(chunked(), stops)
def test_output_is_the_stream_cut_at_the_first_stop(case: tuple[str, list[str]], stop_strings: list[str]) -> None:
    _, chunks = case
    out, hit = run(chunks, stop_strings)
    assert ("".join(out), hit) == expected(chunks, stop_strings)


@given(texts, stops)
def test_one_chunk_is_cut_at_the_earliest_stop(text: str, stop_strings: list[str]) -> None:
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    out, hit = run([text], stop_strings)
    assert ("".join(out), hit) == ((text[: min(hits)], True) if hits else (text, False))


@given(chunked(), stops)
def test_no_prefix_of_the_output_ever_holds_a_stop_string(case: tuple[str, list[str]], stop_strings: list[str]) -> None:
    """Emitted text is final: no stop string appears in anything emitted, at any moment."""
    _, chunks = case
    out, _ = run(chunks, stop_strings)
    emitted = ""
    for piece in out:
        emitted += piece
        assert not any(s in emitted for s in stop_strings), (emitted, stop_strings)


@given(st.text(ALPHABET, max_size=30), st.text(ALPHABET, min_size=2, max_size=6))
def test_a_stop_split_one_character_per_chunk_never_leaks(prefix: str, stop: str) -> None:
    text = prefix + stop
    out, hit = run(list(text), [stop])
    assert hit
    assert "".join(out) == text[: text.find(stop)]


@pytest.mark.parametrize(
    ("chunks", "stop_strings", "pieces", "hit"),
    [
        (["Hello <|im", "_end|> more"], ["<|im_end|>"], ["Hello ", ""], True),
        (["a<", "b"], ["<|"], ["a", "<b", ""], False),  # held back while it could still become a stop
        (["abc"], [], ["abc", ""], False),
        (["x", "", "y"], ["yy"], ["x", "", "", "y"], False),
    ],
)
def test_examples(chunks: list[str], stop_strings: list[str], pieces: list[str], hit: bool) -> None:
    assert run(chunks, stop_strings) == (pieces, hit)
