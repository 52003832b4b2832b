"""The fast path (relay.fanout: ``Viewer.go_direct``) against real processes: caught-up viewers
whose live events the process's dispatcher writes straight to their gunicorn socket.

Each stream is read with a raw socket and checked byte for byte: the HTTP/1.1 chunked framing
decoded strictly (the dispatcher frames its writes itself, so a framing mistake would corrupt
the response), HTTP/1.0 bodies unframed, the retry hint once on the first event, ids
contiguous, one ``[DONE]`` at the end. Viewers attach while the job waits for its first chunk
(the simulator's ``first_delay``), so that its live events are the ones written directly;
each test checks that no event was logged yet once they are all attached.

The last tests reproduce bugs the first version of the fast path had (a doubled retry hint
after a hand-back, a [DONE] left unfinished by a partial send, plaintext written under TLS).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import fakeredis
import gevent
import gevent.socket
import openai
import pytest
import requests

from relay.core import keys
from relay.core.chunks import DONE_BYTES
from relay.core.jobs import JobStore
from relay.dev.simulator import reply_text
from relay.web.fanout import LiveEvent, Viewer, http_chunk
from relay.web.sse import format_event
from relay.web.streaming import follow
from tests.conftest import GUNICORN_CONF, Stack, free_port, relay_stack, start_process, wait_for
from tests.helpers import Received, chat_body, create_job

pytestmark = pytest.mark.timeout(60)
integration = pytest.mark.integration

KEEPALIVE = b": keep-alive\n\n"
OPENING = b": stream open\n\n"
RETRY_MS = 2000  # the relay's default RELAY_RETRY_MS
IO_TIMEOUT = 20.0  # the bound on reading any one response

# -- a raw HTTP client ---------------------------------------------------------------------------


class Conn:
    """One TCP connection to a relay; every read is bounded by the connection's deadline."""

    def __init__(self, base: str, timeout: float = IO_TIMEOUT, rcvbuf: int = 0) -> None:
        parts = urlsplit(base)
        self.host = f"{parts.hostname}:{parts.port}"
        self.deadline = time.monotonic() + timeout
        self.sock = socket.socket()
        if rcvbuf:  # before connecting: it sets the window the server may fill
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((parts.hostname, parts.port))
        self.buf = bytearray()
        self.eof = False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, target: str, version: str = "1.1", headers: dict[str, str] | None = None
    ) -> None:
        lines = [f"{method} {target} HTTP/{version}", f"Host: {self.host}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def _more(self) -> bool:
        """Read what the server sent next into the buffer; False at the end of the stream."""
        if self.eof:
            return False
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete response in time; have {bytes(self.buf[-300:])!r}")
        self.sock.settimeout(remaining)
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_until(self, sep: bytes, limit: int) -> bytes:
        """The bytes before ``sep`` (consumed with it); fails if not within ``limit`` bytes."""
        while True:
            at = self.buf.find(sep)
            if at >= 0:
                assert at <= limit, f"{bytes(self.buf[: limit + 20])!r}... is too long"
                out = bytes(self.buf[:at])
                del self.buf[: at + len(sep)]
                return out
            assert len(self.buf) <= limit, f"no {sep!r} in {bytes(self.buf[: limit + 20])!r}"
            if not self._more():
                raise AssertionError(f"connection closed before {sep!r}: {bytes(self.buf)!r}")

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise AssertionError(f"connection closed {n - len(self.buf)} bytes short")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_to_eof(self) -> bytes:
        while self._more():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def read_head(self) -> tuple[str, dict[str, str]]:
        """The status line and headers (names lower-cased) of the next response."""
        head = self.read_until(b"\r\n\r\n", 8192).decode("latin-1")
        status, *lines = head.split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"header {name} twice"
            headers[name.lower()] = value.strip()
        return status, headers

    def read_chunk(self) -> tuple[bytes, bytes]:
        """One chunk of a chunked body, decoded strictly: its chunk-size line plain hex (no
        extensions), its data followed by CRLF. (Its bytes on the wire, its data.)"""
        line = self.read_until(b"\r\n", 16)
        assert re.fullmatch(rb"[0-9A-Fa-f]+", line), f"bad chunk-size line {line!r}"
        size = int(line, 16)
        data = self.read_exact(size + 2)
        assert data[-2:] == b"\r\n", f"chunk of {size} bytes not followed by CRLF: {data!r}"
        return line + b"\r\n" + data, data[:-2]

    def read_chunked(self) -> list[tuple[bytes, bytes]]:
        """The rest of a chunked body, to its last-chunk (``0`` CRLF, then the CRLF that ends
        the message: no trailers), which is included."""
        chunks = []
        while True:
            chunks.append(self.read_chunk())
            if not chunks[-1][1]:
                return chunks


def target_of(url: str) -> str:
    """The request target (path and query) of an absolute URL."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


@dataclass
class Stream:
    """One viewer's response, read to its end."""

    status: str
    headers: dict[str, str]
    chunks: list[bytes] = field(default_factory=list)  # HTTP/1.1: the decoded chunks
    wire: bytes = b""  # HTTP/1.1: the chunked body as sent, without keep-alive chunks
    body: bytes = b""  # the body as the client sees it (de-chunked)


def read_sse_stream(
    base: str,
    url: str,
    *,
    version: str = "1.1",
    headers: dict[str, str] | None = None,
    started: threading.Event | None = None,
) -> Stream:
    """GET ``url``'s events from ``base`` on a raw socket, to the end of the response.

    HTTP/1.1 keeps the connection alive: after the body a second request on it must be
    answered normally, which it would not be were the body's framing off by a single byte.
    """
    with Conn(base) as conn:
        conn.request("GET", target_of(url), version, headers)
        status, response_headers = conn.read_head()
        if started is not None:
            started.set()
        stream = Stream(status, response_headers)
        if version == "1.0":
            stream.body = conn.read_to_eof()  # the server closes: that ends the body
            return stream
        framed = conn.read_chunked()
        stream.chunks = [data for _, data in framed[:-1]]
        stream.wire = b"".join(wire for wire, data in framed if data != KEEPALIVE)
        stream.body = b"".join(stream.chunks)
        conn.request("GET", "/healthz", headers={"Connection": "close"})
        after = conn.read_to_eof()
        assert after.startswith(b"HTTP/1.1 200 "), f"after the stream's end: {after[:200]!r}"
        assert b'"ok":true' in after.replace(b" ", b""), after
        return stream


# -- the event stream format ---------------------------------------------------------------------


@dataclass
class Events:
    ids: list[int]
    data: list[bytes]
    retry_lines: list[tuple[int, bytes]]  # (index of the event carrying it, the line)
    comments: list[bytes]

    @property
    def text(self) -> str:
        return Received(self.ids, [d.decode() for d in self.data]).text


def parse_sse(body: bytes) -> Events:
    """The events of a relay stream; fails on anything the relay should never write."""
    assert body.startswith(OPENING), f"the stream does not start with its opening: {body[:80]!r}"
    assert body.endswith(b"\n\n"), f"the stream ends mid-event: {body[-80:]!r}"
    assert b"\r" not in body, "a CR in the event stream (chunk framing leaked into the body?)"
    events = Events([], [], [], [])
    for block in body[:-2].split(b"\n\n"):
        lines = block.split(b"\n")
        if all(line.startswith(b": ") for line in lines):
            events.comments.extend(lines)
            continue
        fields: dict[bytes, list[bytes]] = {}
        for line in lines:
            name, sep, value = line.partition(b": ")
            assert sep and name in (b"id", b"data", b"retry"), f"bad line {line!r} in {block!r}"
            fields.setdefault(name, []).append(value)
        assert len(fields.get(b"id", ())) == 1, f"not one id in {block!r}"
        assert len(fields.get(b"data", ())) == 1, f"not one data line in {block!r}"
        for value in fields.get(b"retry", ()):
            events.retry_lines.append((len(events.ids), b"retry: " + value))
        assert re.fullmatch(rb"[1-9][0-9]*", fields[b"id"][0]), block
        events.ids.append(int(fields[b"id"][0]))
        events.data.append(fields[b"data"][0])
    return events


def check_events(events: Events, *, first_id: int = 1) -> None:
    """Contiguous ids from ``first_id``; JSON chunks, then one [DONE]; one retry hint, on the
    first event; only the opening and keep-alive comments."""
    assert events.ids == list(range(first_id, first_id + len(events.ids))), events.ids
    assert len(events.ids) >= 3
    assert events.data.count(b"[DONE]") == 1 and events.data[-1] == b"[DONE]"
    for data in events.data[:-1]:
        assert not json.loads(data).get("error"), data
    assert events.retry_lines == [(0, b"retry: %d" % RETRY_MS)], events.retry_lines
    assert events.comments[0] == b": stream open"
    assert set(events.comments[1:]) <= {b": keep-alive"}, events.comments


def without_keepalives(chunks: list[bytes]) -> list[bytes]:
    """A stream's writes apart from keep-alive comments, which depend on timing."""
    return [chunk for chunk in chunks if chunk != KEEPALIVE]


def check_chunks_are_whole_writes(chunks: list[bytes]) -> None:
    """Every chunk is exactly one SSE block (the relay writes each event or comment at once)."""
    for chunk in chunks:
        assert chunk.endswith(b"\n\n") and b"\n\n" not in chunk[:-2], f"chunk {chunk!r}"


# -- the stack -----------------------------------------------------------------------------------


def viewers_of(base: str) -> int:
    return requests.get(f"{base}/healthz", timeout=5).json()["viewers"]


def logged(stack: Stack, job_id: str) -> int:
    """How many events the job's replay log holds."""
    with stack.redis() as client:
        return client.llen(keys.events(job_id))


def last_logged(stack: Stack, job_id: str) -> bytes | None:
    with stack.redis() as client:
        return client.lindex(keys.events(job_id), -1)


def wait_for_the_end(stack: Stack, job_id: str, timeout: float = 15) -> None:
    wait_for(lambda: last_logged(stack, job_id) == DONE_BYTES, timeout, f"job {job_id} to end")


def wait_for_viewers(base: str, count: int) -> None:
    wait_for(lambda: viewers_of(base) == count, 10, f"{count} viewers attached on {base}")


def watch_before_first_event(
    stack: Stack,
    job: dict,
    viewers: list[tuple[str, dict]],
    pool: ThreadPoolExecutor,
) -> list[Stream]:
    """Start one reader per ``(base, options)``; return their streams once all have ended.

    Asserts that they all attached before the job logged its first event, so that the live
    events reach them on the fast path.
    """
    per_base: dict[str, int] = {}
    for viewer_base, _ in viewers:
        per_base[viewer_base] = per_base.get(viewer_base, 0) + 1
    for viewer_base in per_base:
        wait_for_viewers(viewer_base, 0)  # the previous tests' streams are over
    futures = [
        pool.submit(read_sse_stream, viewer_base, job["events_url"], **options)
        for viewer_base, options in viewers
    ]
    for viewer_base, count in per_base.items():
        wait_for_viewers(viewer_base, count)
    assert logged(stack, job["id"]) == 0, "first_delay too short: the job started too soon"
    return [future.result(timeout=IO_TIMEOUT + 5) for future in futures]


@pytest.fixture(scope="module")
def fast_stack(redis_server: str, simulator: str, log_dir: Path) -> Iterator[tuple[Stack, str]]:
    """The module's gunicorn (the fast path on, as by default) and worker; requests of up to
    32 MB, for replies bigger than a connection's kernel buffers."""
    with relay_stack(
        redis_server, simulator, log_dir, RELAY_MAX_BODY_BYTES=str(32 * 1024 * 1024)
    ) as started:
        yield started


@pytest.fixture(scope="module")
def plain_base(fast_stack: tuple[Stack, str]) -> str:
    """A second gunicorn on the same Redis with the fast path switched off."""
    return fast_stack[0].start_web(env={"RELAY_DIRECT_WRITES": "false"})


# -- the tests -----------------------------------------------------------------------------------


@integration
def test_chunked_viewers_attached_before_the_first_event_read_identical_strict_streams(
    fast_stack,
):
    stack, base = fast_stack
    body = chat_body("twenty viewers", tokens=40, interval=0.02, first_delay=1.5)
    job = create_job(base, body)
    with ThreadPoolExecutor(20) as pool:
        streams = watch_before_first_event(stack, job, [(base, {})] * 20, pool)

    reference = without_keepalives(streams[0].chunks)
    for stream in streams:
        assert stream.status == "HTTP/1.1 200 OK"
        assert stream.headers["transfer-encoding"] == "chunked"
        assert stream.headers["content-type"].startswith("text/event-stream")
        check_chunks_are_whole_writes(stream.chunks)
        events = parse_sse(stream.body)
        check_events(events)
        assert events.text == reply_text(body)
        assert without_keepalives(stream.chunks) == reference
        assert stream.wire == streams[0].wire  # the same bytes for everyone, framing included
    assert reference[0] == OPENING
    assert reference[1].startswith(b"retry: %d\nid: 1\ndata: " % RETRY_MS)


@integration
def test_http_1_0_viewers_get_an_unframed_body_and_a_closed_connection(fast_stack):
    stack, base = fast_stack
    body = chat_body("http/1.0", tokens=30, interval=0.02, first_delay=1.5)
    job = create_job(base, body)
    # HTTP/1.0 and HTTP/1.1 viewers of one job: the dispatcher frames each its own way.
    with ThreadPoolExecutor(6) as pool:
        streams = watch_before_first_event(
            stack, job, [(base, {"version": "1.0"})] * 3 + [(base, {})] * 3, pool
        )
    old_ones, new_ones = streams[:3], streams[3:]

    for stream in old_ones:
        assert stream.status == "HTTP/1.0 200 OK"
        assert "transfer-encoding" not in stream.headers
        assert stream.headers["connection"] == "close"
        assert "content-length" not in stream.headers
        # No chunk framing at all: the body is the event stream itself, ended by the close
        # (read_sse_stream read it to EOF within its deadline).
        assert stream.body.startswith(OPENING)
        assert not re.match(rb"[0-9A-Fa-f]+\r\n", stream.body)
        assert stream.body.endswith(b"data: [DONE]\n\n")
        events = parse_sse(stream.body)
        check_events(events)
        assert events.text == reply_text(body)
    expected = b"".join(without_keepalives(new_ones[0].chunks))
    for stream in old_ones:
        assert stream.body.replace(KEEPALIVE, b"") == expected
    for stream in new_ones:
        check_events(parse_sse(stream.body))


@integration
def test_a_late_joiner_with_last_event_id_gets_exactly_the_events_after_it(fast_stack):
    stack, base = fast_stack
    body = chat_body("late joiner", tokens=120, interval=0.02, first_delay=0.3)
    job = create_job(base, body)
    wait_for_viewers(base, 0)
    with ThreadPoolExecutor(2) as pool:
        whole_future = pool.submit(read_sse_stream, base, job["events_url"])
        wait_for(lambda: logged(stack, job["id"]) >= 20, 10, "the job's 20th event")
        joined = threading.Event()
        late_future = pool.submit(
            read_sse_stream,
            base,
            job["events_url"],
            headers={"Last-Event-ID": "20"},
            started=joined,
        )
        assert joined.wait(10), "the late joiner got no response headers"
        # Attached (headers are sent after attaching) while the job still runs: the events
        # it has not missed reach it live.
        assert last_logged(stack, job["id"]) != DONE_BYTES, "joined too late"
        whole = whole_future.result(timeout=IO_TIMEOUT + 5)
        late = late_future.result(timeout=IO_TIMEOUT + 5)

    whole_events, late_events = parse_sse(whole.body), parse_sse(late.body)
    check_events(whole_events)
    assert whole_events.text == reply_text(body)
    check_events(late_events, first_id=21)
    assert late_events.ids == whole_events.ids[20:]
    assert late_events.data == whole_events.data[20:]
    check_chunks_are_whole_writes(late.chunks)


@integration
def test_the_fast_path_and_the_slow_path_write_the_same_stream(fast_stack, plain_base):
    stack, base = fast_stack
    body = chat_body("both paths", tokens=40, interval=0.02, first_delay=1.5)
    job = create_job(base, body)
    with ThreadPoolExecutor(6) as pool:
        streams = watch_before_first_event(
            stack,
            job,
            [(base, {}), (plain_base, {})] * 2 + [(plain_base, {"version": "1.0"})],
            pool,
        )
    fast, plain, fast2, plain2, plain_old = streams

    for stream in (fast, plain, fast2, plain2):
        check_chunks_are_whole_writes(stream.chunks)
        check_events(parse_sse(stream.body))
    # The same events, the same framing, the same chunks, whichever path wrote them.
    assert without_keepalives(fast.chunks) == without_keepalives(plain.chunks)
    assert without_keepalives(fast2.chunks) == without_keepalives(plain2.chunks)
    assert without_keepalives(fast.chunks) == without_keepalives(fast2.chunks)
    # Byte for byte on the wire too: the dispatcher frames chunks exactly as gunicorn does.
    assert fast.wire == plain.wire == fast2.wire == plain2.wire
    assert plain_old.body.replace(KEEPALIVE, b"") == b"".join(without_keepalives(fast.chunks))
    assert parse_sse(fast.body).text == reply_text(body)


@integration
def test_head_on_the_events_url_answers_at_once_and_writes_no_body(fast_stack):
    stack, base = fast_stack
    job = create_job(base, chat_body("head", tokens=20, interval=0.02, first_delay=1.0))
    wait_for_viewers(base, 0)
    with Conn(base, timeout=IO_TIMEOUT) as conn:
        conn.request("HEAD", target_of(job["events_url"]))
        status, headers = conn.read_head()
        assert status == "HTTP/1.1 200 OK"
        assert headers["content-type"].startswith("text/event-stream")
        assert "transfer-encoding" not in headers and "content-length" not in headers
        assert headers["connection"] == "keep-alive"
        # Answered at once, not held until the job ends; its viewer is gone at once too.
        assert logged(stack, job["id"]) == 0, "the HEAD was answered only after the job started"
        wait_for_viewers(base, 0)
        # The job streams while the connection stays open: none of its live events may reach
        # this socket, so the next response on it comes right after the HEAD's headers.
        wait_for_the_end(stack, job["id"])
        conn.request("GET", "/healthz", headers={"Connection": "close"})
        after = conn.read_to_eof()
    assert after.startswith(b"HTTP/1.1 200 "), f"bytes after the HEAD response: {after[:300]!r}"
    assert b'"ok":true' in after.replace(b" ", b""), after

    # A finished job's events: the same, at once.
    response = requests.head(job["events_url"], timeout=5)
    assert response.status_code == 200 and response.content == b""


@integration
def test_the_openai_sdk_streams_whole_replies_through_the_fast_path(fast_stack):
    _, base = fast_stack
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=20)
    bodies = [
        chat_body(f"sdk {i}", tokens=30 + 10 * i, interval=0.02, first_delay=0.5) for i in range(3)
    ]

    def complete(body: dict) -> tuple[str, list[str], object]:
        stream = client.chat.completions.create(
            model="simulator",
            messages=body["messages"],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"simulator": body["simulator"]},
        )
        text, reasons, usage = "", [], None
        with stream:
            for chunk in stream:
                for choice in chunk.choices:
                    text += choice.delta.content or ""
                    if choice.finish_reason:
                        reasons.append(choice.finish_reason)
                usage = chunk.usage or usage
        return text, reasons, usage

    wait_for_viewers(base, 0)
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(complete, bodies, timeout=IO_TIMEOUT + 5))
    for body, (text, reasons, usage) in zip(bodies, results, strict=True):
        assert text == reply_text(body)
        assert reasons == ["stop"]
        assert usage is not None and usage.completion_tokens == body["simulator"]["tokens"]


