"""The one SSE reader of the tests: strict about the framing (``<line>\\n…\\n\\n`` frames and
nothing else), for both inference routes.

* ``/v1/responses``: every frame is exactly ``event: <type>`` + ``data: <json object>``, the
  data's ``type`` equal to the event and ``sequence_number`` 0, 1, 2… (:func:`parse_responses_sse`);
* ``/v1/chat/completions``: every frame is one ``data: <json>`` line, and the stream ends with
  exactly one ``data: [DONE]`` (:func:`parse_chat_sse`; :func:`sse_data` gives the payloads as
  sent, e.g. an upstream's, which may be anything).
"""

from __future__ import annotations

import json
from typing import Any

DONE = "[DONE]"


def sse_frames(raw: bytes | str) -> list[list[str]]:
    """A complete SSE body as its frames (lists of lines); strict about the framing."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-120:]!r}"
    return [frame.split("\n") for frame in text[:-2].split("\n\n")]


def parse_responses_sse(raw: bytes | str) -> list[tuple[str, dict[str, Any]]]:
    """``/v1/responses`` events as ``(type, data)``, each frame checked (see the module)."""
    events = []
    for i, lines in enumerate(sse_frames(raw)):
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), lines
        name, data = lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])
        assert isinstance(data, dict) and data.get("type") == name, (name, data)
        assert data.get("sequence_number") == i, (i, data)
        events.append((name, data))
    return events


def sse_data(raw: bytes | str) -> list[str]:
    """The payloads of a stream of ``data: <payload>`` frames (one line each), as sent."""
    out = []
    for lines in sse_frames(raw):
        assert len(lines) == 1 and lines[0].startswith("data: "), lines
        out.append(lines[0][len("data: ") :])
    return out


def parse_chat_sse(raw: bytes | str) -> list[Any]:
    """``/v1/chat/completions`` payloads: the JSON of each frame, then the string ``"[DONE]"``
    (checked to be the one last frame)."""
    out: list[Any] = [data if data == DONE else json.loads(data) for data in sse_data(raw)]
    assert out[-1] == DONE and out.count(DONE) == 1, out[-2:]
    return out


def parse_log_sse(raw: bytes | str) -> list[dict[str, Any]]:
    """``GET /v1/admin/logs`` lines: each frame is ``id: <seq>`` + ``event: log`` + ``data: <json>``
    (``seq`` equal to the id, increasing), or one comment line (``: ...``, a keep-alive)."""
    out: list[dict[str, Any]] = []
    for lines in sse_frames(raw):
        if len(lines) == 1 and lines[0].startswith(": "):
            continue
        assert len(lines) == 3 and lines[0].startswith("id: ") and lines[1] == "event: log", lines
        assert lines[2].startswith("data: "), lines
        data = json.loads(lines[2][len("data: ") :])
        assert data["seq"] == int(lines[0][len("id: ") :]), lines
        assert not out or data["seq"] > out[-1]["seq"], lines
        out.append(data)
    return out
