"""A Redis connection of its own, written and read in bulk: redis-py opens it, hiredis the rest.

redis-py's per-command path (pool checkout with a ``poll`` for stale data, retry wrapper,
packing, one parse per reply through several layers) is what hot loops paid for: a quarter of
a relay process's time reading pub/sub messages one ``get_message`` at a time, a third of a
worker's time sending its publishes as pipelines. Here redis-py still opens the connection
(password, database, TLS, client name, all from the same URL); commands are packed by
``hiredis.pack_command`` and sent in one write, and replies are parsed by hiredis straight from
the socket, as many as one ``recv`` brought.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

import hiredis
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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
        self.timeout = float(kwargs.get("socket_timeout") or 10.0)  # the client's own setting

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