@integration
def test_viewers_that_vanish_mid_stream_leave_the_others_whole(fast_stack):
    stack, base = fast_stack
    body = chat_body("vanishing viewers", tokens=60, interval=0.02, first_delay=1.5)
    job = create_job(base, body)
    wait_for_viewers(base, 0)
    gone = [Conn(base) for _ in range(4)]
    try:
        for conn in gone:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.request("GET", target_of(job["events_url"]))
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(read_sse_stream, base, job["events_url"]) for _ in range(4)]
            wait_for_viewers(base, 8)
            assert logged(stack, job["id"]) == 0, "first_delay too short: the job started too soon"
            for conn in gone:  # each vanishes (a reset) once a few events were written to it
                conn.read_head()
                while conn.buf.count(b"\nid: ") < 5:
                    assert conn._more(), "the relay closed the stream early"
                conn.close()
            streams = [future.result(timeout=IO_TIMEOUT + 5) for future in futures]
    finally:
        for conn in gone:
            conn.close()
    for stream in streams:
        events = parse_sse(stream.body)
        check_events(events)
        assert events.text == reply_text(body)
    # The vanished viewers' writes failed (on the fast path: the dispatcher's), which ended
    # their streams and detached them.
    wait_for_viewers(base, 0)


@integration
def test_a_slow_reader_handed_back_to_its_greenlet_gets_the_retry_hint_once(fast_stack):
    stack, base = fast_stack
    # More than the kernel can buffer for one connection, so a direct send has to fall short.
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    pieces = 2 * wmem_max // 100_000 + 1
    if pieces > 300:
        pytest.skip(f"tcp_wmem allows {wmem_max} bytes per socket: too big a reply needed")
    words = [f"{i:05d}" + "x" * (100_000 - 6) for i in range(pieces)]
    body = chat_body("slow reader", reply=" ".join(words), interval=0.001, first_delay=1.0)
    job = create_job(base, body)
    wait_for_viewers(base, 0)
    with Conn(base, timeout=30, rcvbuf=8192) as conn:
        conn.request("GET", target_of(job["events_url"]))
        conn.read_head()
        wait_for_viewers(base, 1)
        assert logged(stack, job["id"]) == 0, "first_delay too short: the job started too soon"
        first = [conn.read_chunk()]  # the opening, keep-alives, then event 1 (direct)
        while first[-1][1] in (OPENING, KEEPALIVE):
            first.append(conn.read_chunk())
        assert first[-1][1].startswith(b"retry: "), first
        # The client stops reading while the rest of the job is written to it.
        wait_for_the_end(stack, job["id"])
        rest = conn.read_chunked()
    events = parse_sse(b"".join(data for _, data in first + rest))
    assert events.text == reply_text(body)
    assert events.ids == list(range(1, len(events.ids) + 1)) and events.data[-1] == b"[DONE]"
    check_events(events)  # exactly one retry hint, on the first event


