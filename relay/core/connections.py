"""Redis connections, made once per process after fork (never at import time).

:func:`connect` makes a process's pooled client: of one Redis, or of a Redis Cluster
(``RELAY_REDIS_CLUSTER``), which routes each command to the node that owns its keys' slot.
:class:`Router` says which node that is, for what reaches nodes directly.

:class:`RawConnection` is a connection of its own for the hot loops (the worker's publishes, a
web process's pub/sub reader): redis-py opens it (password, database, TLS, client name, all
from the same URL); commands are packed by ``hiredis.pack_command`` and sent in one write, and
replies are parsed by hiredis straight from the socket, as many as one ``recv`` brought.
redis-py's per-command path (pool checkout, retry wrapper, one parse per reply through several
layers) is what those loops could not afford (RESULTS.md). Every other command goes through
:class:`Pool`, whose check of a pooled connection costs a syscall rather than a gevent poll.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from typing import Any

import hiredis
from redis import BlockingConnectionPool, Redis
from redis.cluster import RedisCluster
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError


def as_text(value: bytes | str | None) -> str:
    """A Redis reply as text (the clients here do not decode responses)."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


# A blocking command's own timeout must stay under this (``BLMOVE`` waits at most a second).
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0  # seconds to open a connection: Redis is near, or it is down
HEALTH_CHECK_SECONDS = 30  # a connection idle this long is checked (PING) before it is used
POOL_SIZE = 50  # for tools and tests; the relay's processes size theirs by a setting


Client = Redis | RedisCluster
"""What the relay talks to: one Redis, or a cluster of them (the same commands)."""


class Pool(BlockingConnectionPool):
    """redis-py's blocking pool, with two costs of every command cut.

    - The check of a pooled connection before use is one non-blocking peek at its socket.
      redis-py asks whether it has anything to read (a reply nobody read, or the server's
      close) through ``select.poll``, which under gevent builds watchers and switches
      greenlets: 44 us of a PING's 135 us here. A connection found with data or closed is made
      anew, as redis-py does. TLS sockets cannot peek: they keep redis-py's own check.
    - Commands are packed by hiredis in one call (:class:`_Packer`).
    """

    def make_connection(self) -> Any:
        connection = super().make_connection()
        packer = getattr(connection, "_command_packer", None)
        if isinstance(packer, HiredisRespSerializer):
            connection._command_packer = _Packer(packer)
        return connection

    def ensure_connection(self, connection: Any) -> None:
        connection.connect()
        sock = getattr(connection, "_sock", None)
        if sock is None or isinstance(sock, ssl.SSLSocket):
            super().ensure_connection(connection)
            return
        raw = getattr(sock, "_sock", sock)  # gevent's socket wraps the real one
        if readable(raw) or getattr(connection._parser, "_next_response", False) is not False:
            connection.disconnect()
            connection.connect()


class _Packer:
    """redis-py's hiredis packer without its encoding of every argument in Python first:
    hiredis turns str, int, float and bytes into the same bytes itself (3 us against 32 us for
    a job's 48-argument ``CREATE``). What it refuses (a memoryview; ``None``, which redis-py
    answers with its ``DataError``) and a command name of two words go through redis-py's."""

    __slots__ = ("_redis_py",)

    def __init__(self, redis_py: HiredisRespSerializer) -> None:
        self._redis_py = redis_py

    def pack(self, *args: Any) -> list[bytes]:
        name = args[0]
        if (" " in name) if isinstance(name, str) else (b" " in name):
            return self._redis_py.pack(*args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            return self._redis_py.pack(*args)


def readable(sock: socket.socket) -> bool:
    """Whether a socket has bytes waiting or was closed by its peer (without reading them): an
    idle connection that is not fit for another request (a pooled Redis connection here, a
    kept upstream connection in ``worker.http1``).

    Python waits for a socket with a timeout before its ``recv``, flags or not: the peek is made
    with none (gevent's own sockets underneath have none already)."""
    timeout = sock.gettimeout()
    try:
        if timeout != 0.0:
            sock.settimeout(0.0)
        sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    finally:
        if timeout != 0.0:
            sock.settimeout(timeout)
    return True


def connect(
    url: str,
    max_connections: int = POOL_SIZE,
    socket_timeout: float = SOCKET_TIMEOUT,
    cluster: bool = False,
) -> Client:
    """A client whose pools make greenlets wait for a free connection instead of failing.

    redis-py's default pool raises ``MaxConnectionsError`` past its limit; under gevent a burst of
    greenlets is normal, so they queue for up to ``timeout`` seconds instead. ``socket_timeout``
    must exceed every blocking command's own timeout (``BLMOVE`` waits at most a second here).
    With ``cluster``, ``url`` names any one node (a seed) and each node gets such a pool.
    """
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": socket_timeout,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "health_check_interval": HEALTH_CHECK_SECONDS,
    }
    if cluster:
        return RedisCluster.from_url(url, connection_pool_class=Pool, **options)
    return Redis(connection_pool=Pool.from_url(url, **options))


