"""Recovering claimed jobs nobody runs any more: re-run them, or end them for their viewers.

Three cases share :func:`recover_claims`: a dead worker's claims (found by any worker's
janitor), a live worker's own claims whose run ended without writing an outcome, and a stopping
worker's leftover claims at the end of its grace (``Worker.teardown``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from relay.core import queue
from relay.core.jobs import JobStore
from relay.core.queue import Entry
from relay.core.status import Recovery

logger = logging.getLogger(__name__)

LOST_MESSAGE = "The worker running this job stopped; the reply is incomplete. Please retry."


def recover_claims(
    store: JobStore, worker_id: str, entries: Iterable[Entry], message: str, why: str
) -> Counter[Recovery]:
    """Recover each of a worker's claimed jobs: unstarted ones go back to the queue, started
    ones end with a ``worker_lost`` error and ``[DONE]``. How many of each; ``why`` is logged.

    Safe to run from every worker at once: an atomic script first takes the job off the
    worker's claimed list, so only one caller acts on it.
    """
    outcomes: Counter[Recovery] = Counter()
    for entry in entries:
        job_id = entry.job_id
        outcome = store.recover(job_id, worker_id, message, entry.raw)
        outcomes[outcome] += 1
        if outcome is Recovery.REQUEUED:
            logger.warning("job %s re-queued: %s before it started", job_id, why)
        elif outcome is Recovery.FAILED:
            logger.warning("job %s failed: %s mid-stream", job_id, why)
    return outcomes


def sweep_orphans(
    store: JobStore, worker_id: str, running: set[str], suspects: set[Entry]
) -> set[Entry]:
    """Recover this worker's own claims that no greenlet runs any more; the new suspects.

    A job whose greenlet could not write its end (Redis was unreachable) stays on the claimed
    list of a worker that is still alive, where the dead-worker sweep never looks. A claim seen
    unrun is only a suspect at first: it may have been claimed a moment ago and not yet handed
    to its greenlet; still unrun at the next sweep, it is recovered.
    """
    unrun = {e for e in queue.claimed_entries(store.redis, worker_id) if e.job_id not in running}
    why = "its run ended without writing its outcome"
    recover_claims(store, worker_id, unrun & suspects, LOST_MESSAGE, why)
    return unrun - suspects


def sweep(store: JobStore, sweeper: str) -> int:
    """One pass over dead workers other than ``sweeper`` (the worker running the sweep);
    returns how many jobs were recovered.

    The sweeper is alive whatever its heartbeat says: on a Redis Cluster the heartbeat lives on
    one node, and a failover of that node can outlast the heartbeat's TTL. Taking itself for
    dead, a worker would end every job it is streaming with ``worker_lost``.

    Safe to run from every worker at once: each job is handled by an atomic script that first
    removes it from the dead worker's list, so only one janitor acts on it.
    """
    recovered = 0
    for worker_id in queue.dead_workers(store.redis):
        if worker_id == sweeper:
            logger.warning("worker %s: its own heartbeat had lapsed (Redis unreachable?)", sweeper)
            continue
        claims = queue.claimed_entries(store.redis, worker_id)
        outcomes = recover_claims(
            store, worker_id, claims, LOST_MESSAGE, f"worker {worker_id} died"
        )
        recovered += outcomes[Recovery.REQUEUED] + outcomes[Recovery.FAILED]
        if not queue.claimed_count(store.redis, worker_id):
            queue.unregister_worker(store.redis, worker_id)
    return recovered
