"""The process's pub/sub connection, read in bulk: every message already received, per wake-up.

redis-py's ``PubSub.get_message`` parses one message per call through its retry, health-check
and push-notification layers (and a ``logging.getLogger`` per message): profiling a relay
process at 10,000 messages/s put a quarter of its time there. Here redis-py still opens the
connection (password, database, TLS, client name, all from the same URL) and packs commands;
the replies are parsed by hiredis straight from the socket, as many as one ``recv`` brought.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import hiredis
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

_READ_SIZE = 256 * 1024


class Subscription:
    """One dedicated pub/sub connection: commands go out through redis-py, replies come back
    as hiredis lists such as ``[b"message", channel, data]`` or ``[b"subscribe", channel, n]``."""

    def __init__(self, redis: Redis, health_check_interval: float = 30.0) -> None:
        pool = redis.connection_pool
        # Our own connection, outside the pool: redis-py's health check would read a PONG off
        # this socket behind the reader's back, so this class does its own.
        kwargs = {**pool.connection_kwargs, "health_check_interval": 0}
        self._conn = pool.connection_class(**kwargs)
        self._conn.connect()
        self._sock: socket.socket = self._conn._sock  # type: ignore[attr-defined]
        self._reader = hiredis.Reader()
        self._health_check_interval = health_check_interval
        self._last_heard = time.monotonic()

    def subscribe(self, *channels: bytes) -> None:
        self._command("SUBSCRIBE", *channels)

    def unsubscribe(self, *channels: bytes) -> None:
        self._command("UNSUBSCRIBE", *channels)

    def ping(self) -> None:
        self._command("PING")

    def _command(self, *args: Any) -> None:
        # Raises redis.ConnectionError (and closes the socket, which ends the reader's wait).
        self._conn.send_command(*args, check_health=False)

    def read(self, timeout: float) -> list[Any]:
        """Every reply received so far, waiting up to ``timeout`` s for the first; [] if none.

        Raises ``redis.ConnectionError`` when the connection is lost; an error reply (which a
        healthy subscription never gets) raises ``ResponseError``.
        """
        replies = self._parsed()
        if replies:
            return replies
        self._sock.settimeout(timeout)
        try:
            data = self._sock.recv(_READ_SIZE)
        except TimeoutError:
            self._check_health()
            return []
        except OSError as exc:
            raise RedisConnectionError(f"pub/sub connection lost: {exc}") from exc
        if not data:
            raise RedisConnectionError("pub/sub connection closed by the server")
        self._last_heard = time.monotonic()
        self._reader.feed(data)
        return self._parsed()

    def _parsed(self) -> list[Any]:
        replies = []
        reader = self._reader
        while (reply := reader.gets()) is not False:
            if isinstance(reply, Exception):
                raise ResponseError(str(reply))
            replies.append(reply)
        return replies

    def _check_health(self) -> None:
        """PING after a quiet spell, so that a dead connection shows up as a failed send."""
        if time.monotonic() - self._last_heard >= self._health_check_interval:
            self._last_heard = time.monotonic()
            self.ping()

    def close(self) -> None:
        self._conn.disconnect()
