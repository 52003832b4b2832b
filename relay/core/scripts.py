"""Lua scripts that change a job atomically, so that every viewer sees one sequence.

Appending an event, bumping the job's event count and publishing it happen in one step: the
replay log and the live channel can never disagree about an event's id. Every script that
writes events first checks the job's ``status`` and fencing ``attempt``, which makes the
terminal events idempotent (two janitors, or a janitor and a late worker, cannot both write a
``[DONE]``) and silences a worker whose claim was taken from it.

Keys are passed in the order of :func:`relay.keys.job_keys`: job, events, text, live.
"""

from __future__ import annotations

from relay.core.connections import Client
from relay.core.status import TERMINAL

# Shared by every script that writes events: append to the log, publish "<id> <data>".
_APPEND = (
    """
local function append_events(job, log, live, first, last_index)
  local n = 0
  for i = first, last_index do
    n = redis.call('RPUSH', log, ARGV[i])
    redis.call('SPUBLISH', live, n .. ' ' .. ARGV[i])
  end
  if n > 0 then redis.call('HSET', job, 'seq', n) end
  return n
end

-- A job's end, with KEYS: job, events, text, live, viewers: its keys expire after the
-- retention, the viewer counter too (nothing of the job outlives its retention).
local function ended(ttl)
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
  if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('EXPIRE', KEYS[5], ttl) end
end

local function is_terminal(status)
  return """
    + " or ".join(f"status == '{status}'" for status in TERMINAL)
    + """
end
"""
)

# KEYS: job, events, text, live. ARGV: attempt, ttl, text delta, event data...
# Returns the id of the last event written, or 0 when the caller no longer owns the job.
PUBLISH = (
    _APPEND
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if st[1] ~= 'running' or st[2] ~= ARGV[1] then return 0 end
local first_write = redis.call('EXISTS', KEYS[2]) == 0
if ARGV[3] ~= '' then redis.call('APPEND', KEYS[3], ARGV[3]) end
local n = append_events(KEYS[1], KEYS[2], KEYS[4], 4, #ARGV)
if first_write then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
return n
"""
)

# KEYS: job, events, text, live, viewers (relay.core.keys.end_keys). ARGV: attempt ('' = any
# running attempt), status, retention, number of events k, k event data, then field/value
# pairs for the job hash.
# Returns 1 if this call ended the job, 0 if it had already ended or was taken over.
FINISH = (
    _APPEND
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if st[1] == false or is_terminal(st[1]) then return 0 end
if ARGV[1] ~= '' and st[2] ~= ARGV[1] then return 0 end
local k = tonumber(ARGV[4])
append_events(KEYS[1], KEYS[2], KEYS[4], 5, 4 + k)
redis.call('HSET', KEYS[1], 'status', ARGV[2])
for i = 5 + k, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
ended(ARGV[3])
return 1
"""
)

# KEYS: job, text, viewers, and optionally the job's live channel. ARGV: max age, viewers
# already watching (a creator's own stream, subscribed first), then field/value pairs of the job
# hash. Returns 2 if the live channel had a subscriber as the job was stored (a creator's stream
# whose subscription took effect first: it can miss nothing, as the job's id was known to nobody
# else), else 1. Written by a script rather than HSET because Redis keeps a large HSET value
# (over 32 kB) in the buffer it was read into, up to twice its size; a value made inside a
# script is allocated at its exact size.
CREATE = """
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '', 'EX', ARGV[1])
if ARGV[2] ~= '0' then redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[1]) end
if KEYS[4] and redis.call('PUBSUB', 'SHARDNUMSUB', KEYS[4])[2] > 0 then return 2 end
return 1
"""

# KEYS: job, viewers. ARGV: change. The viewer count after it; the counter expires with the job
# (a counter of its own lifetime outlived short retentions by a day).
VIEWERS = """
local n = redis.call('INCRBY', KEYS[2], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) else redis.call('DEL', KEYS[2]) end
return n
"""

# KEYS: job. ARGV: worker id, now. Returns {the new attempt number, then the job's request,
# conversation turn, created_at and the caller whose concurrency slot it holds} (what the worker
# runs and ends it with, in the same round trip), or {0} if the job is gone or no longer queued
# (expired, or already ended).
CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return {0} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2])
local job = redis.call('HMGET', KEYS[1], 'request', 'conversation', 'created_at', 'limited_as')
return {attempt, job[1], job[2], job[3], job[4]}
"""

# Recovering a job claimed by a dead or stopping worker takes two steps, each in one slot:
# RECOVER (the job's slot) decides and acts on the job, then RELEASE_CLAIM (the queue's slot)
# takes it off the worker's claimed list and, if it was re-queued, puts it back on the queue.
# After a crash between the two, the next try finds the job already handled by RECOVER and
# finishes with RELEASE_CLAIM. The job's ``worker`` field fences both: once another worker has
# claimed the job, a late recovery for the old one changes nothing.
#
# RECOVER. KEYS: job, events, text, live, viewers. ARGV: the claimed-by worker id, retention,
# error event, done event, finished_at, error object JSON. Returns 0 (claimed by another worker
# since: nothing to do), 1 (it had ended), 2 (re-queue it: nothing had been published, so it can
# run again from the start), 3 (failed now, with an error event and [DONE]).
RECOVER = (
    _APPEND
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'seq', 'worker')
if st[1] == false then return 1 end
if st[3] ~= ARGV[1] then return 0 end
if is_terminal(st[1]) then return 1 end
if st[1] == 'queued' then return 2 end
-- Bumping the attempt fences the old worker off in case it was only paused, not dead.
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
if tonumber(st[2] or '0') == 0 then
  redis.call('HSET', KEYS[1], 'status', 'queued')
  redis.call('HDEL', KEYS[1], 'started_at')
  return 2
end
append_events(KEYS[1], KEYS[2], KEYS[4], 3, 4)
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[5], 'error', ARGV[6])
ended(ARGV[2])
return 3
"""
)

# RELEASE_CLAIM. KEYS: the worker's claimed list, the pending list. ARGV: the job's queue entry
# (relay.core.queue), "1" to put it back on the queue. Returns 1 if this call took the claim, 0
# if another recovery had.
RELEASE_CLAIM = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if ARGV[2] == '1' then redis.call('RPUSH', KEYS[2], ARGV[1]) end
return 1
"""


# A capped set of slots held under a lease: a caller's concurrent jobs (relay.web.limits), an
# upstream's streams (worker.slots). KEYS: the set. ARGV: cap, holder (a job id), lease (ms).
# Each member is scored by when its slot lapses unless renewed. Returns 1 if the holder has a
# slot now (it may already have had it), 0 at the cap.
ACQUIRE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


class Scripts:
    """The scripts registered on one client (``EVALSHA`` with a transparent ``EVAL`` fallback)."""

    def __init__(self, redis: Client) -> None:
        self.create = redis.register_script(CREATE)
        self.publish = redis.register_script(PUBLISH)
        self.finish = redis.register_script(FINISH)
        self.claim = redis.register_script(CLAIM)
        self.viewers = redis.register_script(VIEWERS)
        self.recover = redis.register_script(RECOVER)
        self.release_claim = redis.register_script(RELEASE_CLAIM)
