"""worker.http1, the worker's client for plain-HTTP upstreams, against a raw socket server that
answers each request with exactly the bytes a test chooses: keep-alive and its races, and
answers that are not HTTP."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.conftest import wait_for
from tests.helpers import read_request
from worker.reader import follow_chunks, keep_alive
from worker.upstream import (
    Session,
    Upstream,
    UpstreamError,
    answer_of,
    open_stream,
    send_on_kept,
)

pytestmark = pytest.mark.timeout(30)

CHUNK = b'{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}'
BODY = b"data: " + CHUNK + b"\n\ndata: [DONE]\n\n"
STREAM = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%X\r\n%b\r\n0\r\n\r\n" % (len(BODY), BODY)
)

# Given the connection's socket and the request's number on it (0, 1, ...), answer it; return
# False to close the connection afterwards.
Answerer = Callable[[socket.socket, int], bool]


class RawServer:
    """Reads each request (head and Content-Length body) and lets ``answer`` reply."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"
        self.answer: Answerer = lambda conn, n: conn.sendall(STREAM) or True
        self.connections = 0
        self.requests: list[bytes] = []
        self.open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffered, number = b"", 0
        with conn:
            while (request := read_request(conn, buffered)) is not None:
                head, body, buffered = request
                self.requests.append(head + b"\r\n\r\n" + body)
                try:
                    if not self.answer(conn, number):
                        return
                except OSError:
                    return
                number += 1

    def close(self) -> None:
        self.listener.close()
        for conn in self.open:
            conn.close()


@pytest.fixture
def server() -> Iterator[RawServer]:
    raw = RawServer()
    try:
        yield raw
    finally:
        raw.close()


def stream(session: Session, url: str, **upstream: object) -> list[dict]:
    """One job's request: its chunks; the connection kept when the body ended cleanly."""
    response = open_stream(session, Upstream(base_url=url, **upstream), {"messages": []})  # type: ignore[arg-type]
    chunks: list[dict] = []
    try:
        if follow_chunks(response, lambda _, chunk: chunks.append(chunk), 5.0):
            keep_alive(response)
    finally:
        response.close()
    return chunks


def test_one_connection_carries_job_after_job(server):
    with Session() as session:
        for _ in range(5):
            assert len(stream(session, server.url)) == 1
    assert server.connections == 1 and len(server.requests) == 5


def test_the_request_goes_out_in_one_piece_with_its_headers(server):
    with Session() as session:
        stream(session, server.url, api_key="sk-test", headers=(("X-Team", "drafts"),))
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert b"Authorization: Bearer sk-test" in lines and b"X-Team: drafts" in lines
    assert b"Accept-Encoding: identity" in lines
    assert body.startswith(b"{") and b'"stream":true' in body


def test_a_connection_the_upstream_closed_while_idle_is_not_used(server):
    server.answer = lambda conn, n: conn.sendall(STREAM) or False  # then closes it
    with Session() as session:
        for _ in range(3):
            assert len(stream(session, server.url)) == 1
    assert server.connections == 3


def test_an_answer_that_says_close_is_not_kept(server):
    closing = STREAM.replace(b"chunked\r\n", b"chunked\r\nConnection: close\r\n", 1)
    server.answer = lambda conn, n: conn.sendall(closing) or True  # but keeps it open
    with Session() as session:
        for _ in range(2):
            assert len(stream(session, server.url)) == 1
    assert server.connections == 2


def test_a_kept_connection_closed_without_an_answer_is_replaced_once(server):
    # The keep-alive race: the upstream closes an idle connection as the next request arrives.
    server.answer = lambda conn, n: n == 0 and (conn.sendall(STREAM) or True)
    with Session() as session:
        assert len(stream(session, server.url)) == 1
        assert len(stream(session, server.url)) == 1  # sent again on a new connection
    assert server.connections == 2 and len(server.requests) == 3


def test_a_request_sent_early_goes_only_on_a_kept_connection(server):
    """The claim loop's early send (send_on_kept) never connects: without an idle kept
    connection it writes nothing; with one, it writes there, and the answer is read later as
    any other."""
    upstream = Upstream(base_url=server.url)
    with Session() as session:
        assert send_on_kept(session, upstream, {"messages": []}) is None
        assert server.connections == 0 and not server.requests
        assert len(stream(session, server.url)) == 1  # leaves its connection kept
        sent = send_on_kept(session, upstream, {"messages": []})
        assert sent is not None
        wait_for(lambda: len(server.requests) == 2, 5, "the early request")
        response = answer_of(upstream, sent)
        chunks: list[dict] = []
        try:
            follow_chunks(response, lambda _, chunk: chunks.append(chunk), 5.0)
        finally:
            response.close()
    assert len(chunks) == 1 and server.connections == 1
    assert b'"stream":true' in server.requests[1]


