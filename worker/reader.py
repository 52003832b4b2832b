"""Reading an upstream's streamed body: bytes in, OpenAI chunks out, in one of two ways.

:func:`iter_chunks` pulls: the job's greenlet reads and waits, chunk by chunk. :func:`follow_chunks`
pushes: the event loop calls back when the socket is readable, and each chunk is handled right
there, with no greenlet switch, no gevent ``Timeout`` and no failed ``recv`` per chunk, which is
cheaper per chunk (``python -m tests.bench.readloop``; RESULTS.md). Both share
:class:`ChunkParser`, so what counts as a chunk, an error or the end is decided in one place.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import gevent
import orjson
import requests
import urllib3.exceptions
from gevent.event import AsyncResult

from relay.core.chunks import DONE, dumps, malformed

from . import http1
from .chunked import ChunkedDecoder, ChunkedError
from .sse_decoder import SSEDecoder, SSEProtocolError
from .upstream import UpstreamError, error_from_json

Response = requests.Response | http1.Answer

_READ_SIZE = 64 * 1024
# Reads one event-loop callback may make before letting the loop run: an upstream that floods
# must not keep the worker's other jobs, or its heartbeat, from their turn.
READS_PER_WAKE = 4

Chunk = tuple[str, dict[str, Any]]  # the data line as relayed, and its parsed JSON


class ChunkParser:
    """SSE bytes in, ``(data, chunk)`` pairs out, up to ``[DONE]`` (:attr:`done`)."""

    __slots__ = ("_sse", "done")

    def __init__(self) -> None:
        self._sse = SSEDecoder()
        self.done = False

    def feed(self, block: bytes) -> list[Chunk]:
        """The chunks ``block`` completes; raises :class:`UpstreamError` for an error object or
        malformed data, and ``SSEProtocolError`` for an overlong line."""
        chunks: list[Chunk] = []
        for event in self._sse.feed(block):
            data = event.data
            if data == DONE:
                self.done = True
                break
            if not data.strip():
                continue
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise UpstreamError(
                    "The upstream sent malformed data (not JSON).", code="upstream_malformed"
                ) from None
            if not isinstance(chunk, dict):
                raise UpstreamError(
                    "The upstream sent malformed data (not an object).", code="upstream_malformed"
                )
            if chunk.get("error") or event.event == "error":
                message, type_, code = error_from_json(chunk, "error event")
                raise UpstreamError(
                    f"The upstream failed mid-stream: {message}", type=type_, code=code
                )
            if problem := malformed(chunk):
                raise UpstreamError(
                    f"The upstream sent a chunk of an unexpected shape: {problem}.",
                    code="upstream_malformed",
                )
            chunks.append(((data if "\n" not in data else dumps(chunk)), chunk))
        return chunks


@contextlib.contextmanager
def _read_errors() -> Iterator[None]:
    """Turn a failed read of the body into the :class:`UpstreamError` it means for the job."""
    try:
        yield
    except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
        raise UpstreamError(
            "The upstream stopped sending (read timeout).", code="upstream_timeout"
        ) from None
    except (SSEProtocolError, ChunkedError) as exc:
        raise UpstreamError(
            f"The upstream sent a malformed stream: {exc}", code="upstream_malformed"
        ) from None
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
        raise UpstreamError(
            f"The upstream connection broke mid-stream ({exc.__class__.__name__}).",
            code="upstream_disconnected",
        ) from None


class _ChunkedBody:
    """A chunked, unencoded body read straight from http.client's buffered socket reader (or
    from an :class:`http1.Answer`, which has the same ``read1``).

    http.client's own chunk reading takes a ``readline``, a read and a CRLF read per chunk, each
    through urllib3's layers (:mod:`worker.chunked`).
    """

    def __init__(self, fp: Any) -> None:
        self.fp = fp
        self.framing = ChunkedDecoder()

    def read(self) -> bytes:
        """The next payload bytes, waiting for them; b"" after the last chunk."""
        while not self.framing.done:
            block = self.fp.read1(_READ_SIZE)
            if not block:
                raise ConnectionResetError("the upstream closed the connection mid-body")
            if payload := self.framing.feed(block):
                return payload
        return b""


def _chunked_body(response: Response) -> _ChunkedBody | None:
    """The body as :class:`_ChunkedBody` if it is chunked and not content-encoded, else None."""
    identity = response.headers.get("Content-Encoding", "identity").lower() == "identity"
    if isinstance(response, http1.Answer):
        return _ChunkedBody(response) if response.chunked and identity else None
    inner = getattr(response.raw, "_fp", None)  # http.client's response, headers already read
    fp: Any = getattr(inner, "fp", None)
    if (
        not getattr(inner, "chunked", False)
        or getattr(inner, "chunk_left", 0) is not None  # it has started on the body
        or not hasattr(fp, "read1")
        or not identity
    ):
        return None
    return _ChunkedBody(fp)


def body_reader(response: Response) -> Callable[[], bytes]:
    """A function giving the body's next bytes as they arrive, and b"" at its end.

    A chunked body (what every streaming upstream sends) is read by :class:`_ChunkedBody`;
    anything else as it comes. A body cut off before its last chunk raises
    ``ConnectionResetError``.
    """
    body = _chunked_body(response)
    if body is not None:
        return body.read
    if isinstance(response, http1.Answer):
        return response.read_body
    return partial(response.raw.read1, _READ_SIZE)


def iter_chunks(response: Response) -> Iterator[Chunk]:
    """Each ``data`` payload with its parsed JSON, up to ``[DONE]`` (not included).

    Raises :class:`UpstreamError` for an error object, malformed data, a read timeout, or a
    connection that breaks; returns normally at ``[DONE]`` or at a clean end of the body (the
    caller decides whether an end without ``[DONE]`` is acceptable).
    """
    parser = ChunkParser()
    read = body_reader(response)
    reads = 0
    with _read_errors():
        while not parser.done and (block := read()):
            yield from parser.feed(block)
            reads += 1
            if reads % READS_PER_WAKE == 0:
                gevent.sleep(0)  # a read that never has to wait never yields: let others run


def follow_chunks(
    response: Response, on_chunk: Callable[[str, dict[str, Any]], None], timeout: float,
    flush: Callable[[], None] | None = None,
) -> bool:  # fmt: skip
    """Call ``on_chunk`` for each chunk up to ``[DONE]``, from the event loop; return at the end,
    saying whether the connection may carry another request (:func:`keep_alive`).

    The same outcomes as iterating :func:`iter_chunks` (and an exception from ``on_chunk``
    ends the stream with it), but each chunk is handled by a callback of the event loop the
    moment its bytes arrive, so ``on_chunk`` must never block (it may queue, not wait). A
    silence of ``timeout`` seconds is a read timeout. A body that is not plainly chunked is
    pulled through :func:`iter_chunks` instead. ``flush`` sends what the first bytes' chunks
    queued: called once, from the caller's greenlet, after the first bytes (or, pulled, the
    first chunk) were handled.
    """
    body = _chunked_body(response)
    if isinstance(response, http1.Answer):
        sock = response.sock
    else:
        sock = getattr(getattr(response.raw, "connection", None), "sock", None)
    if body is None or not isinstance(sock, socket.socket):
        for data, chunk in iter_chunks(response):
            on_chunk(data, chunk)
            if flush is not None:
                sending, flush = flush, None
                sending()
        return False
    # What came with an http1 answer's head is read first, a bounded share at a time.
    recv = response.read1 if isinstance(response, http1.Answer) else sock.recv
    parser = ChunkParser()
    ended: AsyncResult = AsyncResult()
    loop = gevent.get_hub().loop
    heard = [loop.now()]

    def handle(payload: bytes) -> None:
        for data, chunk in parser.feed(payload):
            on_chunk(data, chunk)
        if parser.done or body.framing.done:
            ended.set(None)

    def readable() -> None:
        try:
            for _ in range(READS_PER_WAKE):
                if ended.ready():
                    return
                try:
                    raw = recv(_READ_SIZE)
                except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    return
                if not raw:
                    raise ConnectionResetError("the upstream closed the connection mid-body")
                heard[0] = loop.now()
                handle(body.framing.feed(raw))
            # More may be waiting (under TLS, already decrypted, with no readiness event to
            # come): carry on at the loop's next turn, after the other jobs and the heartbeat.
            loop.run_callback(readable)
        except BaseException as exc:  # noqa: BLE001 - it ends the stream, in the job's greenlet
            ended.set_exception(exc)

    def check_silence() -> None:
        if loop.now() - heard[0] >= timeout and not ended.ready():
            ended.set_exception(TimeoutError("no data within the read timeout"))

    with _read_errors():
        # What http.client buffered past the headers, or the first bytes (waited for here, as
        # the pull path does): after this, the buffer is empty and the socket is all there is
        # (an http1.Answer's ``recv`` reads what is left of its own buffer before the socket).
        handle(body.read())
        # What the first chunk queued (its publish) goes out before the set-up: sent from here
        # by ``flush``, or by whoever sends it, given a turn of the loop.
        flush() if flush is not None else gevent.sleep(0)
        if ended.ready():
            ended.get()
            return _ended_cleanly(body, sock)
        sock.settimeout(0.0)
        watcher = loop.io(sock.fileno(), 1)  # 1: readable
        ticker = loop.timer(timeout / 4, timeout / 4)
        watcher.start(readable)
        ticker.start(check_silence)
        try:
            readable()  # TLS may hold decrypted bytes that no readiness event will announce
            ended.get()
        finally:
            watcher.stop()
            ticker.stop()
            watcher.close()
            ticker.close()
        return _ended_cleanly(body, sock)


def _ended_cleanly(body: _ChunkedBody, sock: socket.socket) -> bool:
    """Whether the body ended exactly: its last chunk and final blank line read, and nothing
    after them. [DONE] usually comes in the same write as the body's end; if the end is not
    there yet, it is not waited for (the connection is closed instead).

    Every byte read so far went through the decoder: ``read1`` hands over all that http.client
    had buffered (less than one read's size), and after it the socket is read directly.
    """
    framing = body.framing
    if not framing.complete and not isinstance(sock, ssl.SSLSocket):
        sock.settimeout(0.0)
        with contextlib.suppress(OSError):  # BlockingIOError: not there yet
            framing.feed(sock.recv(_READ_SIZE))
    return framing.complete and not framing.extra


def keep_alive(response: Response) -> None:
    """Give the connection of a body that ended cleanly back to the session's pool, for the
    next job to the same upstream (a new connection costs a TCP handshake, and TLS's)."""
    if isinstance(response, http1.Answer):
        response.release()
        return
    inner = response.raw._fp  # http.client's response: closing it leaves the socket open
    if inner is not None:
        inner.close()
        response.raw.release_conn()
