"""The Server-Sent Events wire format: pure functions from values to bytes.

Everything a stream writes goes through here, so the framing rules (one ``data:`` line per line
of payload, no line breaks inside ``id``/``event``) are enforced in one place.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _single_line(value: str | bytes) -> bytes:
    """Drop line breaks: one in an ``id`` or ``event`` would end the field early."""
    return _LINE_BREAK.sub(b"", _as_bytes(value))


def format_event(
    data: str | bytes | None = None,
    *,
    id: str | int | None = None,
    event: str | None = None,
    retry: int | None = None,
) -> bytes:
    """One SSE event: optional ``id``/``event``/``retry`` fields, data lines, a blank line."""
    out = bytearray()
    if id is not None:
        out += b"id: " + _single_line(str(id)) + b"\n"
    if event is not None:
        out += b"event: " + _single_line(event) + b"\n"
    if retry is not None:
        out += b"retry: %d\n" % int(retry)
    if data is not None:
        payload = _as_bytes(data)
        if b"\n" in payload or b"\r" in payload:
            for line in _LINE_BREAK.split(payload):
                out += b"data: " + line + b"\n"
        else:
            out += b"data: " + payload + b"\n"
    out += b"\n"
    return bytes(out)


def format_comment(text: str = "") -> bytes:
    """A comment line: ignored by clients, but it proves the connection is alive."""
    return b": " + _single_line(text) + b"\n\n"
