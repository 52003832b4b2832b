"""An incremental Server-Sent Events decoder following the WHATWG event-stream rules."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

DEFAULT_MAX_LINE_BYTES = 1024 * 1024
# One event's data, over all its lines: many short data lines must not add up without bound.
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024

# CRLF first so that a CR directly followed by LF is one line ending, not two.
_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEProtocolError(ValueError):
    """The stream cannot be decoded safely (a line or an event larger than allowed)."""


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its data, type, the last event id and the reconnection time."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


def _utf8_len(text: str) -> int:
    """The length of ``text`` encoded as UTF-8, without encoding pure-ASCII text."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


class SSEDecoder:
    """Feed bytes as they arrive in arbitrary chunks; get complete events back."""

    __slots__ = (
        "_decode",
        "_max",
        "_max_chars",
        "_tail",
        "_tail_bytes",
        "_at_start",
        "_skip_lf",
        "_data",
        "_data_bytes",
        "_max_event",
        "_event",
        "_id",
        "_retry",
        "_in_event",
        "_closed",
    )

    def __init__(
        self,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        if max_line_bytes < 1 or max_event_bytes < 1:
            raise ValueError("max_line_bytes and max_event_bytes must be positive")
        self._max_event = max_event_bytes
        # errors="replace": a stray invalid byte must not kill an otherwise readable stream.
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._max = max_line_bytes
        # A line of at most this many characters cannot exceed the limit (<= 4 bytes a char),
        # so only longer lines pay for measuring their UTF-8 length.
        self._max_chars = max_line_bytes // 4
        self._tail: list[str] = []  # pieces of the current, not yet terminated line
        self._tail_bytes = 0
        self._at_start = True  # no text decoded yet: a BOM here is stripped
        self._skip_lf = False  # the last text ended with CR: a leading LF completes a CRLF
        self._data: list[str] = []
        self._data_bytes = 0  # the event's data so far, newlines between lines included
        self._event = ""
        self._id: str | None = None
        self._retry: int | None = None
        self._in_event = False  # a field of an undispatched event has been seen
        self._closed = False

    @property
    def pending(self) -> bool:
        """True if a partial line or an undispatched event is buffered (a cut-off stream)."""
        return bool(self._tail) or self._in_event

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Decode one chunk of the body; the events it completes, in order."""
        if self._closed:
            raise ValueError("feed() after close()")
        return self._feed_text(self._decode(chunk))

    def close(self) -> list[SSEEvent]:
        """End of stream: an unterminated event is discarded (spec), so this returns []."""
        if not self._closed:
            self._closed = True
            # Flush a truncated multi-byte sequence (as U+FFFD) so that `pending` sees it.
            self._feed_text(self._decode(b"", final=True))
        return []

    def _feed_text(self, text: str) -> list[SSEEvent]:
        """Split decoded text into lines, keeping the unterminated rest for the next call."""
        if not text:
            return []
        if self._at_start:
            self._at_start = False
            if text[0] == "\ufeff":
                text = text[1:]
        if self._skip_lf:
            self._skip_lf = False
            if text[:1] == "\n":
                text = text[1:]
        if not text:
            return []
        if "\r" not in text:
            if "\n" not in text:
                # No line ending at all: only buffer it, without rescanning earlier pieces.
                self._tail.append(text)
                self._tail_bytes += _utf8_len(text)
                if self._tail_bytes > self._max:
                    raise self._too_long()
                return []
            lines = text.split("\n")
        else:
            lines = _LINE_END.split(text)
            # A CR at the very end may be the first half of a CRLF split across reads.
            self._skip_lf = text[-1] == "\r"
        rest = lines.pop()
        if self._tail:
            self._tail.append(lines[0])
            lines[0] = "".join(self._tail)
            self._tail.clear()
        if rest:
            self._tail.append(rest)
            self._tail_bytes = _utf8_len(rest)
        else:
            self._tail_bytes = 0
        events: list[SSEEvent] = []
        max_chars = self._max_chars
        for line in lines:
            if len(line) > max_chars and _utf8_len(line) > self._max:
                raise self._too_long()
            if not line:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
            elif line.startswith("data:"):
                # The common case (every OpenAI chunk), kept off the general field path.
                value = line[5:]
                self._add_data(value[1:] if value[:1] == " " else value)
                self._in_event = True
            elif line[0] != ":":  # a line starting with a colon is a comment
                self._field(line)
        if self._tail_bytes > self._max:
            raise self._too_long()
        return events

    def _field(self, line: str) -> None:
        """Apply one "name:value" (or bare "name") line to the event being built."""
        name, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        self._in_event = True
        if name == "data":
            self._add_data(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        # Any other field name is ignored, as the spec says.

    def _add_data(self, value: str) -> None:
        self._data_bytes += _utf8_len(value) + 1
        if self._data_bytes > self._max_event:
            self._data.clear()
            self._data_bytes = 0
            raise SSEProtocolError(
                f"an SSE event is larger than the maximum of {self._max_event} bytes"
            )
        self._data.append(value)

    def _dispatch(self) -> SSEEvent | None:
        """A blank line: the event built so far, or None if it has no data."""
        self._in_event = False
        data, self._data = self._data, []
        self._data_bytes = 0
        event, self._event = self._event, ""
        if not data:
            return None
        # Joining with "\n" equals appending value + "\n" per line and stripping the last "\n".
        return SSEEvent("\n".join(data), event or "message", self._id, self._retry)

    def _too_long(self) -> SSEProtocolError:
        """The error for a line over the limit (garbage without newlines must not eat memory)."""
        self._tail.clear()
        self._tail_bytes = 0
        return SSEProtocolError(f"an SSE line is longer than the maximum of {self._max} bytes")
