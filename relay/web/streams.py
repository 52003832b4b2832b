"""Streamed responses that follow one job: attaching its viewer, the fast path, the stalled
client's cut-off, and what happens when the stream closes."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterator

from flask import Response, current_app, request
from redis.exceptions import RedisError

from relay.core.errors import RateLimited, Unavailable
from relay.core.settings import Settings
from relay.web.cancelling import cancel_and_keep_reply
from relay.web.fanout import LiveEvent, SubscribeTimeout, Viewer
from relay.web.state import settings, state
from relay.web.streaming import follow, retry_field, sse_bytes

logger = logging.getLogger(__name__)

_TCP_CORK = getattr(socket, "TCP_CORK", None)  # Linux's

STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    # nginx buffers proxied responses unless told not to, which kills the typewriter effect.
    "X-Accel-Buffering": "no",
}


def attach(job_id: str, *, closable: bool = True) -> Viewer:
    """This process's viewer of the job, subscribed (503 if Redis does not confirm in time)."""
    try:
        return state().hub.attach(job_id, closable=closable)
    except SubscribeTimeout:
        raise Unavailable("The relay could not subscribe to the job; try again.") from None


Render = Callable[[Iterator[LiveEvent | None], Viewer], Iterator[bytes]]


class Opened:
    """A creator's stream, subscribed before its job is stored, and stored already counted as
    a viewer. Its job's ``CREATE`` says whether the subscription had taken effect by then
    (:meth:`stored`), which it has unless the process's pub/sub connection was still being
    made: then nothing can have been published on the job's channel before it, and the stream
    needs no backlog read and no wait for the subscription's confirmation (round trips off the
    way to the first token). Else it waits for the confirmation and reads the log first."""

    __slots__ = ("viewer", "release_slots", "fresh")

    def __init__(self, viewer: Viewer, release_slots: Callable[[], None]) -> None:
        self.viewer = viewer
        self.release_slots = release_slots
        self.fresh = False

    def stored(self, subscribed: bool) -> None:
        """The job is stored; its live channel had this stream's subscription then, or not."""
        self.fresh = subscribed

    def confirm(self) -> None:
        """Wait for the subscription (503 if Redis does not confirm it)."""
        try:
            state().hub.confirm(self.viewer)
        except SubscribeTimeout:
            raise Unavailable("The relay could not subscribe to the job; try again.") from None

    def abandon(self) -> None:
        """The job was not stored after all: unsubscribe and give the stream's slots back."""
        state().hub.detach(self.viewer)
        self.release_slots()


def open_stream(job_id: str) -> Opened:
    """Start subscribing a creator's stream to the job it is about to store (429 past the
    stream caps), without waiting: the subscription's round trip runs while the job's writes
    are prepared, and the job's store says whether it took effect first (:class:`Opened`)."""
    relay = state()
    release_slots = _take_stream_slots(relay.open_streams, relay.settings)
    return Opened(relay.hub.attach(job_id, wait=False), release_slots)


def stream_response(
    job_id: str,
    after: int,
    render: Render,
    *,
    mimetype: str,
    headers: dict[str, str] | None = None,
    owner: bool = False,
    direct: bytes | None = None,
    opened: Opened | None = None,
) -> Response:
    """A streamed response following one job, rendered by ``render``.

    Attaching happens in the view, so a failure is still a proper JSON error. ``owner`` marks
    the stream that created its job: closed before the end while nobody else watches, it
    cancels the job (``RELAY_CANCEL_ON_DISCONNECT``). Given ``direct`` (the bytes to write before
    the first event), the dispatcher may write live events to the client itself (only for
    :func:`sse_bytes`, see :func:`follow`). Given ``opened`` (:func:`open_stream`, before the
    job was stored), the stream is already subscribed and counted.
    """
    relay = state()
    if opened is not None:
        viewer, release_slots = opened.viewer, opened.release_slots
    else:
        release_slots = _take_stream_slots(relay.open_streams, relay.settings)
        try:
            viewer = attach(job_id)
        except BaseException:
            release_slots()
            raise
        try:
            relay.store.add_viewer(job_id, 1)
        except BaseException:
            relay.hub.detach(viewer)  # no response will ever close it: never leave it registered
            release_slots()
            raise
    config = relay.settings
    environ = request.environ
    client = _client_socket(environ)
    if direct is not None and config.direct_writes:
        _allow_direct(viewer, direct, environ)
    restore_timeout = _cut_off_stalled_client(client, config.send_timeout_seconds)
    # Read configuration here: the generator runs after the request context is gone.
    idle = config.keepalive_seconds
    cancel_if_abandoned = owner and config.cancel_on_disconnect
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    finished = False

    def body() -> Iterator[bytes]:
        nonlocal finished
        fresh = opened is not None and opened.fresh
        events = follow(relay.store, relay.hub, viewer, after, idle=idle, fresh=fresh)
        yield from with_head(render(events, viewer), client)
        finished = True

    def on_close() -> None:
        # An unstarted generator's finally never runs, so detach here as well (idempotent).
        relay.hub.detach(viewer)
        release_slots()
        restore_timeout()
        try:
            remaining = relay.store.add_viewer(job_id, -1)
            # A stream ended by shutdown was not abandoned: its client resumes elsewhere.
            abandoned = not finished and not viewer.closed
            if cancel_if_abandoned and abandoned and remaining <= 0:
                logger.info("job %s: its only viewer left; cancelling", job_id)
                with app.app_context():
                    cancel_and_keep_reply(job_id)
        except RedisError as exc:
            logger.warning("job %s: could not update viewers on close: %s", job_id, exc)

    response = Response(body(), mimetype=mimetype, headers={**STREAM_HEADERS, **(headers or {})})
    response.call_on_close(on_close)
    if opened is not None and not opened.fresh:
        # Subscribed too late to be sure of every event live: confirmed now, then the stream
        # reads the log first. Unconfirmed, it is a creator that left at once.
        try:
            opened.confirm()
        except Unavailable:
            response.close()
            raise
    return response


