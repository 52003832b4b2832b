"""Per-process fan-out: one Redis subscription shared by every local viewer.

A gunicorn process holds one pub/sub connection, whatever the number of viewers. Each viewer
has a bounded mailbox; the dispatcher greenlet formats each event once and offers it to every
mailbox without ever blocking. A viewer that falls behind (full mailbox) or may have missed
events (a reconnect) is marked *stale* and re-reads the replay log from its last id: the log is
the truth, pub/sub only says "something new".

The fast path: a viewer that has caught up hands its socket to the dispatcher (*direct* mode),
which then writes each live event's bytes, framed once per process, straight to it with one
non-blocking send, with no greenlet switch, mailbox or WSGI layer per viewer. The
first send that would block, fail, or skip an id hands the socket back to the viewer's own
greenlet with what is left to write; the slow path then takes over (see
:func:`relay.streaming.follow`). This is what lets one process feed thousands of viewers.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import gevent
from gevent.event import Event
from gevent.queue import Full, Queue
from redis import Redis
from redis.exceptions import RedisError

from relay.core import keys
from relay.core.backoff import Backoff
from relay.core.chunks import DONE_BYTES, decode_live
from relay.web.sse import format_event
from relay.web.subscription import Subscription

logger = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0  # seconds for Redis to confirm a subscription before a viewer gets 503
READ_WAIT = 1.0  # the dispatcher wakes at least this often (to PING a quiet connection)
ERROR_PAUSE = 0.1  # after an unexpected error in dispatching: do not spin on a poisoned read


class LiveEvent(NamedTuple):
    seq: int
    data: bytes
    frame: bytes  # the event already formatted as SSE, shared by every viewer
    done: bool
    chunk: bytes = b""  # ``frame`` in HTTP/1.1 chunked framing (live events only)


RESYNC = LiveEvent(0, b"", b"", False)
"""Put in a mailbox to wake its viewer so that it re-reads the log."""


def http_chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk, exactly as gunicorn frames each write of a response."""
    return b"%X\r\n%b\r\n" % (len(data), data)


class SubscribeTimeout(Exception):
    """The live subscription could not be confirmed in time (Redis unreachable)."""


