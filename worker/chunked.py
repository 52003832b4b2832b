"""HTTP/1.1 chunked transfer coding, decoded incrementally, for the upstream's streamed body.

``http.client`` decodes chunks too, but with a ``readline`` for every chunk-size line, a read
for the data and another for its CRLF, each through urllib3's and http.client's layers: costly
for an SSE stream, where every event is one small chunk (RESULTS.md). Here the body's bytes are
read as they come (one buffered ``read1`` per arrival) and the framing is stripped in one pass
over what arrived.
"""

from __future__ import annotations

_MAX_SIZE_LINE = 4096  # a chunk-size line (hex size, extensions) longer than this is garbage


class ChunkedError(ValueError):
    """The body is not valid chunked coding."""


class ChunkedDecoder:
    """Feed the raw body as it arrives; get the payload bytes back. :attr:`done` at the end."""

    __slots__ = ("_left", "_crlf", "_line", "done", "complete", "extra")

    def __init__(self) -> None:
        self._left = 0  # payload bytes still to come in the current chunk
        self._crlf = b""  # the part of the CRLF after a chunk's payload still expected
        self._line = b""  # an incomplete chunk-size (or trailer) line
        self.done = False  # the last (zero-size) chunk was seen: the payload is over
        # The body's very end (the blank line after any trailers) was seen too, and what came
        # after it (``extra``): a connection whose body ended with nothing after it may carry
        # another request.
        self.complete = False
        self.extra = b""

    def feed(self, data: bytes) -> bytes:
        """The payload in ``data``; raises :class:`ChunkedError` on a framing error."""
        if self.done:
            self._trailer(data)
            return b""
        if not data:
            return b""
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                count = min(self._left, end - pos)
                out.append(data[pos : pos + count])
                pos += count
                self._left -= count
                if not self._left:
                    self._crlf = b"\r\n"
            elif self._crlf:
                seen = data[pos : pos + len(self._crlf)]
                if not self._crlf.startswith(seen):
                    raise ChunkedError("a chunk's data is not followed by CRLF")
                pos += len(seen)
                self._crlf = self._crlf[len(seen) :]
            else:
                newline = data.find(b"\n", pos)
                if newline < 0:
                    self._line += data[pos:]
                    if len(self._line) > _MAX_SIZE_LINE:
                        raise ChunkedError("a chunk-size line is too long")
                    break
                line, self._line = self._line + data[pos:newline], b""
                pos = newline + 1
                size = _chunk_size(line)
                if size == 0:
                    self.done = True
                    self._trailer(data[pos:])
                    break
                self._left = size
        return out[0] if len(out) == 1 else b"".join(out)

    def _trailer(self, data: bytes) -> None:
        """After the last chunk: trailer lines up to a blank one (the body's end)."""
        if self.complete:
            self.extra += data
            return
        self._line += data
        while (newline := self._line.find(b"\n")) >= 0:
            line, self._line = self._line[:newline], self._line[newline + 1 :]
            if line in (b"", b"\r"):
                self.complete, self.extra, self._line = True, self._line, b""
                return
        if len(self._line) > _MAX_SIZE_LINE:
            self._line = self._line[-_MAX_SIZE_LINE:]  # never complete: the connection closes


def _chunk_size(line: bytes) -> int:
    """The size from a chunk-size line (``1a3;name=value\\r``), extensions ignored."""
    digits = line.split(b";", 1)[0].strip()
    if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
        raise ChunkedError(f"invalid chunk size {line[:40]!r}")
    return int(digits, 16)
