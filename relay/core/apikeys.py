"""API keys: who may create jobs. Kept in Redis as SHA-256 digests, never in clear.

A presented key is never compared with a stored one: its digest is looked up, so the time taken
reveals nothing about stored keys. ``RELAY_API_KEYS`` seeds keys for simple set-ups. Manage them
with ``python -m relay.apikeys create|list|revoke``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable
from typing import Any

from redis import Redis

from relay.core import keys
from relay.core.connections import as_text


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(redis: Redis, label: str, rpm: int = 0, concurrency: int = 0) -> str:
    """Store a new key; the clear key is returned once and never stored."""
    key = "rk-" + secrets.token_urlsafe(32)
    _store(redis, digest(key), label, rpm, concurrency)
    return key


def seed(redis: Redis, seeded: Iterable[str]) -> None:
    """Make sure the keys of ``RELAY_API_KEYS`` exist (idempotent)."""
    for key in seeded:
        if not redis.exists(keys.api_key(digest(key))):
            _store(redis, digest(key), "RELAY_API_KEYS", 0, 0)


def _store(redis: Redis, key_digest: str, label: str, rpm: int, concurrency: int) -> None:
    pipe = redis.pipeline(transaction=True)
    pipe.hset(
        keys.api_key(key_digest),
        mapping={"label": label, "created_at": f"{time.time():.0f}", "revoked": 0, "rpm": rpm,
                 "concurrency": concurrency},
    )  # fmt: skip
    pipe.sadd(keys.API_KEYS, key_digest)
    pipe.execute()


def configured(redis: Redis) -> bool:
    return bool(redis.scard(keys.API_KEYS))


def authenticate(redis: Redis, authorization: str | None) -> dict[str, Any] | None:
    """The key's record for an ``Authorization: Bearer`` header; None if missing, unknown or
    revoked."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    key_digest = digest(authorization[len("Bearer ") :].strip())
    record = {as_text(k): as_text(v) for k, v in redis.hgetall(keys.api_key(key_digest)).items()}
    if not record or record.get("revoked") == "1":
        return None
    return {"id": key_digest[:12], **record}


def listing(redis: Redis) -> list[dict[str, Any]]:
    out = []
    for key_digest in sorted(as_text(d) for d in redis.smembers(keys.API_KEYS)):
        record = {
            as_text(k): as_text(v) for k, v in redis.hgetall(keys.api_key(key_digest)).items()
        }
        out.append({"id": key_digest[:12], **record})
    return out


def revoke(redis: Redis, key_id: str) -> int:
    """Revoke every key whose id (digest prefix, at least 8 characters) matches; how many."""
    if len(key_id) < 8:
        raise ValueError("give at least 8 characters of the key id")
    matched = [as_text(d) for d in redis.smembers(keys.API_KEYS) if as_text(d).startswith(key_id)]
    for key_digest in matched:
        redis.hset(keys.api_key(key_digest), "revoked", 1)
    return len(matched)