@integration
def test_the_fast_path_keeps_a_tls_connection_intact(fast_stack, tmp_path):
    stack, base = fast_stack
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    port = free_port()
    cmd = [
        sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "-k", "gevent", "-w", "1",
        "-b", f"127.0.0.1:{port}", "--certfile", str(cert), "--keyfile", str(key),
        "relay:create_app()",
    ]  # fmt: skip
    stack.procs.append(start_process("gunicorn-tls", cmd, stack.log_dir, stack.settings()))
    tls = f"https://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{tls}/healthz", timeout=1, verify=cert).ok, 20, "TLS gunicorn")
    body = chat_body("tls", tokens=20, interval=0.02, first_delay=1.0)
    job = create_job(base, body)
    url = tls + target_of(job["events_url"])
    try:
        with requests.get(url, stream=True, timeout=IO_TIMEOUT, verify=cert) as response:
            received = b"".join(response.iter_content(chunk_size=None))
    except requests.exceptions.SSLError as exc:
        pytest.fail(f"the TLS stream broke: {exc}")
    events = parse_sse(received)
    check_events(events)
    assert events.text == reply_text(body)


class NoHub:
    """follow() only detaches from the hub at the end."""

    def detach(self, viewer: Viewer) -> None:
        pass


def test_a_done_event_a_direct_send_could_not_write_still_ends_the_stream():
    # In process, with a real socket that takes no more bytes: when this happens to [DONE] in
    # a live relay depends on the client's and the kernel's timing, so it is forced here.
    redis = fakeredis.FakeRedis()
    store = JobStore(redis, retention=60, max_age=600)
    job_id = store.create({"model": "m", "messages": []})
    redis.rpush(keys.events(job_id), b'{"n": 1}')
    ours, theirs = gevent.socket.socketpair()
    with ours, theirs:
        viewer = Viewer(job_id, 8)
        viewer.allow_direct(ours, chunked=False)
        events = follow(store, NoHub(), viewer, 0, idle=0.05)  # type: ignore[arg-type]
        assert next(events).seq == 1  # from the log; rendered (the renderer is left out here)
        rest = gevent.spawn(lambda: list(itertools.islice(events, 5)))
        with gevent.Timeout(5):
            while not viewer.direct:  # caught up: the dispatcher now writes to the socket
                gevent.sleep(0.001)
        raw = ours._sock  # the client stops reading: fill what the kernel buffers for it
        for size in (65536, 1024, 1):
            with contextlib.suppress(BlockingIOError):
                while True:
                    raw.send(b":" * size)
        redis.rpush(keys.events(job_id), DONE_BYTES)
        frame = format_event(DONE_BYTES, id=2)
        viewer.offer(LiveEvent(2, DONE_BYTES, frame, True, http_chunk(frame)))
        assert viewer.pending == frame and not viewer.direct  # handed back, nothing written

        received = bytearray()

        def read() -> None:  # the client reads again
            while not received.endswith(frame):
                received.extend(theirs.recv(65536))

        reader = gevent.spawn(read)
        rest.join(5)
        reader.join(5)
        assert received.endswith(frame)
        assert rest.successful() and rest.value == [], f"after [DONE]: {rest.value}"


