"""A lean HTTP/1.1 client for plain-HTTP upstreams: the request in one write on a kept-alive
connection, the answer's head parsed here, its body left on the socket for :mod:`worker.reader`.

Why not urllib3 (under ``requests``, which still serves HTTPS upstreams and moderation): on the
first token's path, its pool checkout, its separate writes of head and body, http.client's
header parsing (through the ``email`` package) and its response objects cost 0.6-0.9 ms a
request on the benchmark machine, more than a local upstream takes to answer
(tests/bench/RESULTS.md, "First chunk").

Connections are kept per (host, port) and reused last-in first-out. One taken from the pool is
checked first (the upstream may have closed it while it was idle); a kept connection that the
upstream closed anyway before answering a byte is replaced by a new one and the request sent
again (it cannot have been answered), as browsers and Go's ``net/http`` do.
"""

from __future__ import annotations

import re
import socket
from urllib.parse import urlsplit

from requests.structures import CaseInsensitiveDict

from relay.core.connections import readable

from .chunked import ChunkedDecoder

MAX_HEAD_BYTES = 64 * 1024  # status line and headers: anything longer is not an answer
MAX_HEADERS = 100
_READ_SIZE = 64 * 1024
# What would let a header's name or value end the header early (request splitting).
_BAD_NAME = re.compile(r"[^!#$%&'*+\-.^_`|~0-9A-Za-z]|^$")
_BAD_VALUE = re.compile(r"[\r\n\0]")


class MalformedAnswer(Exception):
    """The upstream's answer is not HTTP/1.x."""


class ClosedBeforeAnswer(ConnectionError):
    """The connection closed before a byte of the answer came."""


class Answer:
    """An answer's status and headers; its body is read from here (``read1``, ``read_body``)
    or straight from ``sock`` once what came with the head (``buffered``) has been read.

    :meth:`release` gives the connection back for another request (only once the body ended
    exactly); :meth:`close` closes it; either may be called any number of times.
    """

    __slots__ = ("status_code", "headers", "sock", "buffered", "chunked", "length", "reusable",
                 "_pool", "_key", "_left")  # fmt: skip

    def __init__(
        self,
        status: int,
        headers: CaseInsensitiveDict,
        sock: socket.socket,
        buffered: bytes,
        reusable: bool,
        pool: Pool,
        key: tuple[str, int],
    ) -> None:
        self.status_code = status
        self.headers = headers
        self.sock: socket.socket | None = sock
        self.buffered = buffered
        encoding = headers.get("Transfer-Encoding", "").lower()
        self.chunked = encoding.rsplit(",", 1)[-1].strip() == "chunked"
        length = headers.get("Content-Length")
        self.length = int(length) if not self.chunked and length and length.isdigit() else None
        # A body that only the connection's end ends can never be followed by another answer.
        self.reusable = reusable and (self.chunked or self.length is not None)
        self._pool, self._key = pool, key
        self._left = self.length  # bytes of a Content-Length body not yet read

    def read1(self, size: int = _READ_SIZE) -> bytes:
        """The next bytes of the connection (what came with the head first), waiting for them
        up to the socket's timeout (the read timeout; none at all with timeout 0, which raises
        ``BlockingIOError``); b"" once the upstream closed it."""
        if self.buffered:
            data, self.buffered = self.buffered[:size], self.buffered[size:]
            return data
        if self.sock is None:
            return b""
        return self.sock.recv(size)

    def read_body(self, size: int = _READ_SIZE) -> bytes:
        """The next bytes of a body that is not chunked (``Content-Length``, or to the
        connection's end); b"" at its end."""
        if self._left == 0:
            return b""
        data = self.read1(size if self._left is None else min(size, self._left))
        if self._left is not None:
            if not data:
                raise ConnectionResetError("the upstream closed the connection mid-body")
            self._left -= len(data)
        return data

    def read_all(self, limit: int) -> bytes:
        """The whole body, up to ``limit`` bytes (an error's message, say), chunked or not."""
        out = b""
        if not self.chunked:
            while len(out) < limit and (data := self.read_body(limit - len(out))):
                out += data
            return out
        framing = ChunkedDecoder()
        while len(out) < limit and not framing.done:
            data = self.read1()
            if not data:
                break
            out += framing.feed(data)
        return out[:limit]

    def release(self) -> None:
        """Give the connection back to the pool, for the next request to this upstream."""
        sock, self.sock = self.sock, None
        if sock is not None:
            if self.reusable and not self.buffered:
                self._pool.put(self._key, sock)
            else:
                sock.close()

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


