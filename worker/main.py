"""The worker process: claims jobs from the queue and runs many at once on gevent greenlets."""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import time
from typing import Any

import gevent
import requests
from gevent.event import Event
from gevent.pool import Pool
from redis.exceptions import RedisError

from relay.core import keys, logs, queue, routes, tokens
from relay.core.backoff import Backoff
from relay.core.connections import MIN_REDIS_VERSION, connect, oldest_version
from relay.core.conversations import Conversations
from relay.core.jobs import JobStore
from relay.core.settings import Settings
from relay.core.status import Recovery

from . import janitor
from .publisher import Publisher
from .runner import Early, JobCancelled, JobContext, run_job, send_early
from .slots import UpstreamSlots
from .upstream import Session, Upstream

logger = logging.getLogger(__name__)

# Every blocking wait (a claim, a free slot, a control message) lasts at most this long, so a
# stop request is noticed within it. Whole seconds: BLMOVE's timeout.
POLL_SECONDS = 1
KILL_TIMEOUT = 1.0  # seconds for killed greenlets to unwind at shutdown
JITTER = (0.8, 1.0)  # the helpers' periods are scaled by a random factor in this range

SHUTDOWN_MESSAGE = (
    "The worker shut down before the reply finished; the reply is incomplete. Please retry."
)