MIN_REDIS_VERSION = (7, 0)  # SPUBLISH / SSUBSCRIBE: job events go out by sharded pub/sub


def oldest_version(client: Client) -> tuple[int, ...]:
    """The lowest ``redis_version`` of the server, or of every node of a cluster."""
    if isinstance(client, RedisCluster):
        infos = list(client.info("server", target_nodes=RedisCluster.ALL_NODES).values())
    else:
        infos = [client.info("server")]
    return min(tuple(int(p) for p in str(i["redis_version"]).split(".")[:2]) for i in infos)


def script_in(client: Client, pipe: Any, script: Any, keys: list[str], args: list[Any]) -> Any:
    """Run ``script`` with a pipeline's commands: queued in ``pipe`` (its result comes with the
    pipeline's; returns None), or, on a cluster, whose pipelines refuse scripts, at once (returns
    its result).

    Queued as ``EVAL`` with the script's text: a pipeline's ``EVALSHA`` makes redis-py ask
    ``SCRIPT EXISTS`` for every script first, a round trip per request on the first token's path
    (the text is a few hundred bytes; Redis caches the compiled script by its hash).
    """
    if isinstance(client, RedisCluster):
        return script(keys=keys, args=args)
    pipe.eval(script.script, len(keys), *keys, *args)
    return None


class Router:
    """Which Redis a key lives on: the one Redis, or the cluster node that owns its slot.

    Used where the relay talks to nodes itself (the pub/sub reader, the publisher's
    connections); everything else goes through the client, which routes on its own.
    """

    def __init__(self, client: Client) -> None:
        self.client = client

    @property
    def cluster(self) -> bool:
        return isinstance(self.client, RedisCluster)

    def node(self, key: str | bytes) -> str:
        """The name of the node that serves ``key`` ("" for one Redis)."""
        if not isinstance(self.client, RedisCluster):
            return ""
        return str(self.client.get_node_from_key(key).name)

    def node_client(self, name: str) -> Redis:
        """A client of the node ``name`` (from :meth:`node`)."""
        if not isinstance(self.client, RedisCluster):
            return self.client
        node = self.client.get_node(node_name=name)
        if node is None:
            raise RedisConnectionError(f"no such cluster node: {name}")
        return self.client.get_redis_connection(node)

    def refresh(self) -> None:
        """Learn the slots' owners again (after a MOVED reply, a failover, a lost node)."""
        if isinstance(self.client, RedisCluster):
            self.client.nodes_manager.initialize()


_READ_SIZE = 256 * 1024


def reply_error(message: str) -> ResponseError:
    """The redis-py exception for an error reply (``NOSCRIPT`` gets its own class)."""
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class RawConnection:
    """One dedicated connection, outside the client's pool."""

    def __init__(self, redis: Redis) -> None:
        pool = redis.connection_pool
        # Outside the pool: redis-py's health check would read a PONG off this socket behind
        # the reader's back, so the owner does its own.
        kwargs = {**pool.connection_kwargs, "health_check_interval": 0}
        self._conn = pool.connection_class(**kwargs)
        self._conn.connect()
        self.sock: socket.socket = self._conn._sock  # type: ignore[attr-defined]
        self._reader = hiredis.Reader()
        self.timeout = float(kwargs.get("socket_timeout") or SOCKET_TIMEOUT)  # the client's own

    def send(self, commands: Iterable[tuple[Any, ...]]) -> None:
        """Write the commands in one go; raises redis.ConnectionError (the socket is then
        closed, which also ends a reader's wait)."""
        packed = [b"".join(hiredis.pack_command(command) for command in commands)]
        self._conn.send_packed_command(packed, check_health=False)

    def parsed(self) -> list[Any]:
        """The replies already received; an error reply is a ``hiredis.ReplyError`` value."""
        replies = []
        reader = self._reader
        while (reply := reader.gets()) is not False:
            replies.append(reply)
        return replies

    def receive(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` s for more bytes and take them in; False if none came.

        Raises ``redis.ConnectionError`` when the connection is lost or closed.
        """
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(_READ_SIZE)
        except TimeoutError:
            return False
        except OSError as exc:
            raise RedisConnectionError(f"connection lost: {exc}") from exc
        if not data:
            raise RedisConnectionError("connection closed by the server")
        self._reader.feed(data)
        return True

    def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send the commands and wait for all their replies (errors as exception values).

        Raises ``redis.ConnectionError`` or ``redis.TimeoutError`` (after :attr:`timeout` s
        of silence); the connection should then be closed, replies may still be on their way.
        """
        timeout = self.timeout
        self.send(commands)
        replies: list[Any] = []
        while True:
            for reply in self.parsed():
                replies.append(reply_error(str(reply)) if isinstance(reply, hiredis.ReplyError)
                               else reply)  # fmt: skip
            if len(replies) >= len(commands):
                return replies
            if not self.receive(timeout):
                raise RedisTimeoutError(f"no reply from Redis within {timeout:g}s")

    def close(self) -> None:
        self._conn.disconnect()
