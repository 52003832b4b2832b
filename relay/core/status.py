"""Names for a job's states and for what the recovery script did (rq's ``JobStatus`` is the model).

The values are what Redis holds (the job hash's ``status`` field) and what the API shows, so
each enum member compares equal to its string or number.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class JobStatus(StrEnum):
    """A job's life: queued, then running, then one of the three terminal outcomes."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
"""The outcomes a job can end with (also the labels of ``relay_jobs_finished_total``)."""


class Recovery(IntEnum):
    """What recovering a dead or stopping worker's claimed job did (the ``RECOVER`` script)."""

    TAKEN = 0  # another janitor got there first: the job was no longer on the claimed list
    ALREADY_ENDED = 1  # it had ended; only its claim was left
    REQUEUED = 2  # nothing had been published: back to the queue, to run from the start
    FAILED = 3  # ended for its viewers with a worker_lost error and [DONE]
