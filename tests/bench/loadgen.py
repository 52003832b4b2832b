"""A load generator for SSE: thousands of concurrent streams from one process, one epoll loop.

    python -m tests.bench.loadgen --urls FILE --out DIR [--method POST --body FILE] [--timeout S]

Each line of ``--urls`` is one viewer. Every viewer's socket lives in one ``epoll`` loop (no
thread, no greenlet per viewer: at 100,000 events a second a greenlet switch per read would
make the measuring client the bottleneck, which is what the first version of this tool did).
For every event carrying the simulator's ``"x_sim_emitted_at"`` stamp it records the emit time
and the moment its bytes arrived, to ``DIR/emitted.bin`` and ``DIR/received.bin`` (float64
pairs, same order); per-viewer event counts and errors go to ``DIR/result.json``.

The moment of arrival is the kernel's (``SO_TIMESTAMPNS``: when the bytes reached the socket),
not when this loop got round to reading them. With a thousand sockets ready at once on a
shared core, the loop's own queue added 1-2 ms to the median, charged to whatever it was
measuring. A read that returns several events gets the time of its last segment for all of
them, which can only overstate a latency. It prints
``ready`` once every viewer has its response headers (or, with ``--ready-on sent``, once every
request is sent: flask-sse sends no headers before its first event).

HTTP/1.1 chunked framing is not decoded: the servers measured write each event in one chunk,
so chunk-size lines fall between events, never inside one. The parser only looks at complete
events (up to the last ``\\n\\n``), counting their ``data:`` lines and reading their stamps.
Not gevent-patched: run it as its own process.
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import resource
import select
import socket
import struct
import sys
import time
from array import array
from pathlib import Path
from urllib.parse import urlsplit

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python names it from 3.14
TIMESPEC = struct.Struct("@qq")
ANCILLARY = socket.CMSG_SPACE(TIMESPEC.size)
STAMP = re.compile(rb'"x_sim_emitted_at":\s*([0-9.]+)')
DATA = re.compile(rb"(?:^|\n)data:")
KEY = b'"x_sim_emitted_at":'  # the simulator adds it last: its value ends at "}"
CONNECTS_PER_TICK = 200  # per 50 ms: a listen backlog overrun would cost a 1 s SYN retry


def request_bytes(
    url: str, method: str = "GET", body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    """An HTTP/1.1 request for ``url`` as bytes, ready to send."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}",
             "Accept: text/event-stream", "Connection: close"]  # fmt: skip
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Stream:
    """One viewer's connection and what it has seen."""

    __slots__ = ("sock", "request", "buf", "headers", "events", "done", "error")

    def __init__(self, sock: socket.socket, request: bytes) -> None:
        self.sock, self.request = sock, request
        self.buf = b""
        self.headers = False
        self.events = 0
        self.done = False
        self.error = ""


def arrival(ancillary: list[tuple[int, int, bytes]]) -> float:
    """When the kernel received the last bytes read (wall clock); now, if it did not say."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            seconds, nanoseconds = TIMESPEC.unpack(data)
            return seconds + nanoseconds * 1e-9
    return time.time()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(urls: list[str], method: str, body: bytes, timeout: float, ready_on: str) -> dict:
    """Open every stream, read each to ``[DONE]``; the stamps seen and per-viewer results."""
    emitted, received = array("d"), array("d")
    poller = select.epoll()
    streams: dict[int, Stream] = {}
    todo = list(reversed(urls))
    open_ = ready_count = 0
    announced = False
    cpu_at_ready = 0.0
    deadline = time.monotonic() + timeout
    next_tick = 0.0

    def finish(stream: Stream, error: str = "") -> None:
        nonlocal open_
        stream.error = stream.error or error
        if stream.done or error:
            poller.unregister(stream.sock.fileno())
            stream.sock.close()
            open_ -= 1
            stream.done = True

    while (todo or open_) and time.monotonic() < deadline:
        now = time.monotonic()
        if todo and now >= next_tick:
            next_tick = now + 0.05
            for _ in range(min(CONNECTS_PER_TICK, len(todo))):
                url = todo.pop()
                parts = urlsplit(url)
                sock = socket.socket()
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                try:
                    sock.connect((parts.hostname, parts.port or 80))
                except BlockingIOError:
                    pass
                stream = Stream(sock, request_bytes(url, method, body))
                streams[sock.fileno()] = stream
                poller.register(sock.fileno(), select.EPOLLOUT | select.EPOLLIN)
                open_ += 1
        for fd, mask in poller.poll(0.05 if todo else 1.0):
            stream = streams[fd]
            if stream.request:
                if mask & (select.EPOLLERR | select.EPOLLHUP):
                    finish(stream, "connect failed")
                    continue
                if mask & select.EPOLLOUT:
                    sent = stream.sock.send(stream.request)
                    stream.request = stream.request[sent:]
                    if not stream.request:
                        poller.modify(fd, select.EPOLLIN)
                        if ready_on == "sent":
                            ready_count += 1
                continue
            try:  # a bigger buffer costs more to allocate
                data, ancillary, _, _ = stream.sock.recvmsg(16384, ANCILLARY)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    finish(stream, repr(exc))
                continue
            arrived = arrival(ancillary)
            if not data:
                finish(stream, "" if stream.done else "closed before [DONE]")
                continue
            buf = stream.buf + data
            if not stream.headers:
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if not sep:
                    stream.buf = buf
                    continue
                status = head.split(b" ", 2)[1]
                if status != b"200":
                    finish(stream, f"HTTP {status.decode()}")
                    continue
                stream.headers = True
                if ready_on == "headers":
                    ready_count += 1
                buf = rest
            end = buf.rfind(b"\n\n")
            if end < 0:
                stream.buf = buf
                continue
            complete, stream.buf = buf[:end], buf[end + 2 :]
            # Plain bytes searches: regular expressions here made this loop the bottleneck.
            stream.events += complete.count(b"data:")
            at = complete.find(KEY)
            while at >= 0:
                start = at + len(KEY)
                end = complete.find(b"}", start)
                emitted.append(float(complete[start:end]))
                received.append(arrived)
                at = complete.find(KEY, end)
            if b"[DONE]" in complete:
                stream.done = True
                finish(stream)
        if not announced and ready_count >= len(urls):
            announced = True
            cpu_at_ready = cpu_seconds()
            print("ready", time.time(), flush=True)
    errors = [s.error for s in streams.values() if s.error]
    errors += ["timed out"] * sum(1 for s in streams.values() if not s.done)
    return {
        "events": [s.events for s in streams.values()],
        "errors": errors,
        "cpu_seconds": cpu_seconds() - cpu_at_ready,  # this client's own cost, once all connected
        "emitted": emitted,
        "received": received,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", type=Path)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--ready-on", choices=["headers", "sent"], default="headers")
    args = parser.parse_args(argv)
    urls = args.urls.read_text().split()
    body = args.body.read_bytes() if args.body else b""
    result = run(urls, args.method, body, args.timeout, args.ready_on)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "emitted.bin", "wb") as f:
        result.pop("emitted").tofile(f)
    with open(args.out / "received.bin", "wb") as f:
        result.pop("received").tofile(f)
    (args.out / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
