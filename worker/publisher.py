"""Every running job's publishes, sent to Redis together: one round trip per batch, not per chunk.

A worker streams hundreds of jobs at once. Publishing each chunk with its own ``EVALSHA`` spent
two thirds of the worker's time in redis-py's per-command path (pool checkout, send, wait,
parse) and capped one process near 7,000 chunks/s. Here a job's greenlet queues its publish and
goes back to its upstream at once; one greenlet sends whatever has queued as one pipeline. Idle,
a batch is one publish and costs what it did; busy, batches grow by themselves while the
previous one is on the wire.

Under saturation a job may read its next chunk before its previous one was sent. Plain text
deltas then merge into the queued event (its content grows, it keeps the first chunk's id,
timestamps and fields) instead of queueing behind it: viewers get the same text in fewer,
larger events, and the worker's lag stays bounded instead of growing with every chunk.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import gevent
from gevent.event import AsyncResult, Event
from redis.exceptions import RedisError

from relay import metrics
from relay.chunks import dumps
from relay.jobs import JobStore


def mergeable(chunk: dict[str, Any]) -> bool:
    """A chunk that only adds text to choice 0: what may merge with its neighbour."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or chunk.get("usage"):
        return False
    choice = choices[0]
    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
        return False
    if choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
        return False
    delta = choice.get("delta")
    return (
        isinstance(delta, dict)
        and delta.keys() == {"content"}
        and isinstance(delta["content"], str)
    )


@dataclass
class _Queued:
    """One job's publishes not yet sent: they go out as one script call."""

    attempt: int
    events: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    last: dict[str, Any] | None = None  # the last event's chunk, while more text may merge in
    merged: bool = False  # ``last`` grew since ``events[-1]`` was serialised
    merges: int = 0  # chunks that merged instead of becoming events of their own
    sent: AsyncResult = field(default_factory=AsyncResult)

    def add(self, events: list[str], text: str, chunk: dict[str, Any] | None) -> None:
        """Queue ``events``, or merge ``chunk``'s text into the last one if both may merge."""
        self.texts.append(text)
        if chunk is not None and self.last is not None and len(events) == 1:
            self.last["choices"][0]["delta"]["content"] += chunk["choices"][0]["delta"]["content"]
            self.merged = True
            self.merges += 1
            return
        self.freeze()
        self.events += events
        self.last = chunk if len(events) == 1 else None

    def freeze(self) -> None:
        if self.merged and self.last is not None:
            self.events[-1] = dumps(self.last)
            self.merged = False


class Publisher:
    """Queues :meth:`JobStore.publish` calls from many greenlets; sends them in batches."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._queued: dict[tuple[str, int], _Queued] = {}
        self._outcome: dict[tuple[str, int], _Queued] = {}  # the last sent, until flushed
        self._wake = Event()
        self._runner: gevent.Greenlet | None = None

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
        if self._runner is None or self._runner.dead:
            self._runner = gevent.spawn(self._run)
        queued = self._queued.get(key)
        if queued is None:
            queued = self._queued[key] = _Queued(attempt)
            self._wake.set()
        queued.add(events, text_delta, chunk if chunk and mergeable(chunk) else None)
        return result or 1

    def flush(self, job_id: str, attempt: int) -> int:
        """Wait until the job's publishes are sent; the last result (0: no longer ours).

        Raises the error of a publish that failed. Call before the job's end is written, so
        that the end comes after every event, and once the job is over, to forget it.
        """
        key = (job_id, attempt)
        queued = self._queued.get(key)
        if queued is not None:
            queued.sent.wait()
        last = self._outcome.pop(key, None)
        if last is None:
            return 1
        return last.sent.get()  # raises the batch's RedisError, as a direct call would

    def _result(self, key: tuple[str, int]) -> int | None:
        """The job's last sent result if it was 0 or an error (raised), else None."""
        last = self._outcome.get(key)
        if last is None or not last.sent.ready():
            return None
        if not last.sent.successful():
            del self._outcome[key]
            last.sent.get()  # raises
        return last.sent.value or 0

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            batch, self._queued = self._queued, {}
            if not batch:
                continue
            entries = []
            for (job_id, _), queued in batch.items():
                queued.freeze()
                entries.append((job_id, queued.attempt, queued.events, "".join(queued.texts)))
            try:
                results: list[int | Exception] = self._store.publish_many(entries)
            except Exception as exc:  # noqa: BLE001 - every waiter gets the error
                results = [exc] * len(entries)
            for (key, queued), result in zip(batch.items(), results, strict=True):
                self._outcome[key] = queued
                if isinstance(result, Exception):
                    queued.sent.set_exception(result)
                else:
                    queued.sent.set(result)
            if merges := sum(queued.merges for queued in batch.values()):
                with contextlib.suppress(RedisError):  # a counter must not fail the batch
                    metrics.count(self._store.redis, "deltas_coalesced", merges)
