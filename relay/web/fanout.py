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
import time
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
from relay.core.connections import Client, Router
from relay.web.sse import format_event
from relay.web.subscription import Subscription

logger = logging.getLogger(__name__)

SUBSCRIBE_TIMEOUT = 5.0  # seconds for Redis to confirm a subscription before a viewer gets 503
READ_WAIT = 1.0  # the dispatcher wakes at least this often (to PING a quiet connection)
ERROR_PAUSE = 0.1  # after an unexpected error in dispatching: do not spin on a poisoned read
LINGER_SECONDS = 60.0  # a node's subscription connection outlives its last channel this long


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
        "job_id", "channel", "queue", "stale", "suspect", "closable", "closed",
        "sock", "chunked", "direct", "sent", "pending", "finished", "prefix", "_write",
    )  # fmt: skip

    def __init__(self, job_id: str, maxsize: int, closable: bool = True) -> None:
        self.job_id = job_id
        self.channel = keys.live(job_id).encode()
        self.queue: Queue = Queue(maxsize)
        self.stale = False
        # Its subscription was lost and made again (a node went away): the log that now
        # serves the job may be behind what this viewer has seen (a promoted replica).
        self.suspect = False
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

    def resync(self, suspect: bool = False) -> None:
        self.stale = True
        self.suspect = self.suspect or suspect
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
    """The process's subscriptions and the viewers it serves, keyed by live channel.

    Job events are published on sharded channels (``SPUBLISH``), which a Redis Cluster sends
    only through the node that owns the channel's slot: the hub holds one subscription per node
    it needs (:class:`_Link`), never one per viewer or per job. One Redis is one such node.
    """

    def __init__(
        self, redis: Client, *, queue_size: int, subscribe_timeout: float = SUBSCRIBE_TIMEOUT
    ) -> None:
        self._router = Router(redis)
        self._queue_size = queue_size
        self._subscribe_timeout = subscribe_timeout
        self._viewers: dict[bytes, set[Viewer]] = {}
        self._ready: dict[bytes, Event] = {}
        self._links: dict[str, _Link] = {}
        self._link_of: dict[bytes, _Link] = {}
        self.closing = False

    @property
    def viewer_count(self) -> int:
        return sum(len(v) for v in self._viewers.values())

    @property
    def connections(self) -> int:
        """Subscription connections this process holds (one per node with its viewers)."""
        return sum(1 for link in self._links.values() if link.pubsub is not None)

    def attach(self, job_id: str, *, closable: bool = True, wait: bool = True) -> Viewer:
        """Register a viewer and return once its channel's subscription is confirmed (or at
        once, without ``wait``: then :meth:`confirm` it before relying on it).

        Confirmation matters: only events published after it are sure to arrive live, so the
        caller must read the replay log *after* this returns (DESIGN.md, invariant 2).
        ``closable`` viewers are ended by :meth:`close_streams` (a stream can be resumed; a
        non-streamed answer cannot).
        """
        viewer = Viewer(job_id, self._queue_size, closable)
        if closable and self.closing:
            viewer.closed = True
        channel = viewer.channel
        viewers = self._viewers.get(channel)
        if viewers is None:
            self._viewers[channel] = {viewer}
            self._ready[channel] = Event()
            self._route(channel).add(channel)
        else:
            viewers.add(viewer)
        if wait:
            self.confirm(viewer)
        return viewer

    def confirm(self, viewer: Viewer) -> None:
        """Return once the viewer's channel is subscribed; else detach it and raise
        :class:`SubscribeTimeout`."""
        ready = self._ready.get(viewer.channel)
        if ready is None or not ready.wait(self._subscribe_timeout):
            self.detach(viewer)
            raise SubscribeTimeout(f"could not subscribe to job {viewer.job_id}")

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
            link = self._link_of.pop(viewer.channel, None)
            if link is not None:
                link.remove(viewer.channel)

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

    # -- routing channels to nodes ---------------------------------------------------------------

    def _route(self, channel: bytes) -> _Link:
        """The link of the node that owns ``channel``'s slot now (started if new)."""
        name = self._router.node(channel)
        link = self._links.get(name)
        if link is None:
            link = self._links[name] = _Link(self, name)
        link.start()
        self._link_of[channel] = link
        return link

    def reroute(self, channels: set[bytes]) -> None:
        """Learn the slots' owners again and move ``channels`` whose node changed (a failover,
        a migrated slot, a MOVED reply); their viewers re-read the log, which may hold events
        that no subscription delivered meanwhile."""
        try:
            self._router.refresh()
        except Exception as exc:  # noqa: BLE001 - the cluster is mid-failover: try again later
            logger.warning("could not refresh the cluster's slots: %s", exc)
            return
        for channel in channels:
            old = self._link_of.get(channel)
            if channel not in self._viewers or old is None:
                continue
            if self._router.node(channel) != old.name:
                old.remove(channel)
                self._route(channel).add(channel, resync=True)
                logger.info("live channel %s moved to node %s", channel, self._router.node(channel))

    def ready(self, channel: bytes) -> None:
        """The channel's subscription is confirmed: its waiting viewers may read the log."""
        event = self._ready.get(channel)
        if event is not None:
            event.set()

    def unready(self, channel: bytes) -> None:
        """New viewers of ``channel`` must wait for its next confirmed subscription."""
        if channel in self._viewers and self._ready.get(channel, Event()).is_set():
            self._ready[channel] = Event()

    def resync(self, channel: bytes) -> None:
        for viewer in self._viewers.get(channel, ()):
            viewer.resync(suspect=True)

    def deliver(self, channel: bytes, message: bytes) -> None:
        viewers = self._viewers.get(channel)
        if not viewers:
            return
        seq, data = decode_live(message)
        frame = format_event(data, id=seq)
        event = LiveEvent(seq, data, frame, data == DONE_BYTES, http_chunk(frame))
        for viewer in viewers:
            viewer.offer(event)

    def node_client(self, name: str) -> Redis:
        return self._router.node_client(name)


