"""The job record: creating a job, reading its status and replay log, and the writes a worker
makes while it runs one. Every write that adds events goes through :mod:`relay.core.scripts`.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

from redis.exceptions import NoScriptError, RedisError, ResponseError

from relay.core import keys, metrics, queue
from relay.core.chunks import CANCELLED, DONE, completion_id, dumps, error_chunk, final_chunk, loads
from relay.core.connections import Client, Router, as_text, script_in
from relay.core.conversations import Turn
from relay.core.scripts import Scripts
from relay.core.status import TERMINAL, JobStatus, Recovery

_JOB_ID = re.compile(r"job_[A-Za-z0-9_-]{24}")
LOG_PAGE = 500  # replay-log entries read per round trip: a resuming viewer's memory is bounded


class Claim(NamedTuple):
    """A claimed job: what the worker runs and ends it with (attempt 0: not claimed)."""

    attempt: int
    request: dict[str, Any]
    turn: Turn | None
    created_at: float
    limited_as: str  # the caller whose concurrency slot the job holds ("" for none)


def _claimed(reply: list[Any]) -> Claim:
    """The ``CLAIM`` script's reply as a :class:`Claim`."""
    attempt = int(reply[0])
    if not attempt:
        return Claim(0, {}, None, 0.0, "")
    raw, turn, created, limited_as = (reply + [None] * 4)[1:5]
    return Claim(
        attempt,
        loads(raw) if raw else {},
        Turn.from_json(turn) if turn else None,
        float(created or 0),
        as_text(limited_as),
    )


class SentClaim:
    """A ``CLAIM`` sent on a connection of the job's node, whose reply is read when wanted."""

    def __init__(self, store: JobStore, client: Any, job_id: str, worker_id: str) -> None:
        self._store, self._job_id, self._worker_id = store, job_id, worker_id
        self._pool = client.connection_pool
        self._conn: Any = self._pool.get_connection()
        try:
            self._conn.send_command("EVALSHA", store.scripts.claim.sha, 1, keys.job(job_id),
                                    worker_id, _now())  # fmt: skip
        except BaseException:
            self.drop()
            raise

    def answer(self) -> Claim:
        """The claim's outcome (raises what reading it raised)."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("the claim's answer was read or dropped already")
        try:
            reply = conn.read_response()
        except ResponseError:
            # The claim did not run: Redis lost its scripts since they were loaded (NOSCRIPT),
            # or the job's slot moved to another node (MOVED). The client's own path loads the
            # script, or follows the slot.
            self._pool.release(conn)
            return self._store.claim_and_load(self._job_id, self._worker_id)
        except BaseException:
            conn.disconnect()
            self._pool.release(conn)
            raise
        self._pool.release(conn)
        return _claimed(reply)

    def drop(self) -> None:
        """Never read the reply (the connection goes, with it); nothing once read."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
            self._pool.release(conn)


class Ender(NamedTuple):
    """What the worker ending a job knows already: whose slot it holds, and where its counters
    go (a :class:`metrics.Tally`)."""

    limited_as: str
    tally: Any


class QueueFull(Exception):
    """The queue holds its cap of jobs already: the job was not stored."""


def new_job_id() -> str:
    """An unguessable id: 144 random bits, URL-safe, never containing a hash-tag brace."""
    return "job_" + secrets.token_urlsafe(18)


def is_job_id(value: str) -> bool:
    """Cheap shape check so that junk ids are answered 404 without a Redis round trip."""
    return _JOB_ID.fullmatch(value) is not None


def _now() -> str:
    return f"{time.time():.3f}"