class Viewer:
    """One stream's mailbox for the live events of one job."""

    __slots__ = (
        "job_id", "channel", "queue", "stale", "closable", "closed",
        "sock", "chunked", "direct", "sent", "pending", "finished", "prefix", "_write",
    )  # fmt: skip

    def __init__(self, job_id: str, maxsize: int, closable: bool = True) -> None:
        self.job_id = job_id
        self.channel = keys.live(job_id).encode()
        self.queue: Queue = Queue(maxsize)
        self.stale = False
        self.closable = closable  # ended early when the process shuts down
        self.closed = False
        self.sock: socket.socket | None = None  # set when the stream may take the fast path
        self.chunked = False
        self.direct = False  # the dispatcher writes to ``sock`` (only while this is true)
        self.sent = 0  # the last id written to the client (kept up to date while direct)
        self.pending = b""  # bytes of event ``sent`` a direct send could not write
        self.finished = False  # the dispatcher wrote [DONE]: the stream is complete
        self._write: Callable[[bytes], int] | None = None
        self.prefix = b""  # written before the first event (the renderer's retry hint)

    def allow_direct(self, sock: socket.socket, chunked: bool, prefix: bytes = b"") -> None:
        """Let the dispatcher write this viewer's live events to ``sock`` once caught up,
        the first one after ``prefix`` unless the viewer's own greenlet wrote one first."""
        self.sock, self.chunked, self.prefix = sock, chunked, prefix
        # gevent's socket wraps a non-blocking one: its own send is the cheapest call that can
        # never wait (the wrapper costs more than the send: RESULTS.md).
        raw = getattr(sock, "_sock", None)
        self._write = raw.send if raw is not None else partial(sock.send, timeout=0.0)  # type: ignore[call-arg]

    def go_direct(self, last: int) -> bool:
        """Hand the socket to the dispatcher, if nothing is waiting in the mailbox."""
        if self.sock is None or self.stale or self.closed or not self.queue.empty():
            return False
        self.sent, self.direct = last, True
        return True

    def take_back(self) -> int:
        """Take the socket back from the dispatcher; the last id the client now has.

        Writes what a partial direct send left over first, so the client's byte stream stays
        whole; a failure to write it ends the stream as any failed write does.
        """
        self.direct = False
        if self.pending:
            pending, self.pending = self.pending, b""
            self.sock.sendall(pending)  # type: ignore[union-attr]
        return self.sent

    def offer(self, event: LiveEvent) -> None:
        """Never blocks: a full mailbox marks the viewer stale instead of slowing the others."""
        if self.direct:
            self._send(event)
            return
        if self.stale:
            return
        try:
            self.queue.put_nowait(event)
        except Full:
            self.stale = True

    def _send(self, event: LiveEvent) -> None:
        """The fast path: one non-blocking send; anything unusual goes back to the viewer."""
        if event.seq != self.sent + 1:
            if event.seq > self.sent:  # a gap: the log has what pub/sub skipped
                self._hand_back()
            return
        data = event.chunk if self.chunked else event.frame
        if self.prefix:
            frame, self.prefix = self.prefix + event.frame, b""
            data = http_chunk(frame) if self.chunked else frame
        try:
            written = self._write(data)  # type: ignore[misc]
        except BlockingIOError:
            written = 0
        except OSError:
            self._hand_back()  # its own next write fails the same way and ends the stream
            return
        self.sent = event.seq
        if event.done:
            self.finished = True  # once ``pending`` is written, if any, the stream is complete
        if written < len(data):
            self.pending = data[written:]  # a slow client: its greenlet writes the rest
            self._hand_back()
        elif event.done:
            self.direct = False
            self._wake()

    def _hand_back(self) -> None:
        self.direct = False
        self.resync()

    def resync(self) -> None:
        self.stale = True
        self._wake()

    def close(self) -> None:
        """End this viewer's stream soon, without [DONE]: its client resumes elsewhere."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        try:
            self.queue.put_nowait(RESYNC)
        except Full:
            pass  # a full mailbox wakes its reader anyway


class Hub:
    """The process's subscription and the viewers it serves, keyed by live channel."""

    def __init__(
        self, redis: Redis, *, queue_size: int, subscribe_timeout: float = SUBSCRIBE_TIMEOUT
    ) -> None:
        self._redis = redis
        self._queue_size = queue_size
        self._subscribe_timeout = subscribe_timeout
        self._viewers: dict[bytes, set[Viewer]] = {}
        self._ready: dict[bytes, Event] = {}
        self._unacked: dict[bytes, int] = {}
        self._resync: set[bytes] = set()
        self._pubsub: Subscription | None = None
        self._broken = False
        self._runner: gevent.Greenlet | None = None
        self._connected_before = False  # a (re)connect after the first may have missed events
        self.closing = False

    @property
    def viewer_count(self) -> int:
        return sum(len(v) for v in self._viewers.values())

    def attach(self, job_id: str, *, closable: bool = True) -> Viewer:
        """Register a viewer and return once its channel's subscription is confirmed.

        Confirmation matters: only events published after it are sure to arrive live, so the
        caller must read the replay log *after* this returns (DESIGN.md, invariant 2).
        ``closable`` viewers are ended by :meth:`close_streams` (a stream can be resumed; a
        non-streamed answer cannot).
        """
        self._start()
        viewer = Viewer(job_id, self._queue_size, closable)
        if closable and self.closing:
            viewer.closed = True
        channel = viewer.channel
        viewers = self._viewers.get(channel)
        if viewers is None:
            self._viewers[channel] = {viewer}
            ready = self._ready[channel] = Event()
            self._send("subscribe", channel)
        else:
            viewers.add(viewer)
            ready = self._ready[channel]
        if not ready.wait(self._subscribe_timeout):
            self.detach(viewer)
            raise SubscribeTimeout(f"could not subscribe to job {job_id}")
        return viewer

    def detach(self, viewer: Viewer) -> None:
        """Forget a viewer (idempotent); the last one of a job unsubscribes its channel."""
        viewers = self._viewers.get(viewer.channel)
        if viewers is None or viewer not in viewers:
            return
        viewers.discard(viewer)
        viewer.direct = False
        if not viewers:
            del self._viewers[viewer.channel]
            self._ready.pop(viewer.channel, None)
            self._resync.discard(viewer.channel)
            self._send("unsubscribe", viewer.channel)

    def close_streams(self) -> int:
        """End every closable viewer's stream (the process is shutting down); how many."""
        self.closing = True
        closed = 0
        for viewers in list(self._viewers.values()):
            for viewer in list(viewers):
                if viewer.closable:
                    viewer.close()
                    closed += 1
        return closed

    # -- the dispatcher -------------------------------------------------------------------------

    def _start(self) -> None:
        # Lazily, in the process that serves viewers: gunicorn forks after the app is made.
        if self._runner is None or self._runner.dead:
            self._runner = gevent.spawn(self._run)

    def _send(self, command: str, channel: bytes) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return  # the dispatcher subscribes every known channel when it (re)connects
        try:
            if command == "subscribe":
                self._unacked[channel] = self._unacked.get(channel, 0) + 1
                pubsub.subscribe(channel)
            else:
                pubsub.unsubscribe(channel)
        except (RedisError, OSError) as exc:
            logger.warning("pub/sub %s failed for %s: %s", command, channel, exc)
            self._broken = True

    def _connect(self) -> None:
        pubsub = Subscription(self._redis)  # connected before other greenlets can see it
        self._pubsub, self._broken, self._unacked = pubsub, False, {}
        # Read after connecting (no switch from here on): viewers that attached meanwhile
        # found no connection and rely on this to subscribe them.
        channels = list(self._viewers)
        reconnect, self._connected_before = self._connected_before, True
        if channels:
            # After a reconnect, viewers already streaming may have missed events while it was
            # down. At the first connect nobody has streamed yet: their log read is after it.
            self._resync = set(channels) if reconnect else set()
            for channel in channels:
                self._unacked[channel] = 1
            self._pubsub.subscribe(*channels)
            if reconnect:
                logger.info("pub/sub reconnected; re-subscribed %d channels", len(channels))

    def _reset(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
        # New viewers must wait for the next confirmed subscription.
        self._ready = {channel: Event() for channel in self._viewers}

    def _run(self) -> None:
        backoff = Backoff()
        while True:
            try:
                if self._pubsub is None:
                    self._connect()
                if self._broken:
                    raise ConnectionError("a pub/sub command failed")
                for reply in self._pubsub.read(timeout=READ_WAIT):  # type: ignore[union-attr]
                    try:
                        self._dispatch(reply)
                    except Exception:  # one bad message must not drop the rest of the read
                        logger.exception("fan-out dispatcher error")
                backoff.reset()
            except (RedisError, OSError) as exc:
                delay = backoff.next()
                logger.warning("pub/sub connection lost (%s); retrying in %.1fs", exc, delay)
                self._reset()
                gevent.sleep(delay)
            except Exception:
                logger.exception("fan-out dispatcher error")
                gevent.sleep(ERROR_PAUSE)

    def _dispatch(self, reply: list | bytes) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # a PONG
        kind, channel = reply[0], reply[1]
        if kind == b"message":
            viewers = self._viewers.get(channel)
            if not viewers:
                return
            seq, data = decode_live(reply[2])
            frame = format_event(data, id=seq)
            event = LiveEvent(seq, data, frame, data == DONE_BYTES, http_chunk(frame))
            for viewer in viewers:
                viewer.offer(event)
        elif kind == b"subscribe":
            left = self._unacked.get(channel, 1) - 1
            if left > 0:
                self._unacked[channel] = left
                return
            self._unacked.pop(channel, None)
            if channel in self._resync:
                self._resync.discard(channel)
                for viewer in self._viewers.get(channel, ()):
                    viewer.resync()
            ready = self._ready.get(channel)
            if ready is not None:
                ready.set()
