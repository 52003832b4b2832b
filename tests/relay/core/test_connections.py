"""relay.core.connections against a real redis-server: raw batches, error replies as values,
lost links, and the pool's check of a connection before use."""

from __future__ import annotations

import select

import pytest
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.retry import Retry

from relay.core.connections import Pool, RawConnection, _Packer, connect
from relay.core.jobs import JobStore

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

REQUEST = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_batch_gets_every_reply_in_order_with_errors_as_values(redis_url: str) -> None:
    conn = RawConnection(connect(redis_url))
    try:
        replies = conn.execute([
            ("SET", "k", "v"), ("INCR", "n"), ("EVALSHA", "0" * 40, 0), ("INCR", "k"),
            ("GET", "k"), ("INCRBY", "n", 41),
        ])  # fmt: skip
        assert replies[:2] == [b"OK", 1] and replies[4:] == [b"v", 42]
        assert isinstance(replies[2], NoScriptError)
        assert isinstance(replies[3], ResponseError) and "not an integer" in str(replies[3])
        big = conn.execute([("INCR", "n")] * 5000)  # more replies than one read brings
        assert big == list(range(43, 5043))
    finally:
        conn.close()


def test_a_lost_connection_is_a_redis_connection_error(redis_url: str) -> None:
    client = connect(redis_url)
    conn = RawConnection(client)
    conn.execute([("CLIENT", "SETNAME", "doomed")])
    client.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises(RedisConnectionError):
        conn.execute([("PING",)])


def test_publish_many_through_it(redis_url: str) -> None:
    """Including the script cache lost (SCRIPT FLUSH, as after a restart): loaded again."""
    client = connect(redis_url)
    store = JobStore(client, retention=60, max_age=600)
    conn = RawConnection(client)
    try:
        jobs = [store.create(REQUEST) for _ in range(3)]
        attempts = [store.claim(job_id, "w") for job_id in jobs]
        batch = [(j, a, ['{"n":1}'], "x") for j, a in zip(jobs, attempts, strict=True)]
        assert store.publish_many(batch, conn.execute) == [1, 1, 1]
        client.script_flush()
        assert store.publish_many(batch, conn.execute) == [2, 2, 2]
        assert [store.status(j)["text"] for j in jobs] == ["xx"] * 3
    finally:
        conn.close()


def one_connection_no_retries(redis_url: str) -> Redis:
    """A client of one pooled connection that never retries: what the pool's check catches
    is all that keeps a command from failing."""
    return Redis(connection_pool=Pool.from_url(redis_url, max_connections=1, timeout=5,
                                               retry=Retry(NoBackoff(), 0)))  # fmt: skip


def test_a_pooled_connection_the_server_closed_is_made_anew_before_use(redis_url: str) -> None:
    client = one_connection_no_retries(redis_url)
    assert client.client_setname("pooled") and client.ping()
    connect(redis_url).client_kill_filter(_type="normal", skipme=True)  # every other client
    assert client.ping()  # no ConnectionError: the check found it closed and reconnected
    assert client.client_getname() == b"pooled" or client.client_getname() is None


def test_a_pooled_connection_with_a_reply_nobody_read_is_made_anew(redis_url: str) -> None:
    client = one_connection_no_retries(redis_url)
    conn = client.connection_pool.get_connection()
    conn.send_command("ECHO", "stale")  # its reply is never read
    assert select.select([conn._sock], [], [], 5)[0], "the reply arrived"
    client.connection_pool.release(conn)
    assert client.echo("fresh") == b"fresh"


@pytest.mark.parametrize(
    "args",
    [("SET", "k", "v"), ("HSET", "h", "f", 1.5, "g", 0.1 + 0.2, "n", -12345678901234567890),
     ("SET", "é", b"\xff\x00"), ("CLIENT SETNAME", "two words"), ("SET", "k", memoryview(b"v"))],
    ids=["text", "numbers", "bytes", "two-word-name", "memoryview"],
)  # fmt: skip
def test_the_pools_commands_are_packed_as_redis_py_packs_them(redis_url: str, args) -> None:
    ours = connect(redis_url).connection_pool.make_connection()
    theirs = Redis.from_url(redis_url).connection_pool.make_connection()
    assert isinstance(ours._command_packer, _Packer)  # hiredis in one call, not redis-py's
    assert b"".join(ours.pack_command(*args)) == b"".join(
        bytes(part) for part in theirs.pack_command(*args)
    )


def test_what_redis_py_refuses_to_pack_is_still_refused(redis_url: str) -> None:
    with pytest.raises(DataError):
        connect(redis_url).set("k", None)  # type: ignore[arg-type]