STREAMS_RETRY_AFTER = 5  # seconds: other streams of the same client end, or time out, meanwhile


def _take_stream_slots(counts: Counter[str], config: Settings) -> Callable[[], None]:
    """Count this stream against its client address and its read token, in this process; 429
    past a cap. Returns what gives the slots back (once, however often it is called)."""
    token = request.args.get("token")
    caps = [(f"addr:{request.remote_addr}", config.max_streams_per_client, "client address")]
    if token:
        caps.append((f"token:{token}", config.max_streams_per_token, "read token"))
    for name, cap, what in caps:
        if cap and counts[name] >= cap:
            raise RateLimited(
                f"Too many open streams for this {what} (at most {cap} per relay process); "
                "close one or try again shortly.",
                retry_after=STREAMS_RETRY_AFTER,
                code="too_many_streams",
            )
    for name, _, _ in caps:
        counts[name] += 1
    released = False

    def release() -> None:
        nonlocal released
        if released:
            return
        released = True
        for name, _, _ in caps:
            counts[name] -= 1
            if counts[name] <= 0:
                del counts[name]

    return release


def _client_socket(environ: dict) -> socket.socket | None:
    """The client's socket under gunicorn (``-k gevent``: "gunicorn.socket", ``-k
    gevent_pywsgi``: "gunicorn.sock"), or None."""
    return environ.get("gunicorn.socket") or environ.get("gunicorn.sock")


def with_head(chunks: Iterator[bytes], sock: socket.socket | None) -> Iterator[bytes]:
    """``chunks``, the first corked on ``sock``: the server writes the response's head and its
    first bytes separately, and the client (and every hop between) would get two packets, each
    a wake-up, where one does (nginx's ``tcp_nopush``). Uncorked once the server asks for more
    (both are written then), or when the stream closes."""
    if sock is None or _TCP_CORK is None:
        yield from chunks
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)
    except OSError:  # not TCP (a Unix socket), or closed already
        yield from chunks
        return
    corked = True
    try:
        for first in chunks:
            yield first
            break
        corked = False
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)
        yield from chunks
    finally:
        if corked:  # closed at its first chunk, or it failed before
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 0)
        close = getattr(chunks, "close", None)
        if close is not None:  # as ``yield from`` would have: the renderer's own ends run
            close()


def _allow_direct(viewer: Viewer, prefix: bytes, environ: dict) -> None:
    """The fast path needs the client's socket and how the server frames the body: known for
    gunicorn's gevent worker (HTTP/1.1 chunked, one chunk per write; HTTP/1.0 raw)."""
    sock = environ.get("gunicorn.socket")
    if sock is None or environ.get("REQUEST_METHOD") == "HEAD":  # HEAD: gunicorn writes no body
        return
    protocol = environ.get("SERVER_PROTOCOL")
    # Plain HTTP/1.x on a plain socket only: under TLS (gunicorn --certfile) the raw socket
    # beneath would get plaintext, and HTTP/2 multiplexes streams on one socket.
    if protocol not in ("HTTP/1.0", "HTTP/1.1") or hasattr(sock, "cipher"):
        return
    viewer.allow_direct(sock, protocol == "HTTP/1.1", prefix)


def _cut_off_stalled_client(sock: socket.socket | None, seconds: float) -> Callable[[], None]:
    """Give up on a client that takes no bytes for ``seconds`` (it stopped reading).

    Such a viewer costs only its bounded mailbox (it falls back to the replay log), but its
    connection and greenlet would stay for ever; cut off, it can resume with Last-Event-ID.
    Writes to the client block on this socket, so its timeout bounds each one (gunicorn's
    gevent workers expose the socket; other servers keep their own behaviour). Returns what
    puts the socket's own timeout back once the stream is over.
    """
    if sock is None or seconds <= 0:
        return lambda: None
    previous = sock.gettimeout()
    sock.settimeout(seconds)

    def restore() -> None:  # a kept-alive connection then waits as gunicorn means it to
        try:
            sock.settimeout(previous)
        except OSError:
            pass  # already closed

    return restore


def event_stream(
    job_id: str,
    after: int,
    headers: dict[str, str] | None = None,
    *,
    owner: bool = False,
    opened: Opened | None = None,
) -> Response:
    """The job as ``text/event-stream``."""
    retry_ms = settings().retry_ms
    return stream_response(
        job_id,
        after,
        lambda events, viewer: sse_bytes(events, retry_ms=retry_ms, viewer=viewer),
        mimetype="text/event-stream",
        headers=headers,
        owner=owner,
        direct=retry_field(retry_ms),
        opened=opened,
    )