class Pool:
    """Idle connections to each upstream, at most ``max_idle`` kept per upstream."""

    def __init__(self, max_idle: int = 64) -> None:
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[socket.socket]] = {}
        self.connects = 0  # new connections made (a reused one is not counted)

    def put(self, key: tuple[str, int], sock: socket.socket) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < self.max_idle:
            idle.append(sock)
        else:
            sock.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for sock in idle:
                sock.close()
        self._idle.clear()

    def post(self, url: str, body: bytes, headers: dict[str, str], *,
             connect_timeout: float, read_timeout: float) -> Answer:  # fmt: skip
        """POST ``body`` to ``url`` (``http://`` only) and read the answer's head.

        Raises ``OSError`` (``TimeoutError`` for a timeout, ``ConnectionRefusedError``...) if
        the upstream cannot be reached or does not answer, :class:`MalformedAnswer` if what it
        answers is not HTTP/1.x, ``ValueError`` for a header that would break the request.
        """
        sent = self.send(url, body, headers, connect_timeout=connect_timeout,
                         read_timeout=read_timeout)  # fmt: skip
        assert sent is not None
        return sent.answer()

    def send(self, url: str, body: bytes, headers: dict[str, str], *,
             connect_timeout: float, read_timeout: float,
             kept_only: bool = False) -> Sent | None:  # fmt: skip
        """:meth:`post`'s first half: the request written, its answer to be read from what
        this returns. With ``kept_only``, only on a kept connection (no connect, no wait: None,
        nothing written, when none is idle)."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not a plain-HTTP URL: {url!r}")
        key = (parts.hostname, parts.port or 80)
        request = _request_bytes(parts.netloc, parts.path or "/", parts.query, body, headers)
        sent = Sent(self, key, request, connect_timeout, read_timeout)
        return sent if sent.write(kept_only) else None

    def _checkout(
        self, key: tuple[str, int], connect_timeout: float, kept_only: bool = False
    ) -> tuple[socket.socket | None, bool]:
        """A kept connection that is still open, or a new one (None with ``kept_only``); and
        whether it was kept."""
        idle = self._idle.get(key)
        while idle:
            sock = idle.pop()
            if not readable(sock):
                return sock, True
            sock.close()
        if kept_only:
            return None, False
        sock = socket.create_connection(key, timeout=connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connects += 1
        return sock, False

    def _answer(self, sock: socket.socket, key: tuple[str, int]) -> Answer:
        """Read and parse the answer's head (skipping any ``1xx`` interim answer)."""
        buffered, answered = b"", False
        while True:
            end = buffered.find(b"\r\n\r\n")
            if end < 0 or end > MAX_HEAD_BYTES:
                if len(buffered) > MAX_HEAD_BYTES:
                    raise MalformedAnswer("the answer's head is too long")
                try:
                    data = sock.recv(_READ_SIZE)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    if answered:
                        raise
                    raise ClosedBeforeAnswer("the upstream reset the connection") from exc
                if not data:
                    if answered:
                        raise ConnectionResetError("the upstream closed the connection mid-head")
                    raise ClosedBeforeAnswer("the upstream closed the connection unanswered")
                buffered, answered = buffered + data, True
                continue
            head, buffered = buffered[:end], buffered[end + 4 :]
            status, headers, keep = _parse_head(head)
            if 100 <= status < 200:
                continue  # 100 Continue and the like: the real answer follows
            return Answer(status, headers, sock, buffered, keep, self, key)


class Sent:
    """A request written (:meth:`Pool.send`), its answer not read yet."""

    def __init__(self, pool: Pool, key: tuple[str, int], request: bytes, connect_timeout: float,
                 read_timeout: float) -> None:  # fmt: skip
        self._pool, self._key, self._request = pool, key, request
        self._timeouts = connect_timeout, read_timeout
        self._sock: socket.socket | None = None
        self._reused = False

    def write(self, kept_only: bool = False) -> bool:
        """Write the request; whether it was (only not with ``kept_only``, when no kept
        connection is idle). A kept connection the upstream closed meanwhile is replaced by a
        new one."""
        connect_timeout, read_timeout = self._timeouts
        while True:
            sock, reused = self._pool._checkout(self._key, connect_timeout, kept_only)
            if sock is None:
                return False
            try:
                sock.settimeout(read_timeout)
                sock.sendall(self._request)
            except (BrokenPipeError, ConnectionResetError) as exc:
                sock.close()
                if not reused:
                    raise ClosedBeforeAnswer("the upstream closed the connection") from exc
                continue
            except BaseException:
                sock.close()
                raise
            self._sock, self._reused = sock, reused
            return True

    def answer(self) -> Answer:
        """Read and parse the answer's head (once); a kept connection that the upstream closed
        before answering a byte is replaced by a new one and the request sent again."""
        while True:
            sock, self._sock = self._sock, None
            if sock is None:
                raise RuntimeError("the answer was read already, or the request closed")
            try:
                return self._pool._answer(sock, self._key)
            except ClosedBeforeAnswer:
                sock.close()
                if not self._reused:
                    raise
                self.write()
            except BaseException:
                sock.close()
                raise

    def close(self) -> None:
        """Give up on the answer (nothing once it was read)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _request_bytes(host: str, path: str, query: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path}{'?' + query if query else ''} HTTP/1.1", f"Host: {host}",
             "User-Agent: chat-relay", f"Content-Length: {len(body)}"]  # fmt: skip
    for name, value in headers.items():
        if _BAD_NAME.search(name) or _BAD_VALUE.search(value):
            raise ValueError(f"header {name!r} has characters a header cannot hold")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _parse_head(head: bytes) -> tuple[int, CaseInsensitiveDict, bool]:
    """(status, headers, whether the connection stays open after this answer)."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if version not in ("HTTP/1.1", "HTTP/1.0") or not (code.isdigit() and code.isascii()):
        raise MalformedAnswer(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    if len(lines) - 1 > MAX_HEADERS:
        raise MalformedAnswer("too many headers")
    headers: CaseInsensitiveDict[str] = CaseInsensitiveDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise MalformedAnswer(f"not a header line: {line[:80]!r}")
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    connection = headers.get("Connection", "").lower()
    keep = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return int(code), headers, keep
