"""A creator's stream (``POST /v1/chat/completions`` with ``stream: true``): subscribed before
its job is stored, so it reads no backlog and needs no viewer count of its own; and a request
refused on the way leaves no job, subscription or stream slot behind."""

from __future__ import annotations

import itertools
import json

import fakeredis
import pytest
import requests

from relay.core import keys
from relay.core.jobs import JobStore
from relay.dev.simulator import reply_text
from relay.web.fanout import LiveEvent, Viewer
from relay.web.sse import format_event
from relay.web.streaming import follow
from tests.conftest import Stack, wait_for
from tests.helpers import Monitor, chat_body, pipelined


def stream_body(content: str, **simulator: object) -> dict:
    return {**chat_body(content, **simulator), "stream": True}


def post_stream(base: str, body: dict) -> tuple[requests.Response, list[str]]:
    """POST a streamed chat completion and read its data lines to [DONE]."""
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True,
                       timeout=(5, 20)) as response:  # fmt: skip
        data: list[str] = []
        if response.status_code != 200:
            response.content  # noqa: B018 - read now, for .json() after the close
        else:
            for line in response.iter_lines():
                if line.startswith(b"data: "):
                    data.append(line[6:].decode())
                    if data[-1] == "[DONE]":
                        break
    return response, data


def jobs_stored(redis) -> int:
    return sum(1 for _ in redis.scan_iter("relay:{job_*}:job"))


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_creators_stream_is_subscribed_before_its_job_is_stored(stack: Stack):
    base = stack.start_web()
    stack.start_worker()
    post_stream(base, stream_body("warm up"))  # the process's subscription connection is open
    redis = stack.redis()
    monitor = Monitor(stack.redis_url)
    try:
        body = stream_body("first", tokens=5)
        response, data = post_stream(base, body)
        count = keys.viewers(response.headers["X-Relay-Job-Id"])
        wait_for(lambda: redis.get(count) == b"0", 10, "the stream's end to be counted")
    finally:
        commands = monitor.stop()
    job_id = response.headers["X-Relay-Job-Id"]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == reply_text(body)

    def first(name: bytes, key: str) -> int:
        return next(i for i, (_, args) in enumerate(commands)
                    if args[0].upper() == name and key.encode() in args[1:])  # fmt: skip

    subscribed = first(b"SSUBSCRIBE", keys.live(job_id))
    stored = first(b"HSET", keys.job(job_id))  # the job's first write, inside its CREATE script
    queued = first(b"LPUSH", keys.PENDING)
    assert subscribed < stored < queued
    touching = [args for _, args in commands if any(k.startswith(f"relay:{{{job_id}}}".encode())
                                                    for k in args[1:2])]  # fmt: skip
    # No backlog read (nothing can be in the log before the job exists), and the stream is
    # counted by the job's own CREATE: the only change to the count is the stream's end.
    assert not [a for a in touching if a[0].upper() == b"LRANGE"]
    counted = [(a[0].upper(), a[2]) for a in touching if a[1] == keys.viewers(job_id).encode()
               and a[0].upper() in (b"SET", b"INCRBY")]  # fmt: skip
    assert counted == [(b"SET", b"1"), (b"INCRBY", b"-1")]
    # The worker writes no counter between its claim and the first chunk's publish (each
    # write cost it ~0.3 ms of CPU there): they wait in the job's tally.
    claimed = first(b"HINCRBY", keys.job(job_id))  # the CLAIM script's attempt
    published = first(b"RPUSH", keys.events(job_id))
    between = [args for _, args in commands[claimed:published]
               if args[1:2] == [keys.METRICS.encode()]]  # fmt: skip
    assert claimed < published and between == []


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_refused_creator_leaves_no_subscription_or_stream_slot(stack: Stack):
    base = stack.start_web(env={"RELAY_MAX_QUEUED_JOBS": "1", "RELAY_MAX_STREAMS_PER_CLIENT": "1"})
    filling = requests.post(f"{base}/v1/jobs", json=chat_body("fills the queue"), timeout=5)
    assert filling.status_code == 202
    refused, _ = post_stream(base, stream_body("refused"))
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
    assert requests.get(f"{base}/healthz", timeout=5).json()["viewers"] == 0
    # Subscribed before its body was checked, an invalid request takes its stream back too.
    invalid, _ = post_stream(base, {**stream_body("invalid"), "temperature": "hot"})
    assert invalid.status_code == 400 and invalid.json()["error"]["param"] == "temperature"
    assert requests.get(f"{base}/healthz", timeout=5).json()["viewers"] == 0
    stack.start_worker()  # the queue drains; the client's one stream slot is free
    response, data = post_stream(base, stream_body("accepted"))
    assert response.status_code == 200 and data[-1] == "[DONE]"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_creator_over_its_stream_cap_is_refused_before_a_job_is_stored(stack: Stack):
    base = stack.start_web(env={"RELAY_MAX_STREAMS_PER_CLIENT": "1"})
    stack.start_worker()
    redis = stack.redis()
    with requests.post(f"{base}/v1/chat/completions", json=stream_body("long", tokens=200,
                       interval=0.05), stream=True, timeout=(5, 20)) as opened:  # fmt: skip
        assert opened.status_code == 200
        before = jobs_stored(redis)
        refused, _ = post_stream(base, stream_body("one too many"))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
        assert jobs_stored(redis) == before  # the refusal came before the job was stored


def test_a_fresh_viewer_reads_no_backlog_until_a_gap_shows():
    """follow(fresh=True): subscribed before its job existed, a viewer takes events live; the
    log is read only when a live event skips ids (a lost message), so nothing is missed."""
    redis = fakeredis.FakeRedis()
    store = JobStore(redis, retention=60, max_age=600)
    job_id = store.create({"model": "m", "messages": []})
    attempt = store.claim(job_id, "w1")
    events = ['{"n":1}', '{"n":2}']
    assert store.publish_many([(job_id, attempt, events, "")], pipelined(redis)) == [2]
    viewer = Viewer(job_id, 8)
    stream = follow(store, NoHub(), viewer, 0, idle=0.01, fresh=True)  # type: ignore[arg-type]
    assert next(stream) is None  # a keep-alive: the log was not read
    data = b'{"n":2}'
    viewer.queue.put(LiveEvent(2, data, format_event(data, id=2), False))  # 1 never came live
    assert [e.seq for e in itertools.islice(stream, 2)] == [1, 2]  # read back from the log


class NoHub:
    def detach(self, viewer: Viewer) -> None:
        pass
