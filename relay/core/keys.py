"""Every Redis key and channel name chat-relay uses, in one place.

Keys that one script or transaction touches together share a hash tag (``{...}``), so that
they live on one Redis Cluster slot (DESIGN.md, invariant 5; a test checks every script and
transaction): a job's keys carry its id, a conversation's its id, a caller's limits the
caller, a worker's heartbeat and orders the worker; the queue, the worker registry and every
claimed list share ``{queue}``. API keys and the metrics hash are only ever used alone.
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


def end_keys(job_id: str) -> list[str]:
    """The keys of the scripts that end a job: :func:`job_keys` and the viewer counter."""
    return [*job_keys(job_id), viewers(job_id)]


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


QUEUE_TAG = "{queue}"
"""The hash tag of the queue, the worker registry and every worker's claimed list: one slot, so
that ``BLMOVE`` can move a job id from the queue onto a claimed list atomically."""

PENDING = f"{PREFIX}:{QUEUE_TAG}:pending"
"""List of job ids waiting for a worker (pushed left, claimed from the right)."""

WORKERS = f"{PREFIX}:{QUEUE_TAG}:workers"
"""Set of worker ids that may hold claimed jobs."""


def claimed(worker_id: str) -> str:
    """List: the jobs a worker has claimed and not yet finished."""
    return f"{PREFIX}:{QUEUE_TAG}:worker:{worker_id}:claimed"


def heartbeat(worker_id: str) -> str:
    """String with a TTL: present while the worker is alive (its lease). Tagged per worker."""
    return f"{PREFIX}:{{worker:{worker_id}}}:heartbeat"


def control(worker_id: str) -> str:
    """Sharded pub/sub channel: orders for one worker (``"cancel <job id>"``)."""
    return f"{PREFIX}:{{worker:{worker_id}}}:control"


def upstream_streams(upstream: str) -> str:
    """Sorted set: the jobs streaming from a capped upstream, scored by when each slot lapses
    unless its worker renews it (:mod:`worker.slots`)."""
    return f"{PREFIX}:{{upstream:{upstream}}}:streams"


def upstream_models(upstream: str) -> str:
    """String: an upstream's last model list (JSON) and when it was fetched (relay.web.models)."""
    return f"{PREFIX}:{{upstream:{upstream}}}:models"


API_KEYS = f"{PREFIX}:apikeys"
"""Set of the SHA-256 digests of every API key (see :mod:`relay.core.apikeys`)."""


def api_key(key_digest: str) -> str:
    """Hash: one API key's label, limits and whether it is revoked (keyed by its digest)."""
    return f"{PREFIX}:apikey:{key_digest}"


# A caller's limits share its hash tag: the scripts that check them touch one slot.


def rate(caller: str) -> str:
    """Sorted set: when each of a caller's requests in the last minute came (relay.web.limits)."""
    return f"{PREFIX}:{{{caller}}}:rate"


def active(caller: str) -> str:
    """Sorted set: a caller's unfinished jobs, scored by when their slot lapses."""
    return f"{PREFIX}:{{{caller}}}:active"


def failures(caller: str) -> str:
    """Sorted set: when each of a caller's failed credential checks came (relay.web.guessing)."""
    return f"{PREFIX}:{{{caller}}}:failures"


def blocked(caller: str) -> str:
    """String with a TTL: present while a caller is blocked for too many failed checks."""
    return f"{PREFIX}:{{{caller}}}:blocked"


METRICS = f"{PREFIX}:metrics"
"""Hash of counters shared by every process (see :mod:`relay.core.metrics`)."""
