"""A pub/sub connection read in bulk: every message already received, per wake-up.

redis-py's ``PubSub.get_message`` parses one message per call through its retry, health-check
and push-notification layers, which a busy process cannot afford (tests/bench/RESULTS.md, "Why
the hot paths look as they do"). This reads its own connection
(:class:`~relay.core.connections.RawConnection`), as many replies as one ``recv`` brought.
"""

from __future__ import annotations

import time
from typing import Any

import hiredis
from redis import Redis
from redis.exceptions import ResponseError

from relay.core.connections import HEALTH_CHECK_SECONDS, RawConnection


class Subscription:
    """One dedicated connection for sharded pub/sub: commands go out packed, replies come back as
    hiredis lists such as ``[b"smessage", channel, data]`` or ``[b"ssubscribe", channel, n]``."""

    def __init__(self, redis: Redis, health_check_interval: float = HEALTH_CHECK_SECONDS) -> None:
        self._conn = RawConnection(redis)
        self._health_check_interval = health_check_interval
        self._last_heard = time.monotonic()

    def send(self, command: str, *channels: bytes) -> None:
        """One ``SSUBSCRIBE``/``SUNSUBSCRIBE`` (a cluster takes channels of one slot at once)."""
        self._conn.send([(command, *channels)])

    def send_each(self, command: str, channels: list[bytes]) -> None:
        """``command`` for each channel, in one write."""
        self._conn.send([(command, channel) for channel in channels])

    def ping(self) -> None:
        self._conn.send([("PING",)])

    def read(self, timeout: float) -> list[Any]:
        """Every reply received so far, waiting up to ``timeout`` s for the first; [] if none.

        An error reply (``MOVED`` when a channel's slot is served elsewhere) comes back as a
        ``ResponseError`` value. Raises ``redis.ConnectionError`` when the connection is lost.
        """
        replies = self._parsed()
        if replies:
            return replies
        if not self._conn.receive(timeout):
            self._check_health()
            return []
        self._last_heard = time.monotonic()
        return self._parsed()

    def _parsed(self) -> list[Any]:
        return [
            ResponseError(str(reply)) if isinstance(reply, hiredis.ReplyError) else reply
            for reply in self._conn.parsed()
        ]

    def _check_health(self) -> None:
        """PING after a quiet spell, so that a dead connection shows up as a failed send."""
        if time.monotonic() - self._last_heard >= self._health_check_interval:
            self._last_heard = time.monotonic()
            self.ping()

    def close(self) -> None:
        self._conn.close()