class _Link:
    """One node's sharded subscription, the channels routed to it, and the greenlet that reads
    it: the dispatcher, which formats each event once and offers it to every viewer."""

    def __init__(self, hub: Hub, name: str) -> None:
        self.hub = hub
        self.name = name  # the node's name ("" for one Redis)
        self.channels: set[bytes] = set()
        self.pubsub: Subscription | None = None
        self.broken = False
        self.unacked: dict[bytes, int] = {}
        self.pending_resync: set[bytes] = set()
        self.connected_before = False  # a (re)connect after the first may have missed events
        self.runner: gevent.Greenlet | None = None

    def start(self) -> None:
        # Lazily, in the process that serves viewers: gunicorn forks after the app is made.
        if self.runner is None or self.runner.dead:
            self.runner = gevent.spawn(self._run)

    def add(self, channel: bytes, *, resync: bool = False) -> None:
        self.channels.add(channel)
        if resync:
            self.pending_resync.add(channel)
        self._send("SSUBSCRIBE", channel)

    def remove(self, channel: bytes) -> None:
        self.channels.discard(channel)
        self.pending_resync.discard(channel)
        self._send("SUNSUBSCRIBE", channel)

    def _send(self, command: str, channel: bytes) -> None:
        pubsub = self.pubsub
        if pubsub is None:
            return  # the dispatcher subscribes every channel of the link when it (re)connects
        try:
            if command == "SSUBSCRIBE":
                self.unacked[channel] = self.unacked.get(channel, 0) + 1
            pubsub.send(command, channel)
        except (RedisError, OSError) as exc:
            logger.warning("pub/sub %s failed for %s: %s", command, channel, exc)
            self.broken = True

    def _connect(self) -> None:
        pubsub = Subscription(self.hub.node_client(self.name))  # before others can see it
        self.pubsub, self.broken, self.unacked = pubsub, False, {}
        # Read after connecting (no switch from here on): channels added meanwhile found no
        # connection and rely on this to subscribe them.
        channels = list(self.channels)
        reconnect, self.connected_before = self.connected_before, True
        if reconnect:
            # After a reconnect, viewers already streaming may have missed events while it was
            # down. At the first connect nobody has streamed yet: their log read is after it.
            self.pending_resync |= set(channels)
        for channel in channels:
            self.unacked[channel] = 1
        if channels:
            pubsub.send_each("SSUBSCRIBE", channels)
            if reconnect:
                logger.info("pub/sub reconnected; re-subscribed %d channels", len(channels))

    def _reset(self) -> None:
        pubsub, self.pubsub = self.pubsub, None
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass
        for channel in self.channels:
            self.hub.unready(channel)

    def _run(self) -> None:
        backoff = Backoff()
        idle_since: float | None = None
        while self.channels or self.pubsub is not None:
            try:
                if self.pubsub is None:
                    self._connect()
                if self.broken:
                    raise ConnectionError("a pub/sub command failed")
                if self.channels or self.unacked:
                    idle_since = None
                elif idle_since is None:
                    # Kept open a while: the next job's first viewer would otherwise pay for a
                    # new connection (its handshake was a fifth of the first chunk's overhead).
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > LINGER_SECONDS:
                    break  # every channel moved away or ended long ago: this node is not needed
                for reply in self.pubsub.read(timeout=READ_WAIT):  # type: ignore[union-attr]
                    try:
                        self._dispatch(reply)
                    except Exception:  # one bad message must not drop the rest of the read
                        logger.exception("fan-out dispatcher error")
                backoff.reset()
            except (RedisError, OSError) as exc:
                self._reset()
                if not self.channels:
                    break  # nobody to reconnect for
                delay = backoff.next()
                logger.warning(
                    "pub/sub connection %s lost (%s); retrying in %.1fs", self.name, exc, delay
                )
                self.hub.reroute(set(self.channels))  # a node that failed over is another now
                gevent.sleep(delay)
            except Exception:
                logger.exception("fan-out dispatcher error")
                gevent.sleep(ERROR_PAUSE)
        self._reset()

    def _dispatch(self, reply: list | bytes | Exception) -> None:
        if isinstance(reply, Exception):
            # A MOVED answer to a subscription: the slot has another owner now.
            logger.info("pub/sub on %s: %s; re-routing its channels", self.name, reply)
            self.hub.reroute(set(self.channels))
            return
        if not isinstance(reply, list) or len(reply) < 3:
            return  # a PONG
        kind, channel = reply[0], reply[1]
        if kind == b"smessage":
            if channel in self.channels:
                self.hub.deliver(channel, reply[2])
        elif kind == b"ssubscribe":
            left = self.unacked.get(channel, 1) - 1
            if left > 0:
                self.unacked[channel] = left
                return
            self.unacked.pop(channel, None)
            if channel in self.pending_resync:
                self.pending_resync.discard(channel)
                self.hub.resync(channel)
            if channel in self.channels:
                self.hub.ready(channel)
        elif kind == b"sunsubscribe" and channel in self.channels and channel not in self.unacked:
            # Not asked for: the server dropped it (its slot moved to another node).
            self.hub.reroute({channel})
