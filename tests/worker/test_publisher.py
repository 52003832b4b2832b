"""worker.publisher against a real redis-server, on its own connections as in production:
batching, merging a lagging job's text, results."""

from __future__ import annotations

import json
from typing import Any

import gevent
import gevent.event
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from relay.core import keys
from relay.core.chunks import dumps
from relay.core.connections import connect
from relay.core.jobs import JobStore
from worker.publisher import Publisher, mergeable

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def delta(text: str, stamp: float = 0.0, **choice) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "x_sim_emitted_at": stamp,
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None, **choice}],
    }


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(connect(redis_url), retention=60, max_age=600)


def running_job(store: JobStore) -> tuple[str, int]:
    job_id = store.create(REQUEST)
    return job_id, store.claim(job_id, "w1")


def logged(store: JobStore, job_id: str) -> list[dict]:
    return [json.loads(data) for _, data in store.read_events(job_id)]


def coalesced(store: JobStore) -> int:
    return int(store.redis.hget(keys.METRICS, "deltas_coalesced") or 0)


def publish(pub: Publisher, job: tuple[str, int], chunk: dict) -> int:
    text = chunk["choices"][0]["delta"].get("content") or ""
    return pub.publish(*job, [dumps(chunk)], text, chunk)


def test_a_job_that_keeps_up_gets_one_event_per_chunk(store: JobStore) -> None:
    pub, job = Publisher(store), running_job(store)
    for i, word in enumerate(["Hel", "lo", "!"]):
        assert publish(pub, job, delta(word, stamp=i))
        gevent.idle()  # the job waits for its upstream: the batch goes out meanwhile
    assert pub.flush(*job) == 3
    texts = [e["choices"][0]["delta"]["content"] for e in logged(store, job[0])]
    assert texts == ["Hel", "lo", "!"]
    assert coalesced(store) == 0


