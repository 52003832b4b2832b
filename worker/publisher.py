"""Every running job's publishes, sent to Redis together: one round trip per batch, not per chunk.

A worker streams hundreds of jobs at once, so a round trip per chunk would cap it far below what
its upstreams send (tests/bench/RESULTS.md). Here a job queues its publish and goes back to its
upstream at once; each lane (a share of the jobs) has one greenlet that sends whatever has
queued as one batch, on a connection of its own. Idle, a batch is one publish; busy, batches
grow by themselves while the previous one is on the wire.

Under saturation a job may read its next chunk before its previous one was sent. Plain text
deltas then merge into the queued event (its content grows, it keeps the first chunk's id,
timestamps and fields) instead of queueing behind it: viewers get the same text in fewer,
larger events, and the worker's lag stays bounded instead of growing with every chunk. A
reasoning model's thinking (``reasoning_content`` or ``reasoning`` deltas, often most of its
stream) merges the same way, never into content or content into it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent.event import AsyncResult, Event
from gevent.lock import Semaphore
from redis.exceptions import RedisError, ResponseError

from relay.core import keys, metrics
from relay.core.chunks import REASONING_FIELDS, dumps
from relay.core.connections import RawConnection, Router
from relay.core.jobs import JobStore

Entry = tuple[str, int, list[str], str]  # job id, attempt, events, text delta

# Each lane sends its batch while the others' are on the wire or being built, so a chunk that
# arrives meanwhile does not wait for a whole batch (1 and 16 lanes did worse: RESULTS.md).
LANES = 4

# Replies by which a cluster refuses a command it did not run: safe to send again. A failover
# answers CLUSTERDOWN/TRYAGAIN for a few seconds; 12 tries back off over about 9 s.
REFUSALS = ("MOVED", "ASK", "CLUSTERDOWN", "TRYAGAIN")
REFUSED_TRIES = 12


# The delta fields whose text may merge with a neighbour's of the same field.
TEXT_FIELDS = frozenset({"content", *REASONING_FIELDS})


def mergeable(chunk: dict[str, Any]) -> str | None:
    """The field of a chunk that only adds text to choice 0 (what may merge with its
    neighbour's same field), else None."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or chunk.get("usage"):
        return None
    choice = choices[0]
    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
        return None
    if choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
        return None
    delta = choice.get("delta")
    if not isinstance(delta, dict) or len(delta) != 1:
        return None
    ((name, text),) = delta.items()
    return name if name in TEXT_FIELDS and isinstance(text, str) else None


@dataclass
class _Queued:
    """One job's publishes not yet sent: they go out as one script call."""

    attempt: int
    events: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    last: dict[str, Any] | None = None  # the last event's chunk, while more text may merge in
    last_field: str | None = None  # which of its delta's fields that text is in
    merged: bool = False  # ``last`` grew since ``events[-1]`` was serialised
    merges: int = 0  # chunks that merged instead of becoming events of their own
    sent: AsyncResult = field(default_factory=AsyncResult)

    def add(
        self, events: list[str], text: str, chunk: dict[str, Any] | None, into: str | None = None
    ) -> None:
        """Queue ``events``, or merge ``chunk``'s text into the last one if both may merge
        (``into``: :func:`mergeable`'s answer for ``chunk``, the delta field its text is in)."""
        self.texts.append(text)
        if chunk is not None and self.last is not None and len(events) == 1:
            if into == self.last_field:
                self.last["choices"][0]["delta"][into] += chunk["choices"][0]["delta"][into]
                self.merged = True
                self.merges += 1
                return
        self.freeze()
        self.events += events
        self.last = chunk if len(events) == 1 else None
        self.last_field = into

    def freeze(self) -> None:
        if self.merged and self.last is not None:
            self.events[-1] = dumps(self.last)
            self.merged = False


class _Lane:
    """One share of the jobs, with its own batch in flight (a job always uses one lane)."""

    __slots__ = ("queued", "wake", "runner", "sending", "conns")

    def __init__(self) -> None:
        self.queued: dict[tuple[str, int], _Queued] = {}
        self.wake = Event()
        self.runner: gevent.Greenlet | None = None
        self.sending = Semaphore()  # held while one of its batches is on the wire
        # Its own connection to each node it sends to ("" for one Redis), made on first use.
        self.conns: dict[str, RawConnection] = {}


class Publisher:
    """Queues publishes from many jobs' greenlets; sends them in batches
    (:meth:`JobStore.publish_many`), one lane per share of the jobs."""

    def __init__(self, store: JobStore, lanes: int = LANES) -> None:
        self._store = store
        self._router = Router(store.redis)
        self._lanes = [_Lane() for _ in range(lanes)]
        # Per job: its last batch taken to be sent (in flight or done), until flushed.
        self._outcome: dict[tuple[str, int], _Queued] = {}
        self._merges: dict[tuple[str, int], int] = {}  # per job, counted once at its flush

    def publish(
        self,
        job_id: str,
        attempt: int,
        events: list[str],
        text_delta: str = "",
        chunk: dict[str, Any] | None = None,
    ) -> int:
        """Queue events for the job and return at once.

        0 means an earlier publish found the job no longer ours (ended or taken over); an
        earlier publish's Redis error is raised here. Give ``chunk`` (the one event's parsed
        JSON) to let its text merge with the job's queued event, when :func:`mergeable`.
        """
        key = (job_id, attempt)
        if (result := self._result(key)) == 0:
            return 0
        lane = self._lane(job_id)
        if lane.runner is None or lane.runner.dead:
            lane.runner = gevent.spawn(self._run, lane)
        queued = lane.queued.get(key)
        if queued is None:
            queued = lane.queued[key] = _Queued(attempt)
            lane.wake.set()
        into = mergeable(chunk) if chunk else None
        queued.add(events, text_delta, chunk if into else None, into)
        return result or 1

    def flush(self, job_id: str, attempt: int) -> int:
        """Wait until the job's publishes are sent; the last result (0: no longer ours).

        Raises the error of a publish that failed. Call before the job's end is written, so
        that the end comes after every event, and once the job is over, to forget it.
        """
        key = (job_id, attempt)
        queued = self._lane(job_id).queued.get(key)
        if queued is not None:
            queued.sent.wait()
        last = self._outcome.pop(key, None)
        if merges := self._merges.pop(key, 0):
            # Once per job, not per batch: a counter costs a round trip.
            with contextlib.suppress(RedisError):
                metrics.count(self._store.redis, "deltas_coalesced", merges)
        if last is None:
            return 1
        # Waits for a batch on the wire; raises its RedisError, as a direct call would.
        return last.sent.get()

    def sent(self, job_id: str, attempt: int) -> None:
        """Wait until what the job has queued so far is on the wire and answered (whatever
        the answer; :meth:`flush` reports it)."""
        key = (job_id, attempt)
        batch = self._lane(job_id).queued.get(key) or self._outcome.get(key)
        if batch is not None:
            batch.sent.wait()

    def send_now(self, job_id: str) -> None:
        """From a job's greenlet (never an event-loop callback: it waits for the replies):
        send the job's lane's queued publishes from here when none of its batches is on the
        wire, instead of waking the lane's greenlet (a turn of the event loop, 0.05 ms on the
        first token's path on the benchmark machine); else leave them to it."""
        lane = self._lane(job_id)
        if not lane.queued or lane.sending.locked():
            return
        with lane.sending:
            self._send_batch(lane)

    def _lane(self, job_id: str) -> _Lane:
        return self._lanes[hash(job_id) % len(self._lanes)]

    def _result(self, key: tuple[str, int]) -> int | None:
        """The job's last sent result if it was 0 or an error (raised), else None."""
        last = self._outcome.get(key)
        if last is None or not last.sent.ready():
            return None
        if not last.sent.successful():
            del self._outcome[key]
            last.sent.get()  # raises
        return last.sent.value or 0

    def _take(self, lane: _Lane) -> list[tuple[tuple[str, int], _Queued]]:
        """The lane's queued publishes, each now its job's batch in flight.

        A job whose previous batch failed or was refused gets that outcome again unsent:
        sending later events after lost ones would leave a hole in its log.
        """
        batch, lane.queued = lane.queued, {}
        taken = []
        for key, queued in batch.items():
            last = self._outcome.get(key)
            self._outcome[key] = queued
            if (
                last is None
                or not last.sent.ready()
                or (last.sent.successful() and last.sent.value)
            ):
                queued.freeze()
                taken.append((key, queued))
            elif last.sent.successful():
                queued.sent.set(0)
            else:
                queued.sent.set_exception(last.sent.exception)  # type: ignore[arg-type]
        return taken

    def _send(self, lane: _Lane, entries: list[Entry], tries: int = 0) -> list[int | Exception]:
        """Each entry's result, sent to the node that owns its job (one round trip per node
        the batch reaches).

        An entry the cluster refused without running it is sent again: at once where the
        cluster says its slot lives now (MOVED, ASK), or after a pause while a failover
        settles (CLUSTERDOWN, TRYAGAIN), up to ``REFUSED_TRIES`` times. A lost connection is
        not retried: the script may have run, and a second run would repeat events.
        """
        by_node: dict[str, list[int]] = {}
        for index, (job_id, *_) in enumerate(entries):
            by_node.setdefault(self._router.node(keys.job(job_id)), []).append(index)
        results: list[int | Exception] = [0] * len(entries)
        refused: list[int] = []
        for node, indexes in by_node.items():
            sent = self._send_to(lane, node, [entries[i] for i in indexes])
            for index, result in zip(indexes, sent, strict=True):
                results[index] = result
                if isinstance(result, ResponseError) and str(result).startswith(REFUSALS):
                    refused.append(index)
        if refused and self._router.cluster and tries < REFUSED_TRIES:
            if not all(str(results[i]).startswith(("MOVED", "ASK")) for i in refused):
                gevent.sleep(min(0.05 * 2**tries, 1.0))
            with contextlib.suppress(RedisError):
                self._router.refresh()
            again = self._send(lane, [entries[i] for i in refused], tries + 1)
            for index, result in zip(refused, again, strict=True):
                results[index] = result
        return results

    def _send_to(self, lane: _Lane, node: str, entries: list[Entry]) -> list[int | Exception]:
        conn = lane.conns.get(node)
        try:
            if conn is None:
                conn = lane.conns[node] = RawConnection(self._router.node_client(node))
            return self._store.publish_many(entries, conn.execute)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the error
            if conn is not None:  # replies may still be coming: start afresh
                conn.close()
                lane.conns.pop(node, None)
            if self._router.cluster:
                with contextlib.suppress(Exception):
                    self._router.refresh()  # a node that failed may have a successor
            return [exc] * len(entries)

    def _run(self, lane: _Lane) -> None:
        while True:
            lane.wake.wait()
            lane.wake.clear()
            with lane.sending:
                self._send_batch(lane)

    def _send_batch(self, lane: _Lane) -> None:
        """Send what the lane has queued (nothing if :meth:`send_now` took it first) and
        settle each job's batch with its result."""
        batch = self._take(lane)
        if not batch:
            return
        entries = [(job_id, queued.attempt, queued.events, "".join(queued.texts))
                   for (job_id, _), queued in batch]  # fmt: skip
        results = self._send(lane, entries)
        for (_, queued), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                queued.sent.set_exception(result)
            else:
                queued.sent.set(result)
        for key, queued in batch:
            if queued.merges:
                self._merges[key] = self._merges.get(key, 0) + queued.merges
