"""The job record's scripts, on fakeredis (with Lua): ordering, fencing, idempotent ends (and
one on a real Redis)."""

import fakeredis
import pytest
import redis
from redis.exceptions import MovedError, NoScriptError

from relay.core import keys, metrics, queue
from relay.core.jobs import Ender, JobStore, QueueFull, SentClaim, is_job_id, new_job_id
from relay.core.status import Recovery
from tests.helpers import publish, queued

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def store():
    return JobStore(fakeredis.FakeRedis(), retention=60, max_age=600)


def events(store, job_id, after=0):
    return [(seq, data.decode()) for seq, data in store.read_events(job_id, after)]


def test_job_ids_are_unguessable_and_well_formed(store):
    ids = {store.create(REQUEST) for _ in range(50)}
    assert len(ids) == 50
    assert all(is_job_id(i) and len(i) == 28 for i in ids)  # "job_" + 144 bits in base64url
    assert not is_job_id("job_{evil}")


def test_create_stores_and_queues_atomically(store):
    job_id = store.create(REQUEST)
    assert queued(store.redis) == [job_id]
    status = store.status(job_id)
    assert status["status"] == "queued" and status["text"] == "" and status["events"] == 0
    assert store.claim_and_load(job_id, "w1")[1] == REQUEST
    assert 0 < store.redis.ttl(keys.job(job_id)) <= 600


def test_publish_appends_numbered_events_and_the_text(store):
    job_id = store.create(REQUEST)
    attempt = store.claim(job_id, "w1")
    assert attempt == 1 and store.status(job_id)["status"] == "running"
    assert publish(store, job_id, attempt, ['{"a":1}'], "Hel") == 1
    assert publish(store, job_id, attempt, ['{"a":2}', '{"a":3}'], "lo") == 3
    assert events(store, job_id) == [(1, '{"a":1}'), (2, '{"a":2}'), (3, '{"a":3}')]
    assert events(store, job_id, after=2) == [(3, '{"a":3}')]
    assert store.status(job_id)["text"] == "Hello"


def test_complete_ends_once_with_done_and_starts_retention(store):
    job_id = store.create(REQUEST)
    attempt = store.claim(job_id, "w1")
    publish(store, job_id, attempt, ["{}"], "x")
    assert store.complete(job_id, attempt, "stop", {"total_tokens": 3})
    assert not store.complete(job_id, attempt, "stop", None)
    assert not store.fail(job_id, None, "late janitor")
    assert events(store, job_id) == [(1, "{}"), (2, "[DONE]")]
    status = store.status(job_id)
    assert (status["status"], status["finish_reason"], status["usage"]) == (
        "completed",
        "stop",
        {"total_tokens": 3},
    )
    assert 0 < store.redis.ttl(keys.events(job_id)) <= 60


def test_a_fenced_worker_can_no_longer_write(store):
    job_id = store.create(REQUEST)
    old = store.claim(job_id, "w1")
    store.redis.hincrby(keys.job(job_id), "attempt", 1)  # what a janitor's takeover does
    assert publish(store, job_id, old, ["{}"], "x") == 0
    assert not store.complete(job_id, old, "stop", None)
    assert events(store, job_id) == []


def test_failure_writes_an_openai_error_chunk_then_done(store):
    job_id = store.create(REQUEST)
    attempt = store.claim(job_id, "w1")
    assert store.fail(job_id, attempt, "boom", code="upstream_http_500", model="m")
    (_, chunk), (_, done) = events(store, job_id)
    assert done == "[DONE]"
    assert '"error":{"message":"boom","type":"server_error","param":null' in chunk
    assert store.status(job_id)["error"]["code"] == "upstream_http_500"


def test_recover_requeues_a_job_that_published_nothing(store):
    job_id = store.create(REQUEST)
    claimed = queue.claim_next(store.redis, "dead", timeout=1)
    assert claimed is not None and claimed.job_id == job_id
    attempt = store.claim(job_id, "dead")
    assert store.recover(job_id, "dead", "lost") is Recovery.REQUEUED
    assert store.recover(job_id, "dead", "lost") is Recovery.TAKEN  # a second janitor: nothing
    # Back on the queue as the same entry: its request and the time it was first queued.
    assert store.redis.lrange(keys.PENDING, 0, -1) == [claimed.raw.encode()]
    assert store.status(job_id)["status"] == "queued"
    assert publish(store, job_id, attempt, ["{}"], "") == 0  # the old worker is fenced off
    assert store.claim(job_id, "w2") == attempt + 2