def _session(pool_size: int) -> requests.Session:
    """One HTTP session whose connection pools fit every concurrent stream."""
    session = Session(max_idle=pool_size)
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class Worker:
    def __init__(self, settings: Settings, worker_id: str | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or (
            f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.concurrency = settings.worker_concurrency
        self.grace = settings.worker_grace_seconds
        lease = settings.lease_seconds
        # A dead worker's heartbeat lapses after half a lease and a janitor looks every quarter
        # lease, so its jobs are recovered within the lease (DESIGN.md invariant 4).
        self.heartbeat_ttl_ms = int(lease * 1000 / 2)
        self.heartbeat_every = lease / 6
        self.janitor_every = lease / 4
        self.redis = connect(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            cluster=settings.redis_cluster,
        )
        self.store = JobStore(
            self.redis, retention=settings.retention_seconds, max_age=settings.job_max_age_seconds
        )
        self.ctx = JobContext(
            store=self.store,
            publisher=Publisher(self.store),
            session=_session(self.concurrency),
            upstream=Upstream(
                base_url=settings.upstream_base_url,
                api_key=settings.upstream_api_key,
                connect_timeout=settings.upstream_connect_timeout,
                read_timeout=settings.upstream_read_timeout,
            ),
            worker_id=self.worker_id,
            routes=routes.load(settings),
            slots=UpstreamSlots(self.redis, lease),
            max_retries=settings.upstream_max_retries,
            silence_log_seconds=settings.upstream_silence_log_seconds,
            default_model=settings.default_model,
            include_usage=settings.upstream_include_usage,
            moderation=settings.moderation,
            moderation_fail_open=settings.moderation_fail_open,
            moderation_model=settings.moderation_model,
            conversations=Conversations(self.redis, ttl=settings.conversation_ttl_seconds),
        )
        self.pool = Pool(self.concurrency)
        tokens.load()  # not on the loop at the first job's end
        self.running: dict[str, gevent.Greenlet] = {}
        self._suspects: set[queue.Entry] = set()
        # Set on SIGTERM: claim no more jobs. The helpers (heartbeat, janitor, cancel orders)
        # keep going until ``halted``: running jobs still need them during the grace.
        self.stopping = Event()
        self.halted = Event()
        self._stop_requested_at: float | None = None
        self._handed_back = 0

    def reload_routes(self) -> None:
        """Read the routes file again (SIGHUP) for the jobs claimed from now on; running jobs
        keep their upstream. A file that has become bad keeps the last good routes."""
        if not self.settings.upstreams_file:
            logger.info("SIGHUP: no routes file to read (RELAY_UPSTREAMS_FILE is not set)")
            return
        try:
            fresh = routes.read(self.settings)
        except routes.RoutesError as exc:
            logger.error("routes not reloaded, the worker keeps the last good ones: %s", exc)
            return
        ctx = self.ctx
        if ctx.routes is not None:  # a running job may still meet (and echo) an old key
            ctx.retired_keys |= {u.api_key for u in ctx.routes.upstreams.values() if u.api_key}
        ctx.routes = fresh
        logger.info("routes reloaded: %s", fresh.describe())

    def request_stop(self) -> None:
        """Stop claiming new jobs; running ones finish (SIGTERM)."""
        if not self.stopping.is_set():
            logger.info("worker %s stopping: no new jobs", self.worker_id)
            self._stop_requested_at = time.monotonic()
            self.stopping.set()

    def _every(self, seconds: float, action: Any, name: str) -> None:
        # Jittered, so that many workers started together do not sweep in lockstep.
        while not self.halted.wait(seconds * random.uniform(*JITTER)):
            try:
                action()
            except RedisError as exc:
                logger.warning("%s failed: %s", name, exc)
            except Exception:
                logger.exception("%s failed", name)

    def _heartbeat(self) -> None:
        queue.register_worker(self.redis, self.worker_id, self.heartbeat_ttl_ms)
        if self.ctx.slots is not None:
            self.ctx.slots.renew()

    def _sweep(self) -> None:
        janitor.sweep(self.store, self.worker_id)
        self._suspects = janitor.sweep_orphans(
            self.store, self.worker_id, set(self.running), self._suspects
        )

    def _run_job(self, entry: queue.Entry, early: Early | None = None) -> None:
        try:
            with logs.job_context(entry.job_id):
                run_job(self.ctx, entry.job_id, entry, early)
        finally:
            self.running.pop(entry.job_id, None)

    def _obey(self, order: bytes) -> None:
        command, _, job_id = order.decode().partition(" ")
        greenlet = self.running.get(job_id)
        if command == "cancel" and greenlet is not None:
            greenlet.kill(JobCancelled(job_id), block=False)

    def _listen(self) -> None:
        """Follow this worker's control channel (cancel orders) on one pub/sub connection."""
        backoff = Backoff()
        while not self.halted.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.ssubscribe(keys.control(self.worker_id))
                while not self.halted.is_set():
                    message = pubsub.get_sharded_message(timeout=POLL_SECONDS)
                    if message is not None:
                        self._obey(message["data"])
                    backoff.reset()
            except RedisError as exc:
                delay = backoff.next()
                logger.warning("control channel lost (%s); retrying in %.1fs", exc, delay)
                self.halted.wait(delay)
            finally:
                pubsub.close()

    def _hand_back(self, entry: queue.Entry) -> None:
        """Return a job claimed once the stop was asked for (a ``BLMOVE`` issued just before
        it) to the head of the queue, unstarted: this worker takes no new jobs."""
        job_id = entry.job_id
        try:
            # Back at the head of the queue (where BLMOVE takes from), if still claimed.
            returned = self.store.scripts.release_claim(
                keys=[keys.claimed(self.worker_id), keys.PENDING], args=[entry.raw, "1"]
            )
        except RedisError as exc:
            # Still on the claimed list: the release at the end of teardown re-queues it.
            logger.warning("job %s: could not hand back at once (%s)", job_id, exc)
            return
        if returned:
            self._handed_back += 1
            logger.info("job %s handed back unstarted: claimed as the worker stopped", job_id)

    def work(self, grace: float | None = None) -> None:
        """Claim and run jobs until asked to stop, then let running jobs finish (up to grace,
        counted from the stop request; default: the ``WORKER_GRACE_SECONDS`` setting)."""
        grace = self.grace if grace is None else grace
        backoff = Backoff()
        helpers: list[gevent.Greenlet] = []
        try:
            while True:
                try:
                    self._heartbeat()
                    break
                except RedisError as exc:
                    delay = backoff.next()
                    logger.warning("redis unavailable (%s); retrying in %.1fs", exc, delay)
                    if self.stopping.wait(delay):
                        return
            if (version := oldest_version(self.redis)) < MIN_REDIS_VERSION:
                raise SystemExit(
                    f"Redis {'.'.join(map(str, version))} at {self.settings.redis_url}: "
                    f"chat-relay needs Redis {'.'.join(map(str, MIN_REDIS_VERSION))} or later "
                    "(sharded pub/sub)"
                )
            helpers = [
                gevent.spawn(self._every, self.heartbeat_every, self._heartbeat, "heartbeat"),
                gevent.spawn(self._every, self.janitor_every, self._sweep, "janitor"),
                gevent.spawn(self._listen),
            ]
            logger.info(
                "worker %s ready: concurrency %d, upstreams %s",
                self.worker_id,
                self.concurrency,
                ", ".join(u.chat_url for u in self.ctx.routes.upstreams.values())
                if self.ctx.routes is not None
                else self.ctx.upstream.chat_url,
            )
            backoff.reset()
            while not self.stopping.is_set():
                self.pool.wait_available(timeout=POLL_SECONDS)
                if self.pool.full():
                    continue
                try:
                    entry = queue.claim_next(self.redis, self.worker_id, timeout=POLL_SECONDS)
                    backoff.reset()
                except RedisError as exc:
                    delay = backoff.next()
                    logger.warning("claim failed (%s); retrying in %.1fs", exc, delay)
                    self.stopping.wait(delay)
                    continue
                if entry is None:
                    continue
                if self.stopping.is_set():
                    # Claimed by a BLMOVE that was waiting when the stop came: not ours to run.
                    self._hand_back(entry)
                    continue
                # A fresh job's upstream request and claim go out from here when they can
                # without waiting: its greenlet starts only after a turn of the event loop.
                early = send_early(self.ctx, entry)
                job = self.pool.spawn(self._run_job, entry, early)
                # Registered before the greenlet runs, so the orphan sweep never takes it.
                self.running[entry.job_id] = job
                if early is not None:
                    job.link(lambda _, early=early: early.abandon())  # killed before it ran
                if early is None or early.sent is None:
                    # Let the job send its upstream request (and its claim, unless sent here)
                    # before the next BLMOVE goes out: the first token waits for those.
                    gevent.sleep(0)
        finally:
            self.teardown(helpers, grace)

    def teardown(self, helpers: list[gevent.Greenlet], grace: float) -> None:
        """Let running jobs finish within the grace, then end the rest and release every claim.

        The heartbeat, janitor and cancel orders keep going while the jobs finish. At the end
        of the grace the remaining jobs' greenlets are killed and each job still on this
        worker's claimed list is recovered here and now (not by another worker's janitor,
        which might not exist): unstarted ones go back to the queue, started ones end with an
        error event and ``[DONE]``.
        """
        self.stopping.set()
        running = len(self.running)
        finished = 0
        if running:
            started = self._stop_requested_at or time.monotonic()
            remaining = max(0.0, started + grace - time.monotonic())
            logger.info(
                "worker %s stopping: %d jobs running; waiting up to %.1fs for them",
                self.worker_id,
                running,
                remaining,
            )
            self.pool.join(timeout=remaining)
            finished = running - len(self.running)
            if self.running:
                logger.warning(
                    "worker %s: grace of %.1fs over; ending %d unfinished jobs",
                    self.worker_id,
                    grace,
                    len(self.running),
                )
                self.pool.kill(timeout=KILL_TIMEOUT)
        self.halted.set()
        gevent.killall(helpers, timeout=KILL_TIMEOUT)
        requeued, failed = self._release_claims()
        logger.info(
            "worker %s stopped: %d jobs running at the stop, %d finished within the grace, "
            "%d handed back unstarted (%d claimed as it stopped), %d failed unfinished",
            self.worker_id,
            running,
            finished,
            requeued + self._handed_back,
            self._handed_back,
            failed,
        )

    def _release_claims(self) -> tuple[int, int]:
        """Recover every job left on this worker's claimed list, then unregister.

        Returns how many were re-queued and how many failed. If Redis fails, the heartbeat is
        dropped instead (or lapses by itself) and another worker's janitor recovers the rest.
        """
        requeued = failed = 0
        try:
            claims = queue.claimed_entries(self.redis, self.worker_id)
            outcomes = janitor.recover_claims(
                self.store, self.worker_id, claims, SHUTDOWN_MESSAGE, "the worker stopped"
            )
            requeued, failed = outcomes[Recovery.REQUEUED], outcomes[Recovery.FAILED]
            if queue.claimed_count(self.redis, self.worker_id):
                # Never delete a claimed list that still holds jobs: a janitor recovers them.
                queue.drop_heartbeat(self.redis, self.worker_id)
            else:
                queue.unregister_worker(self.redis, self.worker_id)
        except RedisError as exc:
            logger.warning(
                "could not release this worker's claims (%s); a janitor will recover them", exc
            )
            try:
                queue.drop_heartbeat(self.redis, self.worker_id)
            except RedisError as again:
                logger.warning("could not drop the heartbeat either (%s); it will lapse", again)
        return requeued, failed
