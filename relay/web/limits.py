"""Throttling shared by every web process: requests per minute and concurrent jobs per caller,
and a cap on the queue.

Counts live in Redis and change only inside scripts, so two gunicorn processes (or hosts) can
never both admit the last request of a window. Time comes from Redis (``TIME``), not from the
web hosts, whose clocks may disagree.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

from relay.core import keys
from relay.core.connections import Client
from relay.core.scripts import ACQUIRE_SLOT

# A sliding log: one member per admitted request in the last window. KEYS: the caller's log.
# ARGV: limit, window (ms), a unique member. Returns 0 if admitted, else milliseconds until the
# oldest request leaves the window (when one more would be admitted).
_RATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""

# The caller's unfinished jobs hold slots (relay.core.scripts.ACQUIRE_SLOT) whose lease is the
# job's maximum age: a job that expires unfinished must not hold a slot for ever.

# A failed credential check (a wrong key, token, secret or message id). KEYS: the caller's
# failure log, its blocked flag. ARGV: limit, window (ms), a unique member. Past the limit in
# the window, the caller is blocked for a window.
_FAILURE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], 1, 'PX', window)
end
return 0
"""

WINDOW_SECONDS = 60


def blocked_seconds(pttl: int) -> int:
    """Whole seconds left of a blocked flag's ``PTTL`` reply; 0 if it is not set."""
    wait_ms = int(pttl)  # -2: no flag; -1: a flag without expiry, which the script never sets
    return math.ceil(wait_ms / 1000) if wait_ms > 0 else 0


class Throttle:
    """The limit scripts registered on one client."""

    def __init__(self, redis: Client) -> None:
        self.redis = redis
        self._rate = redis.register_script(_RATE)
        self._acquire = redis.register_script(ACQUIRE_SLOT)
        self._failure = redis.register_script(_FAILURE)

    def hit(self, caller: str, per_minute: int) -> tuple[int, str]:
        """Count one request: (0 if admitted, else whole seconds to wait (``Retry-After``); the
        count's id, for :meth:`refund`)."""
        if per_minute <= 0:
            return 0, ""
        member = secrets.token_hex(8)
        wait_ms = int(
            self._rate(keys=[keys.rate(caller)], args=[per_minute, WINDOW_SECONDS * 1000, member])
        )
        return (math.ceil(wait_ms / 1000) if wait_ms else 0), member

    def refund(self, caller: str, member: str) -> None:
        """Take back a counted request that was refused after all (it created nothing)."""
        if member:
            self.redis.zrem(keys.rate(caller), member)

    def acquire(self, caller: str, job_id: str, limit: int, lease_seconds: int) -> bool:
        """Take one of the caller's ``limit`` job slots for ``job_id``, if one is free."""
        if limit <= 0:
            return True
        args: list[str | int] = [limit, job_id, lease_seconds * 1000]
        return bool(self._acquire(keys=[keys.active(caller)], args=args))

    def failed(self, caller: str, per_minute: int) -> None:
        """Count a failed credential check; ``per_minute`` of them block the caller."""
        args: list[str | int] = [per_minute, WINDOW_SECONDS * 1000, secrets.token_hex(8)]
        self._failure(keys=[keys.failures(caller), keys.blocked(caller)], args=args)

    def blocked(self, caller: str) -> int:
        """Whole seconds the caller stays blocked for failed checks; 0 if it is not."""
        return blocked_seconds(self.redis.pttl(keys.blocked(caller)))

    def read_blocked(self, pipe: Any, caller: str) -> None:
        """Queue :meth:`blocked`'s read on ``pipe``; its reply goes to :func:`blocked_seconds`."""
        pipe.pttl(keys.blocked(caller))

    def release(self, caller: str, job_id: str) -> None:
        self.redis.zrem(keys.active(caller), job_id)