def test_an_early_request_whose_kept_connection_was_closed_goes_again_on_a_new_one(server):
    server.answer = lambda conn, n: n == 0 and (conn.sendall(STREAM) or True)
    upstream = Upstream(base_url=server.url)
    with Session() as session:
        assert len(stream(session, server.url)) == 1
        sent = send_on_kept(session, upstream, {"messages": []})
        assert sent is not None
        response = answer_of(upstream, sent)
        response.close()
    assert response.status_code == 200
    assert server.connections == 2 and len(server.requests) == 3


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_flush_runs_once_after_the_first_chunk_was_handled(server, framing):
    """What the first chunk queued goes out from the job's greenlet (``flush``), once, whether
    the body is followed from the event loop (chunked) or pulled (a Content-Length body)."""
    if framing == "content-length":
        plain = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        answer = plain + b"Content-Length: %d\r\n\r\n%b" % (len(BODY), BODY)
        server.answer = lambda conn, n: conn.sendall(answer) or True
    chunks: list[dict] = []
    seen_at_flush: list[int] = []
    with Session() as session:
        response = open_stream(session, Upstream(base_url=server.url), {"messages": []})
        try:
            follow_chunks(response, lambda _, chunk: chunks.append(chunk), 5.0,
                          lambda: seen_at_flush.append(len(chunks)))  # fmt: skip
        finally:
            response.close()
    assert seen_at_flush == [1] and len(chunks) == 1


def test_a_new_connection_closed_without_an_answer_is_an_error(server):
    server.answer = lambda conn, n: False
    with Session() as session, pytest.raises(UpstreamError) as info:
        stream(session, server.url)
    assert info.value.code == "upstream_unreachable" and info.value.retryable
    assert len(server.requests) == 1


def test_an_interim_answer_is_skipped(server):
    server.answer = lambda conn, n: conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" + STREAM) or True
    with Session() as session:
        assert len(stream(session, server.url)) == 1


@pytest.mark.parametrize(
    "answer",
    [b"SSH-2.0-OpenSSH_9.2\r\n\r\n", b"HTTP/1.1 2xx OK\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
     b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * 70_000 + b"\r\n\r\n"],
    ids=["not-http", "bad-status", "bad-header", "huge-head"],
)  # fmt: skip
def test_an_answer_that_is_not_http_is_malformed(server, answer):
    server.answer = lambda conn, n: conn.sendall(answer) or True
    with Session() as session, pytest.raises(UpstreamError) as info:
        stream(session, server.url)
    assert info.value.code == "upstream_malformed" and not info.value.retryable


@pytest.mark.parametrize(
    "header", [("X-Team", "a\r\nX-Injected: 1"), ("X-Team\r\nX-Injected", "1"), ("", "x")]
)
def test_a_header_that_would_split_the_request_is_refused_unsent(server, header):
    with Session() as session, pytest.raises(UpstreamError) as info:
        stream(session, server.url, headers=(header,))
    assert "invalid" in info.value.message and not info.value.retryable
    assert server.requests == []


def test_bytes_after_the_end_keep_a_connection_from_reuse(server):
    server.answer = lambda conn, n: conn.sendall(STREAM + b"HTTP/1.1 200 OK\r\n") or True
    with Session() as session:
        for _ in range(2):
            assert len(stream(session, server.url)) == 1
    assert server.connections == 2


def test_a_silent_upstream_is_a_timeout(server):
    server.answer = lambda conn, n: True  # reads the request, never answers
    with Session() as session, pytest.raises(UpstreamError) as info:
        stream(session, server.url, read_timeout=0.3)
    assert info.value.code == "upstream_timeout" and info.value.retryable


def test_the_pool_keeps_at_most_max_idle_connections(server):
    with Session(max_idle=2) as session:
        answers = [open_stream(session, Upstream(base_url=server.url), {}) for _ in range(4)]
        for answer in answers:
            follow_chunks(answer, lambda _, chunk: None, 5.0)
            keep_alive(answer)
        assert sum(len(idle) for idle in session.plain._idle.values()) == 2
    assert session.plain._idle == {}  # closed with the session
