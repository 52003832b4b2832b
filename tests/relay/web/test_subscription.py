"""relay.web.subscription against a real redis-server: sharded pub/sub read in bulk, health
pings, error replies as values, a lost connection."""

from __future__ import annotations

import time

import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from relay.core.connections import connect
from relay.web.subscription import Subscription


def read_until(sub: Subscription, count: int, timeout: float = 5.0) -> list:
    """Replies until ``count`` have arrived (bounded in time)."""
    replies: list = []
    deadline = time.monotonic() + timeout
    while len(replies) < count and time.monotonic() < deadline:
        replies += sub.read(timeout=0.5)
    return replies


def test_messages_published_together_come_back_in_order_from_few_reads(redis_url: str) -> None:
    client = connect(redis_url)
    sub = Subscription(client)
    try:
        sub.send_each("SSUBSCRIBE", [b"a", b"b"])
        assert read_until(sub, 2) == [[b"ssubscribe", b"a", 1], [b"ssubscribe", b"b", 2]]
        pipe = client.pipeline(transaction=False)
        for i in range(500):
            pipe.spublish("a" if i % 2 else "b", str(i))
        pipe.execute()
        reads, got = 0, []
        while len(got) < 500 and reads < 500:
            got += sub.read(timeout=2.0)
            reads += 1
        assert [int(m[2]) for m in got] == list(range(500))
        assert {m[0] for m in got} == {b"smessage"}
        assert reads < 50, "replies should arrive many per read, not one per read"
        sub.send("SUNSUBSCRIBE", b"a")
        assert read_until(sub, 1) == [[b"sunsubscribe", b"a", 1]]
        sub.send("SSUBSCRIBE")  # no channel: an error reply, which comes back as a value
        (error,) = read_until(sub, 1)
        assert isinstance(error, redis.ResponseError)
    finally:
        sub.close()


def test_nothing_to_read_returns_empty_after_the_timeout(redis_url: str) -> None:
    sub = Subscription(connect(redis_url))
    try:
        started = time.monotonic()
        assert sub.read(timeout=0.2) == []
        assert 0.15 < time.monotonic() - started < 2.0
    finally:
        sub.close()


def test_a_quiet_connection_is_pinged(redis_url: str) -> None:
    sub = Subscription(connect(redis_url), health_check_interval=0.1)
    try:
        sub.send("SSUBSCRIBE", b"quiet")
        assert read_until(sub, 1) == [[b"ssubscribe", b"quiet", 1]]
        time.sleep(0.15)  # the interval must pass with nothing heard (a clock, not a sync)
        assert sub.read(timeout=0.05) == []  # quiet: this read sends the PING
        # RESP2 answers a subscribed PING with [b"pong", b""]; some servers with b"PONG".
        assert read_until(sub, 1) in ([[b"pong", b""]], [b"PONG"])
    finally:
        sub.close()


def test_a_killed_connection_raises_connection_error(redis_url: str) -> None:
    client = connect(redis_url)
    sub = Subscription(client)
    try:
        client.client_setname("probe")
        sub.send("SSUBSCRIBE", b"doomed")
        read_until(sub, 1)
        killed = client.client_kill_filter(_type="pubsub")
        assert killed >= 1
        with pytest.raises(RedisConnectionError):
            for _ in range(20):
                sub.read(timeout=0.5)
    finally:
        sub.close()


def test_the_url_database_and_password_apply(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.config_set("requirepass", "s3cret")
    try:
        url = redis_url.replace("redis://", "redis://:s3cret@")
        sub = Subscription(connect(url))
        try:
            sub.send("SSUBSCRIBE", b"authed")
            assert read_until(sub, 1) == [[b"ssubscribe", b"authed", 1]]
        finally:
            sub.close()
        with pytest.raises(redis.AuthenticationError):
            Subscription(connect(redis_url))
    finally:
        redis.Redis.from_url(redis_url.replace("redis://", "redis://:s3cret@")).config_set(
            "requirepass", ""
        )