def test_a_lagging_job_merges_its_text_into_the_unsent_event(store: JobStore) -> None:
    pub, job = Publisher(store), running_job(store)
    role = {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    assert pub.publish(*job, [dumps(role)], "", role)
    # No switch between these: the job read them all before the publisher could send any.
    for i, word in enumerate(["The", " quick", " brown"]):
        assert publish(pub, job, delta(word, stamp=10 + i))
    end = delta("", stamp=20, finish_reason="stop")
    end["choices"][0]["delta"] = {}
    assert pub.publish(*job, [dumps(end)], "", end)
    assert publish(pub, job, delta(" fox", stamp=30))
    assert pub.flush(*job) == 4
    events = logged(store, job[0])
    assert [e["choices"][0]["delta"] for e in events] == [
        {"role": "assistant"},
        {"content": "The quick brown"},
        {},
        {"content": " fox"},
    ]
    # The merged event keeps the first chunk's fields: its emit time is the earliest.
    assert events[1]["x_sim_emitted_at"] == 10 and events[1]["id"] == "chatcmpl-1"
    assert store.status(job[0])["text"] == "The quick brown fox"
    assert coalesced(store) == 2  # counted for /metrics


def test_jobs_queued_together_go_out_in_one_batch_each_in_order(store: JobStore) -> None:
    pub = Publisher(store)
    jobs = [running_job(store) for _ in range(3)]
    for word in ["a", "b"]:
        for job in jobs:
            publish(pub, job, delta(word))
    for job in jobs:
        assert pub.flush(*job) == 1
        assert [e["choices"][0]["delta"]["content"] for e in logged(store, job[0])] == ["ab"]


@pytest.mark.parametrize(
    "chunk",
    [
        delta("x", finish_reason="length"),
        delta("x", logprobs={"content": []}),
        {**delta("x"), "usage": {"total_tokens": 1}},
        {"choices": [{"index": 1, "delta": {"content": "x"}}]},
        {"choices": [{"index": 0, "delta": {"content": "x", "role": "assistant"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": []}}]},
        {"choices": [{"index": 0, "delta": {"content": None}}]},
        {"choices": [delta("x")["choices"][0], {"index": 1, "delta": {"content": "y"}}]},
    ],
)
def test_only_plain_text_deltas_merge(chunk: dict) -> None:
    assert mergeable(delta("plain")) == "content"
    assert mergeable(thought("hmm")) == "reasoning_content"
    reasoning = thought("hmm")
    reasoning["choices"][0]["delta"] = {"reasoning": "hmm"}  # Ollama's and OpenRouter's name
    assert mergeable(reasoning) == "reasoning"
    assert mergeable(chunk) is None
    both = thought("hmm")
    both["choices"][0]["delta"]["content"] = "x"
    assert mergeable(both) is None


def thought(text: str, stamp: float = 0.0) -> dict:
    chunk = delta("", stamp)
    chunk["choices"][0]["delta"] = {"reasoning_content": text}
    return chunk


def test_a_lagging_reasoning_models_thinking_merges_but_never_into_its_answer(
    store: JobStore,
) -> None:
    pub, job = Publisher(store), running_job(store)
    steps = [(thought, "Let"), (thought, " me"), (thought, " see."), (delta, "Four"),
             (delta, "."), (thought, " Hm.")]  # fmt: skip
    # No switch between these: the job read them all before the publisher could send any.
    for i, (make, text) in enumerate(steps):
        chunk = make(text, stamp=i)
        answer = chunk["choices"][0]["delta"].get("content", "")
        assert pub.publish(*job, [dumps(chunk)], answer, chunk)
    assert pub.flush(*job) == 3
    assert [e["choices"][0]["delta"] for e in logged(store, job[0])] == [
        {"reasoning_content": "Let me see."},
        {"content": "Four."},
        {"reasoning_content": " Hm."},
    ]
    assert store.status(job[0])["text"] == "Four."  # the answer alone
    assert coalesced(store) == 3


def test_a_job_no_longer_ours_is_reported_by_the_next_publish_and_the_flush(
    store: JobStore,
) -> None:
    pub, job = Publisher(store), running_job(store)
    store.fail(job[0], None, "taken over")
    assert publish(pub, job, delta("late"))
    gevent.idle()  # the batch is sent and refused
    assert publish(pub, job, delta("later")) == 0
    assert pub.flush(*job) == 0
    assert "late" not in store.status(job[0])["text"]


def test_a_redis_error_reaches_the_job(store: JobStore) -> None:
    pub, job = Publisher(store), running_job(store)

    def broken(batch, execute):
        raise RedisConnectionError("gone")

    store.publish_many = broken  # type: ignore[method-assign]
    publish(pub, job, delta("x"))
    with pytest.raises(RedisConnectionError):
        pub.flush(*job)
    assert pub.flush(*job) == 1  # reported once, then forgotten


class Held:
    """publish_many that waits for ``release`` (a batch on the wire), then fails or not."""

    def __init__(self, store: JobStore, fail: bool = False) -> None:
        self.release = gevent.event.Event()
        self.calls: list[list] = []
        self._real, self._fail = store.publish_many, fail
        store.publish_many = self  # type: ignore[method-assign]

    def __call__(self, batch: list, execute: Any) -> list:
        self.calls.append(batch)
        self.release.wait()
        if self._fail and len(self.calls) == 1:
            raise RedisConnectionError("gone")
        return self._real(batch, execute)


def test_flush_waits_for_a_batch_already_on_the_wire(store: JobStore) -> None:
    """The job's end must come after its last events: a flush that returned while they were
    in flight let the end be written first, and the events were then refused (lost)."""
    pub, job = Publisher(store), running_job(store)
    held = Held(store)
    publish(pub, job, delta("last words"))
    gevent.idle()  # the batch is taken and sent; its replies have not come
    flusher = gevent.spawn(pub.flush, *job)
    gevent.idle()
    assert not flusher.ready()
    held.release.set()
    assert flusher.get(timeout=5) == 1
    assert [e["choices"][0]["delta"]["content"] for e in logged(store, job[0])] == ["last words"]


def test_events_queued_behind_a_failed_batch_are_not_sent(store: JobStore) -> None:
    """Sending them would leave a hole in the log where the failed batch's events were."""
    pub, job = Publisher(store), running_job(store)
    held = Held(store, fail=True)
    publish(pub, job, delta("lost"))
    gevent.idle()  # on the wire
    role = {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    assert pub.publish(*job, [dumps(role)], "", role)  # queued behind it (not mergeable)
    held.release.set()
    with pytest.raises(RedisConnectionError):
        pub.flush(*job)
    assert len(held.calls) == 1 and logged(store, job[0]) == []


def test_jobs_are_spread_over_lanes_that_send_at_once(store: JobStore) -> None:
    pub = Publisher(store, lanes=4)
    held = Held(store)
    jobs = [running_job(store) for _ in range(32)]
    for job in jobs:
        publish(pub, job, delta("x"))
    gevent.idle()
    assert len(held.calls) == 4  # each lane's batch is on the wire together
    held.release.set()
    assert all(pub.flush(*job) == 1 for job in jobs)


def test_sent_waits_for_what_was_queued_without_taking_its_outcome(store: JobStore) -> None:
    pub, job = Publisher(store), running_job(store)
    publish(pub, job, delta("Hi"))
    assert logged(store, job[0]) == []  # only queued
    pub.sent(*job)
    assert [c["choices"][0]["delta"]["content"] for c in logged(store, job[0])] == ["Hi"]
    pub.sent(*job)  # nothing queued since: returns at once
    assert pub.flush(*job) == 1  # the outcome is still there for the job's end


def test_send_now_sends_from_the_callers_greenlet_when_the_lane_is_idle(store: JobStore) -> None:
    """The first chunk's publish goes out from the job's own greenlet, not after a wake-up of
    the lane's: in Redis by the time send_now returns, sent by the caller."""
    pub, job = Publisher(store), running_job(store)
    senders: list[object] = []
    send = pub._send

    def sending(*args: Any) -> list:
        senders.append(gevent.getcurrent())
        return send(*args)

    pub._send = sending  # type: ignore[method-assign]
    assert publish(pub, job, delta("Hi"))
    pub.send_now(job[0])
    assert senders == [gevent.getcurrent()]
    assert [c["choices"][0]["delta"]["content"] for c in logged(store, job[0])] == ["Hi"]
    gevent.idle()  # the lane's greenlet, woken by the publish, finds nothing left to send
    assert len(senders) == 1 and pub.flush(*job) == 1


def test_send_now_leaves_the_lane_its_batch_while_one_is_on_the_wire(store: JobStore) -> None:
    pub, job = Publisher(store), running_job(store)
    lane = pub._lane(job[0])
    with lane.sending:  # as while the lane's greenlet waits for a batch's replies
        assert publish(pub, job, delta("Hi"))
        pub.send_now(job[0])  # returns at once, sending nothing
        assert lane.queued and logged(store, job[0]) == []
    assert pub.flush(*job) == 1  # the lane sends it
    assert len(logged(store, job[0])) == 1