def test_recover_fails_a_started_job_exactly_once(store):
    job_id = store.create(REQUEST)
    queue.claim_next(store.redis, "dead", timeout=1)
    attempt = store.claim(job_id, "dead")
    publish(store, job_id, attempt, ["{}"], "x")
    assert store.recover(job_id, "dead", "worker lost") is Recovery.FAILED
    assert not store.complete(job_id, attempt, "stop", None)  # late worker: no second [DONE]
    data = [d for _, d in events(store, job_id)]
    assert data[-1] == "[DONE]" and data.count("[DONE]") == 1
    assert "worker lost" in data[-2]
    assert store.status(job_id)["status"] == "failed"


def test_the_claim_names_the_slot_the_worker_frees_at_the_end_without_reading_it(store):
    job_id = store.create(REQUEST, limited_as="key:k1")
    store.redis.zadd(keys.active("key:k1"), {job_id: 1})  # the slot the web tier took for it
    claim = store.claim_and_load(job_id, "w1")
    assert claim.limited_as == "key:k1" and claim.request == REQUEST
    tally = metrics.Tally()
    store.redis.hdel(keys.job(job_id), "limited_as")  # the worker does not read it again
    assert store.complete(job_id, claim.attempt, "stop", None, Ender(claim.limited_as, tally))
    assert store.redis.zcard(keys.active("key:k1")) == 0
    assert store.redis.hget(keys.METRICS, "jobs_finished:completed") is None  # in the tally
    tally.flush(store.redis)
    assert store.redis.hget(keys.METRICS, "jobs_finished:completed") == b"1"


def test_a_queue_entry_carries_a_small_request_and_the_time_it_was_queued():
    job_id = "job_" + "b" * 24
    raw = queue.entry(job_id, '{"model":"m"}', 1700000000.25)
    assert queue.read_entry(raw) == queue.Entry(raw, job_id, 1700000000.25, '{"model":"m"}')
    big = '{"x":"' + "y" * queue.INLINE_MAX + '"}'
    assert queue.entry(job_id, big, 1.0) == job_id  # read with the claim instead
    assert queue.read_entry(job_id) == queue.Entry(job_id, job_id)
    assert queue.read_entry(f"{job_id} soon {{}}") == queue.Entry(f"{job_id} soon {{}}", job_id)


def test_a_job_past_the_queues_cap_is_taken_back_whole(store):
    store.create(REQUEST)
    with pytest.raises(QueueFull):
        store.create(REQUEST, max_queued=1)
    assert len(queued(store.redis)) == 1 and len(store.redis.keys(keys.job("*"))) == 1


class _Refusing:
    """A pool whose one connection answers the claim with ``error`` (as a node whose slot
    moved does)."""

    def __init__(self, error: Exception) -> None:
        self.connection_pool = self
        self.error, self.released, self.sent = error, 0, []

    def get_connection(self):
        return self

    def send_command(self, *args):
        self.sent.append(args)

    def read_response(self):
        raise self.error

    def release(self, _conn):
        self.released += 1


def test_a_claim_refused_before_it_ran_is_made_again_by_the_client(store):
    """MOVED (a cluster's slot has another owner now) and NOSCRIPT mean the claim did not run:
    the client's own path, which follows the slot and loads the script, makes it."""
    for error in (MovedError("3999 127.0.0.1:6381"), NoScriptError("NOSCRIPT")):
        job_id = store.create(REQUEST)
        node = _Refusing(error)
        claim = SentClaim(store, node, job_id, "w1").answer()
        assert node.sent[0][0] == "EVALSHA" and node.released == 1
        assert claim.attempt == 1 and claim.request == REQUEST
        assert store.status(job_id)["status"] == "running"


@pytest.mark.integration
def test_the_store_says_whether_the_jobs_live_channel_had_its_subscriber_yet(redis_url):
    """A creator subscribes before storing its job, without waiting; the job's CREATE says
    whether that subscription had taken effect (on a real Redis: fakeredis has no SHARDNUMSUB
    in scripts), with or without the caller's own writes in the same pipeline."""
    client = redis.Redis.from_url(redis_url)
    store = JobStore(client, retention=60, max_age=600)
    seen: list[bool] = []
    store.create(REQUEST, job_id=new_job_id(), subscribed=seen.append)
    watched = new_job_id()
    subscription = client.pubsub()
    subscription.ssubscribe(keys.live(watched))
    assert subscription.get_message(timeout=5)["type"] == "ssubscribe"
    pipe = client.pipeline(transaction=False)
    pipe.set("relay:test:caller-write", "1")  # the caller's writes come first
    store.create(REQUEST, job_id=watched, subscribed=seen.append, pipe=pipe)
    subscription.close()
    assert seen == [False, True]
    assert client.get("relay:test:caller-write") == b"1"
    assert [queue.read_entry(e).job_id for e in client.lrange(keys.PENDING, 0, -1)][0] == watched
