"""Fan-out races forced deterministically, run in a gevent-patched subprocess against a real
Redis: ``python tests/relay/web/fanout_scenarios.py REDIS_URL SCENARIO``. Prints the SSE ids one
viewer received, as JSON, for tests/relay/web/test_fanout.py to check.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402

from relay.core.jobs import JobStore  # noqa: E402
from relay.web.fanout import Hub, Viewer  # noqa: E402
from relay.web.streaming import follow, sse_bytes  # noqa: E402
from tests.helpers import publish  # noqa: E402

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


def stream_events(
    store: JobStore, hub: Hub, viewer: Viewer, after: int, *, keepalive: float, retry_ms: int
):
    """SSE bytes for one attached viewer, from id ``after`` to ``[DONE]``, as a stream sends."""
    return sse_bytes(follow(store, hub, viewer, after, idle=keepalive), retry_ms=retry_ms)


def ids_of(frames: list[bytes]) -> list[int]:
    return [int(line[4:]) for f in frames for line in f.split(b"\n") if line.startswith(b"id: ")]


class RacingStore(JobStore):
    """Publishes events just before and just after the viewer's first backlog read."""

    def __init__(self, *args, on_read, **kwargs):
        super().__init__(*args, **kwargs)
        self.on_read = on_read
        self.reads = 0

    def read_events(self, job_id, after=0):
        self.reads += 1
        first = self.reads == 1
        if first:
            self.on_read("before")
        events = list(super().read_events(job_id, after))
        if first:
            self.on_read("after")
        yield from events


def running_job(client: redis.Redis, queue_size: int = 64):
    """A claimed job and a viewer attached to it: (store, hub, job id, attempt, viewer)."""
    store = JobStore(client, retention=60, max_age=600)
    job_id = store.create(REQUEST)
    attempt = store.claim(job_id, "w")
    hub = Hub(client, queue_size=queue_size)
    return store, hub, job_id, attempt, hub.attach(job_id)


