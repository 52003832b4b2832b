"""The janitor's sweeps, on fakeredis (with Lua): whose claims it recovers, and whose not."""

import fakeredis
import pytest

from relay.core import keys, queue
from relay.core.jobs import JobStore
from tests.helpers import publish, queued
from worker import janitor

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def store():
    return JobStore(fakeredis.FakeRedis(), retention=60, max_age=600)


def streaming_job(store: JobStore, worker_id: str) -> str:
    """A job claimed by ``worker_id`` and half streamed, its worker's heartbeat lapsed."""
    job_id = store.create(REQUEST)
    claimed = queue.claim_next(store.redis, worker_id, timeout=1)
    assert claimed is not None and claimed.job_id == job_id
    attempt = store.claim(job_id, worker_id)
    publish(store, job_id, attempt, ['{"a":1}'], "Hel")
    queue.register_worker(store.redis, worker_id, ttl_ms=60_000)
    store.redis.delete(keys.heartbeat(worker_id))  # lapsed: a failover outlasted its TTL
    return job_id


def test_a_worker_whose_own_heartbeat_lapsed_does_not_end_its_own_jobs(store):
    # Seen in CI on a Redis Cluster: the node holding the only worker's heartbeat failed over
    # for longer than the heartbeat's TTL, and that worker's own janitor then ended every job
    # it was still streaming, on healthy shards too, with worker_lost.
    job_id = streaming_job(store, "alive")
    assert janitor.sweep(store, sweeper="alive") == 0
    assert store.status(job_id)["status"] == "running"
    assert queued(store.redis, keys.claimed("alive")) == [job_id]


def test_another_workers_lapsed_heartbeat_ends_its_started_jobs(store):
    job_id = streaming_job(store, "dead")
    assert janitor.sweep(store, sweeper="alive") == 1
    status = store.status(job_id)
    assert status["status"] == "failed" and status["error"]["code"] == "worker_lost"
    assert queued(store.redis, keys.claimed("dead")) == []
    assert queue.dead_workers(store.redis) == []  # unregistered once its claims were gone