def event(seq: int) -> LiveEvent:
    data = b'{"n": %d}' % seq
    frame = format_event(data, id=seq)
    return LiveEvent(seq, data, frame, False, http_chunk(frame))


@pytest.mark.parametrize("chunked", [False, True], ids=["http-1.0", "http-1.1"])
def test_the_direct_path_writes_each_id_once_and_in_order(chunked: bool):
    """The dispatcher's dedupe, deterministically (load tests catch it only by timing): once a
    viewer has sent id 5, live events 4 and 5 write nothing and 6 writes exactly its frame."""
    ours, theirs = gevent.socket.socketpair()
    with ours, theirs:
        theirs.setblocking(False)
        viewer = Viewer("job_x", 8)
        viewer.allow_direct(ours, chunked=chunked)
        assert viewer.go_direct(5) and viewer.direct
        for seq in (4, 5):
            viewer.offer(event(seq))
            with pytest.raises(BlockingIOError):
                theirs._sock.recv(65536)
        six = event(6)
        viewer.offer(six)
        assert theirs._sock.recv(65536) == (six.chunk if chunked else six.frame)
        assert viewer.direct and viewer.sent == 6 and viewer.queue.empty()
        viewer.offer(event(8))  # a gap: handed back to the log, nothing written
        assert not viewer.direct and viewer.stale
        with pytest.raises(BlockingIOError):
            theirs._sock.recv(65536)
