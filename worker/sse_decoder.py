"""An incremental Server-Sent Events decoder following the WHATWG event-stream rules."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEProtocolError(ValueError):
    """The stream cannot be decoded (a line longer than the allowed maximum)."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


class SSEDecoder:
    """Feed bytes as they arrive; get complete events back."""

    def __init__(self, max_line_bytes: int = 1024 * 1024) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._max = max_line_bytes
        self._buffer = ""
        self._first = True
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._started_event = False
        self._skip_lf = False

    @property
    def pending(self) -> bool:
        """True if a partial line or an undispatched event is buffered."""
        return bool(self._buffer) or self._started_event

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        text = self._decode(chunk)
        if not text:
            return []
        if self._first:
            self._first = False
            if text.startswith("\ufeff"):
                text = text[1:]
        if self._skip_lf:
            # The previous read ended with CR: an LF now is the second half of one CRLF.
            self._skip_lf = False
            if text.startswith("\n"):
                text = text[1:]
        text = self._buffer + text
        lines = _LINE_END.split(text)
        self._buffer = lines.pop()
        self._skip_lf = text.endswith("\r")
        if len(self._buffer) > self._max:
            raise SSEProtocolError(f"an SSE line exceeds {self._max} characters")
        events: list[SSEEvent] = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: an unterminated event is discarded, as the spec says."""
        self._buffer += self._decode(b"", final=True)
        return []

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line[0] == ":":
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        self._started_event = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        self._started_event = False
        data, self._data = self._data, []
        event, self._event = self._event, ""
        if not data:
            return None
        return SSEEvent("\n".join(data), event or "message", self._id, self._retry)


def iter_sse(chunks: Iterable[bytes], max_line_bytes: int = 1024 * 1024) -> Iterator[SSEEvent]:
    decoder = SSEDecoder(max_line_bytes)
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.close()
