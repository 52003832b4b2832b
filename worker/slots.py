"""A cap on the streams each upstream carries at once, across every worker process.

A local model server with 4 slots must never get a fifth stream: a job takes one of its
upstream's slots before it sends the request and gives it back when its stream ends. Slots
live in Redis (one sorted set per upstream, changed only by a script) with a lease that the
holding worker renews with its heartbeat, so a worker that dies frees its slots within a lease.
"""

from __future__ import annotations

import logging

import gevent
from redis.exceptions import RedisError

from relay.core import keys
from relay.core.backoff import Backoff
from relay.core.connections import Client
from relay.core.routes import Upstream
from relay.core.scripts import ACQUIRE_SLOT

logger = logging.getLogger(__name__)


# KEYS: the upstream's set. ARGV: lease (ms), job ids. Pushes the held slots' leases forward.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
"""


class UpstreamSlots:
    """The slots this worker holds, and the scripts that take and renew them."""

    def __init__(self, redis: Client, lease_seconds: float) -> None:
        self.redis = redis
        self.lease_ms = int(lease_seconds * 1000)
        self._take = redis.register_script(ACQUIRE_SLOT)
        self._renew = redis.register_script(_RENEW)
        self.held: dict[str, set[str]] = {}  # upstream name -> job ids

    def take(self, upstream: Upstream, job_id: str, wait: bool) -> bool:
        """Take a slot of ``upstream`` for the job; with ``wait``, until one is free."""
        backoff = Backoff(first=0.02, cap=0.25)  # a freed slot is taken within a quarter second
        while True:
            args: list[str | int] = [upstream.max_streams, job_id, self.lease_ms]
            if self._take(keys=[keys.upstream_streams(upstream.name)], args=args):
                self.held.setdefault(upstream.name, set()).add(job_id)
                return True
            if not wait:
                return False
            gevent.sleep(backoff.next())

    def give_back(self, upstream: Upstream, job_id: str) -> None:
        self.held.get(upstream.name, set()).discard(job_id)
        try:
            self.redis.zrem(keys.upstream_streams(upstream.name), job_id)
        except RedisError as exc:  # its lease ends it
            logger.warning("could not free %s's slot of %s: %s", job_id, upstream.name, exc)

    def renew(self) -> None:
        """Keep this worker's slots (called with its heartbeat)."""
        for name, jobs in list(self.held.items()):
            if jobs:
                key = keys.upstream_streams(name)
                self._renew(keys=[key], args=[self.lease_ms, *sorted(jobs)])
