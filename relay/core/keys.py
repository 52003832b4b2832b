"""Every Redis key and channel name chat-relay uses, in one place.

Per-job keys carry the job id in a hash tag (``relay:{<id>}:...``) so that all of one job's
keys live on the same Redis Cluster slot and a Lua script may touch them together. The queue
and worker registry are global and do not name a job.
"""

from __future__ import annotations

PREFIX = "relay"


def job(job_id: str) -> str:
    """Hash: the job's request, status, timestamps, event count and fencing attempt."""
    return f"{PREFIX}:{{{job_id}}}:job"


def events(job_id: str) -> str:
    """List: the replay log; event ``n`` (its SSE id) is element ``n - 1``."""
    return f"{PREFIX}:{{{job_id}}}:events"


def text(job_id: str) -> str:
    """String: the assistant text so far (appended with each delta)."""
    return f"{PREFIX}:{{{job_id}}}:text"


def live(job_id: str) -> str:
    """Pub/sub channel: each new event as ``"<id> <data>"``."""
    return f"{PREFIX}:{{{job_id}}}:live"


def job_keys(job_id: str) -> list[str]:
    """The keys every job script receives, in the order the scripts expect."""
    return [job(job_id), events(job_id), text(job_id), live(job_id)]


def viewers(job_id: str) -> str:
    """Counter: viewers attached to the job across all web processes (expires with the job)."""
    return f"{PREFIX}:{{{job_id}}}:viewers"


def end_keys(job_id: str, caller: str) -> list[str]:
    """The keys of the scripts that end a job: :func:`job_keys`, the viewer counter, and the
    concurrency slots of the caller it counts against (``caller`` "" if none: the job's own
    hash stands in, untouched)."""
    return [*job_keys(job_id), viewers(job_id), active(caller) if caller else job(job_id)]


def conversation(conversation_id: str) -> str:
    """Hash: one conversation (:mod:`relay.conversations`): ``owner`` (the API key id that
    started it, "" when open), ``next`` (the last message number given), ``s:<id>`` (each
    system prompt, once), ``m:<n>`` (message n: ``"<tokens> <parent n> <role> <content>"``)."""
    return f"{PREFIX}:{{{conversation_id}}}:conversation"


def message(message_id: str) -> str:
    """String: where a handed-out message id points, ``"<conversation id> <n> <system id>"``.

    Only the creator is given these ids (the reply's, and its question's); they expire with
    ``CONVERSATION_TTL_SECONDS`` from when they were made.
    """
    return f"{PREFIX}:{{{message_id}}}:message"


PENDING = f"{PREFIX}:queue:pending"
"""List of job ids waiting for a worker (pushed left, claimed from the right)."""

API_KEYS = f"{PREFIX}:apikeys"
"""Set of the SHA-256 digests of every API key (see :mod:`relay.apikeys`)."""


def api_key(key_digest: str) -> str:
    """Hash: one API key's label, limits and whether it is revoked (keyed by its digest)."""
    return f"{PREFIX}:apikey:{key_digest}"


def rate(caller: str) -> str:
    """Sorted set: when each of a caller's requests in the last minute came (relay.limits)."""
    return f"{PREFIX}:limit:{caller}:rate"


def active(caller: str) -> str:
    """Sorted set: a caller's unfinished jobs, scored by when their slot lapses."""
    return f"{PREFIX}:limit:{caller}:active"


def failures(caller: str) -> str:
    """Sorted set: when each of a caller's failed credential checks came (relay.web.guessing)."""
    return f"{PREFIX}:limit:{caller}:failures"


def blocked(caller: str) -> str:
    """String with a TTL: present while a caller is blocked for too many failed checks."""
    return f"{PREFIX}:limit:{caller}:blocked"


METRICS = f"{PREFIX}:metrics"
"""Hash of counters shared by every process (see :mod:`relay.metrics`)."""

WORKERS = f"{PREFIX}:workers"
"""Set of worker ids that may hold claimed jobs."""


def claimed(worker_id: str) -> str:
    """List: the jobs a worker has claimed and not yet finished."""
    return f"{PREFIX}:worker:{worker_id}:claimed"


def control(worker_id: str) -> str:
    """Pub/sub channel: orders for one worker (``"cancel <job id>"``)."""
    return f"{PREFIX}:worker:{worker_id}:control"


def heartbeat(worker_id: str) -> str:
    """String with a TTL: present while the worker is alive (its lease)."""
    return f"{PREFIX}:worker:{worker_id}:heartbeat"
