"""One viewer's events: the replay log from a position, then live events, up to [DONE]."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import gevent
from gevent.queue import Empty
from redis.exceptions import RedisError

from relay.core.backoff import Backoff
from relay.core.chunks import DONE_BYTES, error_chunk
from relay.core.jobs import JobStore
from relay.web.fanout import RESYNC, Hub, LiveEvent, Viewer
from relay.web.sse import format_comment, format_event

OUTAGE_SECONDS = 30.0  # Redis unreachable this long (a failover takes seconds): end the stream
LOST = "The job no longer exists on the relay (its data was lost); its reply is incomplete."
UNAVAILABLE = "The relay lost its store while streaming this reply; its reply is incomplete."
REWOUND = (
    "The relay's store lost the last part of this reply (a failover to a replica that had not "
    "received it); the reply is incomplete."
)


def follow(
    store: JobStore, hub: Hub, viewer: Viewer, after: int, *, idle: float, fresh: bool = False
) -> Iterator[LiveEvent | None]:
    """Every event after id ``after``, in order and once, ending with ``[DONE]``; ``None`` after
    each ``idle`` seconds without one. ``viewer`` must already be attached (subscribed). A
    closed viewer (the process is shutting down) stops early, without ``[DONE]``.

    Subscribing before reading the log closes the gap between backlog and live; the price is
    that an event may arrive both ways, so live events at or before the last id sent are
    dropped, and a live event that skips ids sends the viewer back to the log to fill the gap.
    A ``fresh`` viewer was subscribed before its job was stored: its backlog is empty, so the
    log is read only if a gap shows.

    A viewer allowed the fast path (:meth:`Viewer.allow_direct`) hands its socket to the
    dispatcher whenever it has caught up, and takes it back when woken; this requires a
    renderer that writes each event as its ``frame`` in exactly one write, as :func:`sse_bytes`
    does, so that being resumed after a ``yield`` means the bytes are on the socket.

    Redis going away for a moment (a restart, a cluster failover) is waited out for up to
    ``OUTAGE_SECONDS``; whatever happens, the stream ends with ``[DONE]``, and its ids never
    repeat or skip.
    """
    last = after
    event: LiveEvent | None

    def ending(code: str, message: str) -> Iterator[LiveEvent]:
        # An error the log cannot hold (the job is gone, or Redis is): end the stream anyway,
        # right after the last id this viewer has, instead of keep-alives for ever.
        data = error_chunk(viewer.job_id, message, code=code).encode()
        yield LiveEvent(last + 1, data, format_event(data, id=last + 1), False)
        yield LiveEvent(last + 2, DONE_BYTES, format_event(DONE_BYTES, id=last + 2), True)

    def from_log() -> Iterator[LiveEvent]:
        nonlocal last
        for seq, data in store.read_events(viewer.job_id, last):
            last = seq
            yield LiveEvent(seq, data, format_event(data, id=seq), data == DONE_BYTES)

    def patiently(read: Callable[[], Iterator[LiveEvent]]) -> Iterator[LiveEvent]:
        """``read()``, read again from the last id delivered while Redis is unreachable."""
        backoff, gave_up_at = Backoff(), time.monotonic() + OUTAGE_SECONDS
        while True:
            try:
                yield from read()
                return
            except RedisError:
                if time.monotonic() > gave_up_at:
                    yield from ending("relay_unavailable", UNAVAILABLE)
                    return
                gevent.sleep(backoff.next())

    def check() -> Iterator[LiveEvent]:
        """Idle: make sure the job is still there, and its log not behind what this viewer has
        seen (a cluster replica promoted before it had every write); else end the stream."""
        written, _, exists = store.progress(viewer.job_id)
        if not exists:
            yield from ending("job_lost", LOST)
        elif written < last:
            yield from ending("log_rewound", REWOUND)

    try:
        for backlog in () if fresh else patiently(from_log):
            yield backlog
            if backlog.done:
                return
        while not viewer.closed:
            # Resumed after a yield, every byte yielded so far is written: the socket is free.
            direct = viewer.go_direct(last)
            try:
                event = viewer.queue.get(timeout=idle)
            except Empty:
                event = None
            if direct:
                sent = viewer.take_back()
                progressed, last = sent > last, sent
                if viewer.finished:
                    return  # the dispatcher wrote [DONE]
            if viewer.closed:
                return
            if event is None:
                if direct and progressed:
                    continue  # events flowed directly: the client is there, the job alive
                yield None
                for ended in patiently(check):
                    yield ended
                    if ended.done:
                        return
                event = RESYNC  # re-check the log in case pub/sub missed an event
            if event is RESYNC or viewer.stale or event.seq > last + 1:
                viewer.stale = False  # before reading: anything newer lands in the mailbox
                suspect, viewer.suspect = viewer.suspect, False
                for logged in patiently(from_log):
                    yield logged
                    if logged.done:
                        return
                # After a lost subscription, end at once if the log is behind this viewer,
                # before the job's recovery writes events at ids it has already seen.
                for ended in patiently(check) if suspect else ():
                    yield ended
                    if ended.done:
                        return
                continue
            if event.seq <= last:
                if event.done:  # the job ended at an id this viewer has passed: rewound
                    yield from ending("log_rewound", REWOUND)
                    return
                continue
            last = event.seq
            yield event
            if event.done:
                return
    finally:
        hub.detach(viewer)


def retry_field(retry_ms: int) -> bytes:
    """The reconnection delay hint, sent with a stream's first event."""
    # It rides on a real event: a retry-only event is a blank event to the openai SDK, which
    # then fails to parse its empty data.
    return b"retry: %d\n" % retry_ms


def sse_bytes(
    events: Iterator[LiveEvent | None], *, retry_ms: int, viewer: Viewer | None = None
) -> Iterator[bytes]:
    """The SSE rendering of :func:`follow`'s events, with keep-alive comments while idle.

    The retry hint goes once, with the first event, whoever writes it: a ``viewer`` on the
    fast path holds it as its ``prefix`` until the dispatcher or this renderer takes it.
    """
    retry = retry_field(retry_ms)
    yield format_comment("stream open")  # sends the headers now, whatever the backlog
    for event in events:
        if event is None:
            yield format_comment("keep-alive")  # a write is the only way to notice a dead client
        elif retry:
            if viewer is not None and viewer.sock is not None:
                retry, viewer.prefix = viewer.prefix, b""  # empty: the dispatcher wrote it
            yield retry + event.frame
            retry = b""
        else:
            yield event.frame
