"""Client edges: odd input is a clear 4xx, a resume past the end is answered at once, a failed
attach leaves nothing behind, and nothing of a job outlives its retention or its end."""

from __future__ import annotations

import time
from collections.abc import Callable

import fakeredis
import pytest
import requests
from redis.exceptions import ConnectionError as RedisConnectionError

from relay.core import keys
from relay.core.connections import connect
from relay.core.jobs import JobStore
from relay.core.settings import Settings
from relay.core.status import Recovery
from relay.web.access import Access
from relay.web.app import create_app
from relay.web.fanout import Viewer
from relay.web.limits import Throttle
from tests.conftest import Stack, wait_for
from tests.helpers import chat_body, create_job, read_stream

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_odd_input_and_resumes_past_the_end_get_clear_answers(running_stack):
    _, base = running_stack
    part = {"model": "simulator",
            "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}  # fmt: skip
    refused = requests.post(f"{base}/v1/jobs", json=part, timeout=5)
    assert refused.status_code == 400, refused.text  # once a 500
    assert refused.json()["error"]["param"] == "messages[0].content[0].text"

    ended = create_job(base, chat_body("short", tokens=2))
    received, _ = read_stream(ended["events_url"])
    last = received.ids[-1]
    for after in (last, last + 50):  # the end again, or beyond it: [DONE] at once
        started = time.monotonic()
        again, _ = read_stream(ended["events_url"], headers={"Last-Event-ID": str(after)})
        assert again.data == ["[DONE]"] and time.monotonic() - started < 1

    running = create_job(base, chat_body("long", tokens=200, interval=0.05))
    beyond = requests.get(running["events_url"], headers={"Last-Event-ID": "999"}, timeout=5)
    assert beyond.status_code == 400 and beyond.json()["error"]["param"] == "Last-Event-ID"
    requests.post(running["cancel_url"], timeout=5)


class RecordingHub:
    """The process's hub as far as a stream's start uses it (no subscription needed here)."""

    def __init__(self) -> None:
        self.viewers: set[Viewer] = set()

    def attach(self, job_id: str, *, closable: bool = True) -> Viewer:
        viewer = Viewer(job_id, 8, closable)
        self.viewers.add(viewer)
        return viewer

    def detach(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)


@pytest.mark.timeout(30)
def test_a_viewer_is_not_left_registered_when_redis_fails_as_it_attaches(redis_url, monkeypatch):
    app = create_app(Settings(redis_url=redis_url))
    relay = app.extensions["relay"]
    relay._hub = hub = RecordingHub()
    grant = Access.new()
    job_id = relay.store.create(REQUEST, grant=grant.fields())

    def broken(*args, **kwargs):
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(JobStore, "add_viewer", broken)
    with app.test_client() as client:
        answer = client.get(f"/v1/jobs/{job_id}/events?token={grant.read_token}")
    assert answer.status_code == 503
    assert not hub.viewers  # it was attached, then let go


def test_an_ended_job_never_holds_a_concurrency_slot():
    """The slot is freed before the end is written (in a cluster the two are in different
    slots, so they cannot be one step): a process that stops between the two leaves the caller
    a slot to spare, never a job short until the job's maximum age, as before."""
    redis = fakeredis.FakeRedis()
    store = JobStore(redis, retention=60, max_age=86400)
    job_id = store.create(REQUEST, limited_as="key:k1")
    assert Throttle(redis).acquire("key:k1", job_id, 5, 86400)
    attempt = store.claim(job_id, "w1")

    def dies(*args, **kwargs):
        raise RedisConnectionError("the process stopped here")

    finish, store.scripts.finish = store.scripts.finish, dies  # type: ignore[method-assign]
    with pytest.raises(RedisConnectionError):
        store.fail(job_id, attempt, "x")
    assert redis.zcard(keys.active("key:k1")) == 0
    store.scripts.finish = finish  # type: ignore[method-assign]
    # A dead worker's started job, failed by a janitor, frees its slot too.
    job_id = store.create(REQUEST, limited_as="key:k1")
    assert Throttle(redis).acquire("key:k1", job_id, 5, 86400)
    store.claim(job_id, "w2")
    redis.rpush(keys.claimed("w2"), job_id)
    redis.hset(keys.job(job_id), "seq", 1)  # started: it is failed, not re-queued
    assert store.recover(job_id, "w2", "lost") is Recovery.FAILED
    assert redis.zcard(keys.active("key:k1")) == 0


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_nothing_of_a_job_outlives_its_retention(stack):
    base = stack.start_web(env={"RELAY_RETENTION_SECONDS": "2"})
    stack.start_worker(env={"RELAY_RETENTION_SECONDS": "2"})
    jobs = [create_job(base, chat_body("brief", tokens=2)) for _ in range(3)]
    for job in jobs:
        assert read_stream(job["events_url"])[0].done  # watched: each has a viewer counter
    redis = connect(stack.redis_url)

    def left() -> list[bytes]:
        return [key for job in jobs for key in redis.keys(f"relay:{{{job['id']}}}:*")]

    assert left()
    wait_for(lambda: not left(), 10, "every key of the jobs to expire")


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_streams_are_capped_per_client_address_and_per_read_token(stack: Stack):
    base = stack.start_web(env={"RELAY_MAX_STREAMS_PER_CLIENT": "3",
                                "RELAY_MAX_STREAMS_PER_TOKEN": "4",
                                "RELAY_TRUSTED_PROXIES": "1"})  # fmt: skip
    stack.start_worker()
    job = create_job(base, chat_body("long", tokens=400, interval=0.05))

    def stream(address: str) -> requests.Response:
        return requests.get(job["events_url"], headers={"X-Forwarded-For": address},
                            stream=True, timeout=5)  # fmt: skip

    opened = [stream("10.1.0.1") for _ in range(3)]
    assert all(r.status_code == 200 for r in opened)
    refused = stream("10.1.0.1")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
    refused.close()
    opened.pop().close()
    assert wait_until_ok(lambda: stream("10.1.0.1"), opened)
    opened.append(stream("10.1.0.2"))  # the token's fourth stream, from another address
    over = stream("10.1.0.3")
    over.close()  # an unread refusal holds its socket until collected: a ResourceWarning then
    assert over.status_code == 429, "the read token's cap"
    for response in opened:
        response.close()
    requests.post(job["cancel_url"], timeout=5)


def wait_until_ok(open_one: Callable[[], requests.Response], opened: list) -> bool:
    """The slot of a closed stream comes back once the relay notices the close."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        response = open_one()
        if response.status_code == 200:
            opened.append(response)
            return True
        response.close()
        time.sleep(0.1)
    return False