def until(condition, timeout: float = 5.0) -> None:
    """Yield to the dispatcher greenlet until ``condition()`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        gevent.sleep(0.005)


def backlog_live_race(url: str) -> list[int]:
    """Events land between subscribing and reading the log, and between the log and live."""
    client = redis.Redis.from_url(url)
    writer = JobStore(client, retention=60, max_age=600)
    job_id = writer.create(REQUEST)
    attempt = writer.claim(job_id, "w")
    for _ in range(3):
        publish(writer, job_id, attempt, ["{}"])

    def on_read(when: str) -> None:
        # "before": in the log AND live (must not repeat). "after": live only (must not be lost).
        # A stale viewer would read everything from the log and never meet the race at all.
        assert not viewer.stale, "the viewer must be on the live path for the race to happen"
        for _ in range(3):
            publish(writer, job_id, attempt, ["{}"])
        if when == "after":
            writer.complete(job_id, attempt, "stop", None)

    store = RacingStore(client, retention=60, max_age=600, on_read=on_read)
    hub = Hub(client, queue_size=64)
    viewer = hub.attach(job_id)
    frames = list(stream_events(store, hub, viewer, 0, keepalive=30, retry_ms=1000))
    assert hub.viewer_count == 0
    assert store.reads == 1, "the events after the first log read came live, deduplicated"
    return ids_of(frames)


def slow_viewer(url: str) -> list[int]:
    """A stalled viewer neither delays another viewer of the same job nor holds more than its
    mailbox; once it reads again it catches up from the log, losing nothing."""
    store, hub, job_id, attempt, slow = running_job(redis.Redis.from_url(url), queue_size=4)
    fast = hub.attach(job_id)
    assert not slow.stale and not fast.stale  # on the live path: overflowing is what is tested
    stalled = stream_events(store, hub, slow, 0, keepalive=30, retry_ms=1000)
    frames = [next(stalled)]  # the opening comment; this viewer now stops reading
    reader = gevent.spawn(
        lambda: list(stream_events(store, hub, fast, 0, keepalive=30, retry_ms=1))
    )
    for _ in range(50):
        publish(store, job_id, attempt, ["{}"])
    store.complete(job_id, attempt, "stop", None)
    reader.join(timeout=5)
    assert reader.successful(), "the reading viewer was held up by the stalled one"
    assert ids_of(reader.value) == list(range(1, 52))
    until(lambda: slow.stale)  # the dispatcher overflowed the stalled mailbox
    assert slow.queue.qsize() <= 4
    frames += list(stalled)
    return ids_of(frames)


def mailbox_overflow(url: str) -> list[int]:
    """A viewer whose mailbox overflows turns stale at once and re-reads the log: it gets every
    id once within about a second, not at the next keep-alive (30 s here) as an overflow that
    only dropped events would."""
    store, hub, job_id, attempt, viewer = running_job(redis.Redis.from_url(url), queue_size=4)
    assert not viewer.stale
    for _ in range(20):
        publish(store, job_id, attempt, ["{}"])
    store.complete(job_id, attempt, "stop", None)
    until(lambda: viewer.stale, timeout=1.0)
    started = time.monotonic()
    frames = list(stream_events(store, hub, viewer, 0, keepalive=30, retry_ms=1000))
    assert time.monotonic() - started < 1.0, "caught up from the log, not at a keep-alive"
    assert not any(b": keep-alive" in frame for frame in frames)
    return ids_of(frames)


def pubsub_reconnect(url: str) -> list[int]:
    """The shared subscription is killed mid-stream; the viewer still gets every event once."""
    client = redis.Redis.from_url(url)
    store, hub, job_id, attempt, viewer = running_job(client)
    frames: list[bytes] = []

    def consume() -> None:
        frames.extend(stream_events(store, hub, viewer, 0, keepalive=30, retry_ms=1000))

    reader = gevent.spawn(consume)
    for i in range(30):
        publish(store, job_id, attempt, ["{}"])
        if i == 10:
            client.client_kill_filter(_type="pubsub")
        gevent.sleep(0.01)
    store.complete(job_id, attempt, "stop", None)
    reader.join(timeout=10)
    assert reader.dead, "the viewer never finished"
    return ids_of(frames)


def late_creator_subscription(url: str) -> list[int]:
    """A creator's subscription that takes effect only after its job was stored (the process's
    pub/sub connection was still being made) while a worker published at once: the job's
    store says so, the stream waits for the subscription and reads the log first, and the
    creator gets every event once."""
    from relay.core.settings import Settings
    from relay.web import fanout
    from relay.web.app import create_app

    app = create_app(Settings(redis_url=url, open_access=True))
    app.extensions["relay"].hub.attach("job_" + "w" * 24)  # the pub/sub connection is made
    worker = JobStore(redis.Redis.from_url(url), retention=60, max_age=600)
    held: list[tuple] = []
    send, create, read_events = fanout._Link._send, JobStore.create, JobStore.read_events
    reads: list[int] = []
    claimed: list[tuple[str, int]] = []

    def holding(link, command, channel) -> None:
        if command == "SSUBSCRIBE" and not claimed:
            held.append((link, command, channel))  # sent once the job is stored, below
        else:
            send(link, command, channel)

    def storing(store, *args, **kwargs) -> str:
        job_id = create(store, *args, **kwargs)
        attempt = worker.claim(job_id, "w")  # a worker was waiting for it
        claimed.append((job_id, attempt))
        publish(worker, job_id, attempt, ['{"n":1}', '{"n":2}'])
        for link, command, channel in held:
            send(link, command, channel)
        return job_id

    def reading(store, job_id, after=0):
        reads.append(after)
        return read_events(store, job_id, after)

    fanout._Link._send, JobStore.create, JobStore.read_events = holding, storing, reading
    body = {**REQUEST, "stream": True}
    with app.test_client() as client:
        response = client.post("/v1/chat/completions", json=body, buffered=False)
        assert response.status_code == 200, response.get_data()
        assert held, "the creator's subscription was held back until the job was stored"
        frames: list[bytes] = []
        reader = gevent.spawn(lambda: frames.extend(response.response))
        until(lambda: reads)  # the log was read (events 1 and 2 are only there)
        job_id, attempt = claimed[0]
        publish(worker, job_id, attempt, ['{"n":3}'])
        worker.complete(job_id, attempt, "stop", None)
        reader.join(timeout=10)
        assert reader.dead, "the stream never finished"
        response.close()
    assert reads[0] == 0
    return ids_of(frames)


def creator_never_subscribed(url: str) -> list[int]:
    """A creator's subscription that never takes effect: the job was stored, so the creator
    gets a 503 and leaves it as a creator that hung up at once would: cancelled, uncounted."""
    from relay.core import keys
    from relay.core.settings import Settings
    from relay.web import fanout
    from relay.web.app import create_app

    app = create_app(Settings(redis_url=url, open_access=True))
    relay = app.extensions["relay"]
    relay._hub = Hub(relay.redis, queue_size=64, subscribe_timeout=0.3)
    relay.hub.attach("job_" + "w" * 24)  # the pub/sub connection is made
    send = fanout._Link._send
    fanout._Link._send = lambda link, command, channel: (  # the SSUBSCRIBE is lost
        None if command == "SSUBSCRIBE" else send(link, command, channel)
    )
    with app.test_client() as client:
        response = client.post("/v1/chat/completions", json={**REQUEST, "stream": True})
    assert response.status_code == 503, response.get_data()
    assert response.get_json()["error"]["type"]
    (job_key,) = list(relay.redis.scan_iter("relay:{job_*}:job"))
    job_id = job_key.decode().split("{")[1].split("}")[0]
    status = relay.store.status(job_id)
    assert status["status"] == "cancelled", status
    assert relay.redis.get(keys.viewers(job_id)) == b"0"
    assert relay.hub.viewer_count == 1 and not relay.open_streams  # the connection's own
    return []


if __name__ == "__main__":
    redis_url, scenario = sys.argv[1], sys.argv[2]
    print(json.dumps(globals()[scenario](redis_url)))
