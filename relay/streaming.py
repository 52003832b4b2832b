"""One viewer's event stream: the replay log from a position, then live events, then [DONE]."""

from __future__ import annotations

from collections.abc import Iterator

from gevent.queue import Empty

from .chunks import DONE_BYTES
from .fanout import RESYNC, Hub, Viewer
from .jobs import JobStore
from .sse import format_comment, format_event


def stream_events(
    store: JobStore,
    hub: Hub,
    viewer: Viewer,
    after: int,
    *,
    keepalive: float,
    retry_ms: int,
) -> Iterator[bytes]:
    """SSE bytes for ``viewer``, which must already be attached (subscribed) to its job.

    Subscribing before reading the log closes the gap between backlog and live; the price is
    that an event may arrive both ways, so live events at or before the last id sent are
    dropped, and a live event that skips ids sends the viewer back to the log to fill the gap.
    """
    job_id = viewer.job_id
    last = after
    # The retry hint rides on the first real event: a retry-only event is a blank event to
    # the openai SDK, which then fails to parse its empty data.
    retry = b"retry: %d\n" % retry_ms

    def from_log() -> Iterator[tuple[bytes, bool]]:
        nonlocal last
        nonlocal retry
        for seq, data in store.read_events(job_id, last):
            last = seq
            yield retry + format_event(data, id=seq), data == DONE_BYTES
            retry = b""

    try:
        yield format_comment("stream open")  # sends the headers now, whatever the backlog
        for frame, done in from_log():
            yield frame
            if done:
                return
        while True:
            try:
                event = viewer.queue.get(timeout=keepalive)
            except Empty:
                # Write to notice a dead client, and re-check the log in case pub/sub missed one.
                yield format_comment("keep-alive")
                event = RESYNC
            if event is RESYNC or viewer.stale or event.seq > last + 1:
                viewer.stale = False  # before reading: anything newer lands in the mailbox
                for frame, done in from_log():
                    yield frame
                    if done:
                        return
                continue
            if event.seq <= last:
                continue
            yield retry + event.frame if retry else event.frame
            retry = b""
            last = event.seq
            if event.done:
                return
    finally:
        hub.detach(viewer)
