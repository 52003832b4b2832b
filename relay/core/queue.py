"""The reliable job queue: pending jobs, per-worker claimed lists, and worker leases.

A worker claims a job by moving it atomically (``BLMOVE``) from the pending list onto its own
claimed list, so a job is always in exactly one of them until it is acknowledged. A worker
proves it is alive with a heartbeat key that expires after the lease; a janitor hands the
claimed jobs of a worker whose heartbeat lapsed to :meth:`relay.jobs.JobStore.recover`.
(Jobs are pushed to the pending list by :meth:`relay.jobs.JobStore.create`, in the same
transaction that stores them.)

An entry is a job's id, and for a small request also the time it was queued and the request
itself: a worker that takes a fresh entry sends the request upstream while the job's claim is
on its way (``worker.runner``), instead of after the claim's round trip. The entry moves as
it is, so the claimed lists hold the same strings: removing one takes the whole entry
(:attr:`Entry.raw`).
"""

from __future__ import annotations

from typing import NamedTuple

from relay.core import keys
from relay.core.connections import Client, as_text

INLINE_MAX = 8192  # characters of request an entry carries; a larger one is read with the claim


class Entry(NamedTuple):
    """A queue entry: as stored (what ``LREM`` matches) and what it says."""

    raw: str
    job_id: str
    queued_at: float = 0.0  # seconds since the epoch, on the queuing host's clock (0: not said)
    request: str = ""  # the job's request as stored with the job (JSON), or "" if not carried


def entry(job_id: str, request: str, queued_at: float) -> str:
    """The entry that queues a job (job ids hold no space)."""
    if len(request) > INLINE_MAX:
        return job_id
    return f"{job_id} {queued_at:.3f} {request}"


def read_entry(raw: bytes | str) -> Entry:
    text = as_text(raw)
    job_id, _, rest = text.partition(" ")
    if not rest:
        return Entry(text, job_id)
    queued_at, _, request = rest.partition(" ")
    try:
        return Entry(text, job_id, float(queued_at), request)
    except ValueError:
        return Entry(text, job_id)


def claim_next(redis: Client, worker_id: str, timeout: int) -> Entry | None:
    """Wait up to ``timeout`` seconds for a pending job and claim it; its entry, or None."""
    raw = redis.blmove(keys.PENDING, keys.claimed(worker_id), timeout, "RIGHT", "LEFT")
    return read_entry(raw) if raw else None


def acknowledge(redis: Client, worker_id: str, raw: str) -> None:
    """The job has ended (or was not ours to run): drop its entry from the worker's claimed
    list."""
    redis.lrem(keys.claimed(worker_id), 1, raw)


def claimed_entries(redis: Client, worker_id: str) -> list[Entry]:
    return [read_entry(raw) for raw in redis.lrange(keys.claimed(worker_id), 0, -1)]


def claimed_count(redis: Client, worker_id: str) -> int:
    return int(redis.llen(keys.claimed(worker_id)))


def pending_count(redis: Client) -> int:
    return int(redis.llen(keys.PENDING))


def register_worker(redis: Client, worker_id: str, ttl_ms: int) -> None:
    """Renew the worker's lease (its heartbeat first: a registered worker without one would be
    taken for dead; the other way round is harmless)."""
    redis.set(keys.heartbeat(worker_id), "1", px=ttl_ms)
    redis.sadd(keys.WORKERS, worker_id)


def drop_heartbeat(redis: Client, worker_id: str) -> None:
    """Say at once that this worker is gone, so its leftover claims are recovered without delay."""
    redis.delete(keys.heartbeat(worker_id))


def unregister_worker(redis: Client, worker_id: str) -> None:
    """Forget a worker whose claims are all gone (its keys live in two slots: one at a time)."""
    redis.srem(keys.WORKERS, worker_id)
    redis.delete(keys.claimed(worker_id))
    redis.delete(keys.heartbeat(worker_id))


def _workers_by_liveness(redis: Client) -> list[tuple[str, bool]]:
    workers = [as_text(w) for w in redis.smembers(keys.WORKERS)]
    if not workers:
        return []
    pipe = redis.pipeline(transaction=False)
    for worker_id in workers:
        pipe.exists(keys.heartbeat(worker_id))
    return list(zip(workers, (bool(a) for a in pipe.execute()), strict=True))


def dead_workers(redis: Client) -> list[str]:
    """Registered workers whose heartbeat has lapsed."""
    return [w for w, alive in _workers_by_liveness(redis) if not alive]


def live_workers(redis: Client) -> list[str]:
    return [w for w, alive in _workers_by_liveness(redis) if alive]