class JobStore:
    """Jobs in Redis, as seen by one process (the relay or a worker)."""

    def __init__(self, redis: Client, *, retention: int, max_age: int) -> None:
        self.redis = redis
        self.retention = retention
        # Unfinished jobs still expire eventually, so an abandoned queue cannot fill Redis.
        self.max_age = max_age
        self.scripts = Scripts(redis)

    # -- the relay's side ---------------------------------------------------------------------

    def create(
        self,
        request: dict[str, Any],
        turn: Turn | None = None,
        *,
        grant: Mapping[str, str] | None = None,
        job_id: str | None = None,
        limited_as: str = "",
        max_queued: int = 0,
        viewers: int = 0,
        pipe: Any = None,
        subscribed: Callable[[bool], None] | None = None,
    ) -> str:
        """Store a job and queue it, atomically, so a queued id always has a job behind it.

        ``grant``: the fields that say who may watch and cancel it (:mod:`relay.web.access`);
        without them nobody may, by token. ``limited_as``: the caller whose concurrency slot
        the job holds until it ends. ``max_queued``: raise :class:`QueueFull`, the job taken
        back, if the queue held that many jobs already (0: no cap). ``viewers``: streams
        subscribed to the job already, counted from the start (a creator's own). ``pipe``:
        a pipeline holding the caller's own writes (the job's conversation turn), sent first
        in the same round trip. ``subscribed``: for a creator that subscribed to the job's live
        channel before storing it (without waiting for the confirmation), called with whether
        that subscription had taken effect when the job was stored, as Redis saw it: if it had,
        the stream can miss no event and needs no backlog read.
        """
        job_id = job_id or new_job_id()
        stored, now = dumps(request), time.time()
        fields: dict[str | bytes, str | int] = {
            "request": stored,
            "model": str(request.get("model") or ""),
            "status": JobStatus.QUEUED,
            "created_at": f"{now:.3f}",
            "seq": 0,
            "attempt": 0,
        }
        if turn is not None:
            fields["conversation"] = turn.to_json()
        fields.update(grant or {})
        if limited_as:
            fields["limited_as"] = limited_as
        pairs = [item for pair in fields.items() for item in pair]
        job_keys: list[str] = [keys.job(job_id), keys.text(job_id), keys.viewers(job_id)]
        # The job first, then its id on the queue, so that a queued id always has a job behind
        # it. One Redis runs a pipeline in order; a cluster's nodes do not, so there the job
        # is stored (at once) before the id is queued.
        if subscribed is not None:
            job_keys.append(keys.live(job_id))
        pipe = pipe if pipe is not None else self.redis.pipeline(transaction=False)
        at = len(pipe)
        args = [self.max_age, viewers, *pairs]
        created = script_in(self.redis, pipe, self.scripts.create, job_keys, args)
        metrics.count(pipe, "viewers", viewers)
        entry = queue.entry(job_id, stored, now)
        pipe.lpush(keys.PENDING, entry)
        metrics.count(pipe, "jobs_created")
        results = pipe.execute()
        if subscribed is not None:
            subscribed(int(results[at] if created is None else created) == 2)
        queued = results[-2]
        # The cap is checked by the push itself (the queue is in a slot of its own, so no
        # script can check and push with the job's writes): one round trip, not two.
        if 0 < max_queued < queued and self._withdraw(job_id, entry):
            raise QueueFull()
        return job_id

    def _withdraw(self, job_id: str, entry: str) -> bool:
        """Take a job just queued off the queue and delete it, unless a worker has it already
        (it then runs: the queue was draining)."""
        if not self.redis.lrem(keys.PENDING, 1, entry):
            return False
        self.redis.delete(keys.job(job_id))
        self.redis.delete(keys.text(job_id))
        self.redis.delete(keys.viewers(job_id))
        metrics.count(self.redis, "jobs_created", -1)
        return True

    def exists(self, job_id: str) -> bool:
        return is_job_id(job_id) and bool(self.redis.exists(keys.job(job_id)))

    def progress(self, job_id: str) -> tuple[int, bool, bool]:
        """How many events the job has written, whether it has ended, and whether it exists."""
        seq, status = (as_text(v) for v in self.redis.hmget(keys.job(job_id), "seq", "status"))
        return int(seq or 0), status in TERMINAL, bool(status)

    def status(self, job_id: str) -> dict[str, Any] | None:
        """The job as ``GET /v1/jobs/<id>`` shows it, or None if unknown or expired."""
        if not is_job_id(job_id):
            return None
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.job(job_id))
        pipe.get(keys.text(job_id))
        fields, text = pipe.execute()
        if not fields:
            return None
        h = {k.decode(): v.decode() for k, v in fields.items()}

        def stamp(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        turn = Turn.from_json(h["conversation"]) if h.get("conversation") else None
        return {
            "id": job_id,
            "object": "relay.job",
            "status": h.get("status"),
            # Only for the creator: the API removes them for anyone else (relay.conversations).
            "messageId": turn.message_id if turn else None,
            "parentMessageId": turn.parent_message_id if turn else None,
            "model": h.get("model") or None,
            "upstream": h.get("upstream") or None,  # the one that served it (routes file)
            "text": (text or b"").decode(),
            "finish_reason": h.get("finish_reason") or None,
            "usage": loads(h["usage"]) if h.get("usage") else None,
            "error": loads(h["error"]) if h.get("error") else None,
            "events": int(h.get("seq") or 0),
            "attempts": int(h.get("attempt") or 0),
            "created_at": stamp("created_at"),
            "started_at": stamp("started_at"),
            "finished_at": stamp("finished_at"),
        }

    def cancel(self, job_id: str) -> tuple[bool, str]:
        """End a queued or running job as ``cancelled``, keeping its text so far.

        Returns whether this call ended it, and the worker running it (to be told to stop).
        """
        model, worker = (as_text(v) for v in self.redis.hmget(keys.job(job_id), "model", "worker"))
        chunk = final_chunk(completion_id(job_id), CANCELLED, model)
        ended = self.finish(
            job_id, None, JobStatus.CANCELLED, [chunk, DONE], {"finish_reason": CANCELLED}
        )
        if ended and worker:
            self.redis.spublish(keys.control(worker), f"cancel {job_id}")
        return ended, worker

    def add_viewer(self, job_id: str, delta: int) -> int:
        """Count viewers across processes; the count after the change."""
        pipe = self.redis.pipeline(transaction=False)
        job_keys = [keys.job(job_id), keys.viewers(job_id)]
        at_once = script_in(self.redis, pipe, self.scripts.viewers, job_keys, [delta])
        metrics.count(pipe, "viewers", delta)
        results = pipe.execute()
        return int(results[0] if at_once is None else at_once)

    def turn(self, job_id: str) -> Turn | None:
        raw = self.redis.hget(keys.job(job_id), "conversation")
        return Turn.from_json(raw) if raw else None

    def read_events(self, job_id: str, after: int = 0) -> Iterator[tuple[int, bytes]]:
        """Events with ids greater than ``after``, read in pages so memory stays bounded."""
        start = after
        while True:
            page = self.redis.lrange(keys.events(job_id), start, start + LOG_PAGE - 1)
            yield from enumerate(page, start=start + 1)
            if len(page) < LOG_PAGE:
                return
            start += len(page)

    # -- the worker's side --------------------------------------------------------------------

    def claim(self, job_id: str, worker_id: str) -> int:
        """Mark a job running for this worker; the attempt number fences later writes (0: skip)."""
        return self.claim_and_load(job_id, worker_id).attempt

    def claim_and_load(self, job_id: str, worker_id: str) -> Claim:
        """:meth:`claim`, with what the worker runs and ends the job with, in the same round
        trip (attempt 0: skip)."""
        return _claimed(self.scripts.claim(keys=[keys.job(job_id)], args=[worker_id, _now()]))

    def claim_sent(self, job_id: str, worker_id: str) -> SentClaim:
        """:meth:`claim_and_load` in two halves: the claim is sent now, its reply read later
        (:meth:`SentClaim.answer`); the caller works meanwhile, without a greenlet of its own."""
        key = keys.job(job_id)
        router = Router(self.redis)
        return SentClaim(self, router.node_client(router.node(key)), job_id, worker_id)

    def served_by(self, job_id: str, upstream: str) -> None:
        """Record which upstream serves the job (its status says so)."""
        self.redis.hset(keys.job(job_id), "upstream", upstream)

    def publish_many(
        self,
        batch: list[tuple[str, int, list[str], str]],
        execute: Callable[[list[tuple[Any, ...]]], list[Any]],
    ) -> list[int | Exception]:
        """Append and publish events for several jobs in one round trip: each entry is
        ``(job id, attempt, event data, text delta)``, each result the id of the job's last
        event written, 0 if the job is no longer ours (ended or taken over), or its error.

        ``execute`` runs a list of commands and returns their replies, errors as exception
        values (:meth:`relay.core.connections.RawConnection.execute`).
        """
        script = self.scripts.publish

        def send(entries: list[tuple[str, int, list[str], str]]) -> list[Any]:
            commands = []
            for job_id, attempt, events, text_delta in entries:
                job_keys = keys.job_keys(job_id)
                commands.append(("EVALSHA", script.sha, len(job_keys), *job_keys, attempt,
                                 self.max_age, text_delta, *events))  # fmt: skip
            return execute(commands)

        results = send(batch)
        missed = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missed:  # Redis lost its script cache (a restart): those publishes did not run
            script.sha = self.redis.script_load(script.script)
            for i, result in zip(missed, send([batch[i] for i in missed]), strict=True):
                results[i] = result
        return [r if isinstance(r, Exception) else int(r) for r in results]

    def finish(
        self,
        job_id: str,
        attempt: int | None,
        status: JobStatus,
        events: list[str],
        fields: dict[str, str] | None = None,
        ender: Ender | None = None,
    ) -> bool:
        """End the job once: write its last events, its status and start its retention clock.

        Its concurrency slot is freed first: the caller's slots live in another slot of a
        cluster, so the two cannot be one step; freed before, an ended job never holds one (a
        crash between lets the caller run one job too many for a moment, never one too few).
        ``ender``: what the job's worker knows already (its slot's caller, its tally), so that
        nothing is read or counted on the way to its ``[DONE]``.
        """
        self._release_slot(job_id, None if ender is None else ender.limited_as)
        pairs: list[str] = ["finished_at", _now()]
        for name, value in (fields or {}).items():
            pairs += [name, value]
        args: list[Any] = ["" if attempt is None else attempt, status, self.retention, len(events)]
        ended = bool(self.scripts.finish(keys=keys.end_keys(job_id), args=args + events + pairs))
        if ended:
            with contextlib.suppress(RedisError):  # a counter never holds up a job's end
                metrics.job_finished(self.redis if ender is None else ender.tally, status)
        return ended

    def _release_slot(self, job_id: str, caller: str | None = None) -> None:
        """Free the concurrency slot the job holds, if it holds one (idempotent); ``caller``:
        whose slot it is, if known ("" for none), else it is read. The caller's keys may live
        on another cluster node than the job's; if that one is unreachable, the slot lapses
        with its lease instead."""
        if caller is None:
            caller = as_text(self.redis.hget(keys.job(job_id), "limited_as"))
        if caller:
            with contextlib.suppress(RedisError):
                self.redis.zrem(keys.active(caller), job_id)

    def complete(
        self,
        job_id: str,
        attempt: int,
        finish_reason: str | None,
        usage: dict | None,
        ender: Ender | None = None,
    ) -> bool:
        fields = {"finish_reason": finish_reason or ""}
        if usage is not None:
            fields["usage"] = dumps(usage)
        return self.finish(job_id, attempt, JobStatus.COMPLETED, [DONE], fields, ender)

    def fail(
        self,
        job_id: str,
        attempt: int | None,
        message: str,
        *,
        type: str = "server_error",
        code: str | None = None,
        model: str = "",
        ender: Ender | None = None,
    ) -> bool:
        """End the job with an error event in OpenAI's shape, then ``[DONE]``."""
        chunk = error_chunk(job_id, message, type=type, code=code, model=model)
        error = dumps(loads(chunk)["error"])
        fields = {"error": error}
        return self.finish(job_id, attempt, JobStatus.FAILED, [chunk, DONE], fields, ender)

    def recover(
        self, job_id: str, worker_id: str, message: str, entry: str | None = None
    ) -> Recovery:
        """Handle a job claimed by a dead or stopping worker: ``RECOVER`` decides on the job,
        then ``RELEASE_CLAIM`` takes its queue ``entry`` off the worker's list (found there if
        not given; two slots: see :mod:`relay.core.scripts`). A re-queued entry is the same
        string, with the time it was first queued."""
        if entry is None:
            found = [e.raw for e in queue.claimed_entries(self.redis, worker_id)
                     if e.job_id == job_id]  # fmt: skip
            entry = found[0] if found else job_id
        model = as_text(self.redis.hget(keys.job(job_id), "model"))
        chunk = error_chunk(job_id, message, type="server_error", code="worker_lost", model=model)
        error = dumps(loads(chunk)["error"])
        outcome = Recovery(
            self.scripts.recover(
                keys=keys.end_keys(job_id),
                args=[worker_id, self.retention, chunk, DONE, _now(), error],
            )
        )
        requeue = "1" if outcome is Recovery.REQUEUED else "0"
        released = self.scripts.release_claim(
            keys=[keys.claimed(worker_id), keys.PENDING], args=[entry, requeue]
        )
        if not released:
            return Recovery.TAKEN  # another recovery took the claim (and re-queued it, if due)
        if outcome is Recovery.FAILED:
            self._release_slot(job_id)
            metrics.job_finished(self.redis, JobStatus.FAILED)
        return outcome
