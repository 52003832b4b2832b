"""The reliable job queue: pending jobs, per-worker claimed lists, and worker leases.

A worker claims a job by moving it atomically (``BLMOVE``) from the pending list onto its own
claimed list, so a job is always in exactly one of them until it is acknowledged. A worker
proves it is alive with a heartbeat key that expires after the lease; a janitor hands the
claimed jobs of a worker whose heartbeat lapsed to :meth:`relay.jobs.JobStore.recover`.
(Jobs are pushed to the pending list by :meth:`relay.jobs.JobStore.create`, in the same
transaction that stores them.)
"""

from __future__ import annotations

from relay.core import keys
from relay.core.connections import Client, as_text


def claim_next(redis: Client, worker_id: str, timeout: int) -> str | None:
    """Wait up to ``timeout`` seconds for a pending job and claim it; its id, or None."""
    job_id = redis.blmove(keys.PENDING, keys.claimed(worker_id), timeout, "RIGHT", "LEFT")
    return as_text(job_id) or None


def acknowledge(redis: Client, worker_id: str, job_id: str) -> None:
    """The job has ended (or was not ours to run): drop it from the worker's claimed list."""
    redis.lrem(keys.claimed(worker_id), 1, job_id)


def claimed_jobs(redis: Client, worker_id: str) -> list[str]:
    return [as_text(j) for j in redis.lrange(keys.claimed(worker_id), 0, -1)]


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
