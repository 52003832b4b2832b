"""Recovering the jobs of workers that died: re-run them, or end them for their viewers."""

from __future__ import annotations

import logging

from relay.core import queue
from relay.core.jobs import JobStore

logger = logging.getLogger(__name__)

LOST_MESSAGE = "The worker running this job stopped; the reply is incomplete. Please retry."


def sweep_orphans(
    store: JobStore, worker_id: str, running: set[str], suspects: set[str]
) -> set[str]:
    """Recover this worker's own claims that no greenlet runs any more; the new suspects.

    A job whose greenlet could not write its end (Redis was unreachable) stays on the claimed
    list of a worker that is still alive, where the dead-worker sweep never looks. A claim seen
    unrun is only a suspect at first: it may have been claimed a moment ago and not yet handed
    to its greenlet; still unrun at the next sweep, it is recovered.
    """
    unrun = {j for j in queue.claimed_jobs(store.redis, worker_id) if j not in running}
    for job_id in unrun & suspects:
        if store.recover(job_id, worker_id, LOST_MESSAGE) in (2, 3):
            logger.warning("job %s recovered: its run ended without writing its outcome", job_id)
    return unrun - suspects


def sweep(store: JobStore) -> int:
    """One pass over dead workers; returns how many jobs were recovered.

    Safe to run from every worker at once: each job is handled by an atomic script that first
    removes it from the dead worker's list, so only one janitor acts on it.
    """
    recovered = 0
    for worker_id in queue.dead_workers(store.redis):
        for job_id in queue.claimed_jobs(store.redis, worker_id):
            outcome = store.recover(job_id, worker_id, LOST_MESSAGE)
            if outcome == 2:
                logger.warning(
                    "job %s re-queued: worker %s died before it started", job_id, worker_id
                )
            elif outcome == 3:
                logger.warning("job %s failed: worker %s died mid-stream", job_id, worker_id)
            recovered += outcome in (2, 3)
        if not queue.claimed_jobs(store.redis, worker_id):
            queue.unregister_worker(store.redis, worker_id)
    return recovered
