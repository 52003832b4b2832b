"""Redis clients, made once per process after fork (never at import time)."""

from __future__ import annotations

from redis import BlockingConnectionPool, Redis


def as_text(value: bytes | str | None) -> str:
    """A Redis reply as text (the clients here do not decode responses)."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def connect(url: str, max_connections: int = 50, socket_timeout: float = 10.0) -> Redis:
    """A client whose pool makes greenlets wait for a free connection instead of failing.

    redis-py's default pool raises ``MaxConnectionsError`` past its limit; under gevent a burst of
    greenlets is normal, so they queue for up to ``timeout`` seconds instead. ``socket_timeout``
    must exceed every blocking command's own timeout (``BLMOVE`` waits at most a second here).
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)
