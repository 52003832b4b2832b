"""A load generator for SSE: thousands of concurrent streams from one process, on greenlets.

Each viewer is one greenlet on a raw socket (no ``requests``: at thousands of viewers its
per-chunk overhead would be the bottleneck, not the server under test). It records, for every
event carrying the simulator's ``"x_sim_emitted_at"`` stamp, the time from the upstream's emit
to the moment its bytes arrived here. The caller must have monkey-patched with gevent.

HTTP/1.1 chunked framing is not decoded: the servers measured here write each event in one
chunk, so chunk-size lines fall between events and never inside one, and the parser only looks
for complete events (``\\n\\n``), their ``data:`` lines and their stamps.
"""

from __future__ import annotations

import re
import socket
import time
from array import array
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import gevent
from gevent.event import Event

STAMP = re.compile(rb'"x_sim_emitted_at":\s*([0-9.]+)')
DATA = re.compile(rb"(?:^|\n)data:")
DONE = re.compile(rb"(?:^|\n)data: ?\[DONE\]")


@dataclass
class Sink:
    """What a group of viewers saw: latencies (s) of stamped events and per-viewer counts."""

    since: float = 0.0  # stamps emitted before this (wall clock) are not latency samples
    latencies: array = field(default_factory=lambda: array("d"))
    received: array = field(default_factory=lambda: array("d"))  # wall clock, per sample
    events: list[int] = field(default_factory=list)  # events seen by each finished viewer
    errors: list[str] = field(default_factory=list)
    first_event_at: list[float] = field(default_factory=list)  # monotonic, per viewer
    connected: int = 0
    all_connected: Event = field(default_factory=Event)
    expected: int = 0  # viewers; all_connected is set when this many have their headers


def request_bytes(url: str, method: str = "GET", body: bytes = b"", headers=None) -> bytes:
    """An HTTP/1.1 request for ``url`` as bytes, ready to send."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [
        f"{method} {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        "Accept: text/event-stream",
        "Connection: close",
    ]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def view(addr: tuple[str, int], request: bytes, sink: Sink, timeout: float = 120.0) -> None:
    """One viewer: send ``request``, read events until ``[DONE]`` or the server closes."""
    events = 0
    started = time.monotonic()
    try:
        sock = socket.create_connection(addr, timeout=30)
    except OSError as exc:
        sink.errors.append(f"connect: {exc}")
        return
    try:
        sock.settimeout(timeout)
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            more = sock.recv(65536)
            if not more:
                sink.errors.append("closed before headers")
                return
            head += more
        head, _, buf = head.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        if status != b"200":
            sink.errors.append(f"HTTP {status.decode()}")
            return
        sink.connected += 1
        if sink.connected >= sink.expected:
            sink.all_connected.set()
        first = True
        latencies, received = sink.latencies, sink.received
        while True:
            end = buf.rfind(b"\n\n")
            if end >= 0:
                now = time.time()
                complete, buf = buf[:end], buf[end + 2 :]
                n = len(DATA.findall(complete))
                if n and first:
                    sink.first_event_at.append(time.monotonic())
                    first = False
                events += n
                for stamp in STAMP.findall(complete):
                    emitted = float(stamp)
                    if emitted >= sink.since:  # read each time: the scenario moves it
                        latencies.append(now - emitted)
                        received.append(now)
                if DONE.search(complete):
                    break
            more = sock.recv(65536)
            if not more:
                break
            buf += more
    except OSError as exc:
        sink.errors.append(f"after {time.monotonic() - started:.1f}s: {exc!r}")
    finally:
        sock.close()
        sink.events.append(events)


def spawn_viewers(
    urls: list[str], sink: Sink, *, method: str = "GET", body: bytes = b"", per_second: int = 2000
) -> list[gevent.Greenlet]:
    """Start one viewer per URL, at most ``per_second`` connections a second (a listen backlog
    overrun would turn into SYN retries of a second or more)."""
    sink.expected += len(urls)
    group = []
    for i, url in enumerate(urls):
        group.append(gevent.spawn(view, address(url), request_bytes(url, method, body), sink))
        if (i + 1) % 100 == 0:
            gevent.sleep(100 / per_second)
    return group


@dataclass(frozen=True)
class Summary:
    samples: int
    p50: float
    p99: float
    max: float

    def ms(self) -> str:
        if not self.samples:
            return "no samples"
        return f"{self.p50 * 1e3:.1f} / {self.p99 * 1e3:.1f} / {self.max * 1e3:.1f}"


def summarise(values) -> Summary:
    """p50, p99 and max of ``values`` (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return Summary(0, float("nan"), float("nan"), float("nan"))

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]

    return Summary(len(ordered), rank(0.50), rank(0.99), ordered[-1])
