"""The benchmarks' upstream: the simulator's streams, served from one epoll loop.

    python -m tests.bench.upstream --port PORT

It answers ``POST /v1/chat/completions`` (``stream: true``) with the chunks
:mod:`relay.dev.simulator` would send for the same body (its ``simulator`` options: ``tokens``,
``interval``, ``first_delay``, ``timestamps``), and ``GET /healthz``. Faults, formats and
non-streamed answers are refused with 400: the benchmarks use none of them.

Why not ``relay.dev.simulator`` itself: a real upstream runs on someone else's machine, but here it
shares the relay's two cores. The gevent simulator (a greenlet, a timer and a pywsgi write per
chunk) used 0.35-0.5 of a core at 10,000 chunks/s, taken from the system under test. This one
encodes each chunk once when the request arrives, keeps every stream in one timer heap and
writes what is due with one ``send`` per stream and moment (under 0.1 of a core at that load).
Chunks are due at ``first_delay + k * interval`` from the request, so the offered rate does not
drift; each carries ``"x_sim_emitted_at"``, stamped just before its bytes are written.
Not gevent-patched: run it as its own process.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import select
import socket
import sys
import time

from relay.dev.simulator import _chunks, encode_event, make_plan

STAMP = b',"x_sim_emitted_at":%r}\n\n'
END = b"0\r\n\r\n"
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n")  # fmt: skip

Moment = tuple[float, list[tuple[bytes, bool]]]  # when, and each event's bytes (+ stamp?)


def http_chunk(data: bytes) -> bytes:
    return b"%X\r\n%b\r\n" % (len(data), data)


def plain_response(status: str, body: bytes, close: bool) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return (head + ("\r\nConnection: close" if close else "") + "\r\n\r\n").encode() + body


def schedule(body: dict, start: float) -> list[Moment]:
    """The stream's moments: when each is due and its events, encoded but for the stamp.

    A stamped event's bytes stop short of its JSON object's closing brace, where
    ``"x_sim_emitted_at"`` goes. Raises ``ValueError`` for a body this upstream does not serve.
    """
    plan = make_plan(body, 0.02)
    if plan.fail or plan.formats or body.get("stream") is not True:
        raise ValueError("the bench upstream serves plain streams only (stream: true)")
    moments: list[Moment] = []
    due, events = start + plan.first_delay, []
    for pause, chunk in _chunks(body, plan, str(body.get("model") or "simulator")):
        if pause:
            if events:
                moments.append((due, events))
            due, events = due + plan.interval, []
        encoded = encode_event(chunk)
        events.append((encoded[: -len(b"}\n\n")], True) if plan.timestamps else (encoded, False))
    events.append((encode_event("[DONE]"), False))
    moments.append((due, events))
    return moments


class Conn:
    """One client connection: its unparsed input, unsent output and its stream's moments."""

    __slots__ = ("sock", "inbuf", "outbuf", "moments", "close")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbuf = b""
        self.outbuf = b""
        self.moments: list[Moment] = []  # the stream's moments still to come, last first
        self.close = False  # close once the current answer is written


class Upstream:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.listener = socket.create_server((host, port), backlog=4096)
        self.listener.setblocking(False)
        self.poller = select.epoll()
        self.poller.register(self.listener.fileno(), select.EPOLLIN)
        self.conns: dict[int, Conn] = {}
        self.timers: list[tuple[float, int, Conn]] = []
        self._order = itertools.count()  # ties in the heap never compare connections

    def serve_forever(self) -> None:
        while True:
            timeout = max(0.0, self.timers[0][0] - time.time()) if self.timers else 1.0
            for fd, mask in self.poller.poll(timeout):
                if fd == self.listener.fileno():
                    self._accept()
                elif (conn := self.conns.get(fd)) is not None:
                    if mask & select.EPOLLOUT:
                        self._flush(conn)
                    if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self._read(conn)
            now = time.time()
            while self.timers and self.timers[0][0] <= now:
                conn = heapq.heappop(self.timers)[2]
                if conn.sock.fileno() >= 0:  # not dropped meanwhile
                    self._emit(conn)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            # Small SSE writes must leave at once, not wait for the previous segment's ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns[sock.fileno()] = Conn(sock)
            self.poller.register(sock.fileno(), select.EPOLLIN)

    def _read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.inbuf += data
        self._answer_requests(conn)

    def _answer_requests(self, conn: Conn) -> None:
        """Answer each complete request in the input, in order, unless a stream is running."""
        while not conn.moments and not conn.close:
            head, sep, rest = conn.inbuf.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:])}  # fmt: skip
            length = int(headers.get("content-length") or 0)
            if len(rest) < length:
                return
            body, conn.inbuf = rest[:length], rest[length:]
            conn.close = headers.get("connection", "").lower() == "close"
            method, target = (lines[0].split(" ") + ["", ""])[:2]
            self._answer(conn, method, target.split("?")[0], body)

    def _answer(self, conn: Conn, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path == "/healthz":
            self._write(conn, plain_response("200 OK", b'{"ok":true}', conn.close))
        elif method != "POST" or not path.endswith("/chat/completions"):
            self._write(conn, plain_response("404 Not Found", b"{}", conn.close))
        else:
            try:
                conn.moments = schedule(json.loads(body), time.time())[::-1]
            except ValueError as exc:  # json.JSONDecodeError included
                error = json.dumps({"error": {"message": str(exc), "type": "invalid_request"}})
                self._write(conn, plain_response("400 Bad Request", error.encode(), conn.close))
            else:
                self._write(conn, HEAD + (b"Connection: close\r\n\r\n" if conn.close else b"\r\n"))
                heapq.heappush(self.timers, (conn.moments[-1][0], next(self._order), conn))
                return
        self._close_if_done(conn)

    def _emit(self, conn: Conn) -> None:
        """Write the stream's next moment, stamped now; schedule the one after."""
        _, events = conn.moments.pop()
        stamp = STAMP % time.time()
        data = b"".join(
            http_chunk(event + stamp if stamped else event) for event, stamped in events
        )
        self._write(conn, data if conn.moments else data + END)
        if conn.moments:
            heapq.heappush(self.timers, (conn.moments[-1][0], next(self._order), conn))
        else:
            self._close_if_done(conn)
            self._answer_requests(conn)  # one sent behind the stream (pipelined)

    def _write(self, conn: Conn, data: bytes) -> None:
        if conn.outbuf:
            conn.outbuf += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(conn)
            return
        if sent < len(data):
            conn.outbuf = data[sent:]
            self.poller.modify(conn.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except BlockingIOError:
            return
        except OSError:
            self._drop(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            self.poller.modify(conn.sock.fileno(), select.EPOLLIN)
            self._close_if_done(conn)

    def _close_if_done(self, conn: Conn) -> None:
        """Close a ``Connection: close`` client once its answer is written."""
        if conn.close and not conn.moments and not conn.outbuf:
            self._drop(conn)

    def _drop(self, conn: Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0:
            return
        self.poller.unregister(fd)
        del self.conns[fd]
        conn.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    Upstream(args.port, args.host).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
