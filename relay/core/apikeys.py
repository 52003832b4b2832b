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

from relay.core import keys
from relay.core.connections import Client, as_text

ID_LENGTH = 12  # a key's id: the start of its digest, enough to tell keys apart, never the key
MIN_ID_LENGTH = 8  # what the CLI needs to pick a key, so that a typo cannot match several


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create(redis: Client, label: str, rpm: int = 0, concurrency: int = 0) -> str:
    """Store a new key; the clear key is returned once and never stored."""
    key = "rk-" + secrets.token_urlsafe(32)
    _store(redis, digest(key), label, rpm, concurrency)
    return key


SEEDED = "RELAY_API_KEYS"  # the label of keys that come from the setting


def seed(redis: Client, seeded: Iterable[str]) -> None:
    """Make the keys from ``RELAY_API_KEYS`` exactly those of the setting (idempotent): add the
    missing ones, delete seeded ones no longer listed. Keys made with the CLI are left alone."""
    wanted = {digest(key) for key in seeded}
    for key_digest in wanted:
        if not redis.exists(keys.api_key(key_digest)):
            _store(redis, key_digest, SEEDED, 0, 0)
    for record in listing(redis):
        if record.get("label") == SEEDED and record["digest"] not in wanted:
            delete(redis, record["digest"])


def _store(redis: Client, key_digest: str, label: str, rpm: int, concurrency: int) -> None:
    pipe = redis.pipeline(transaction=False)  # two slots of a cluster: the record, then the set
    pipe.hset(
        keys.api_key(key_digest),
        mapping={"label": label, "created_at": f"{time.time():.0f}", "revoked": 0, "rpm": rpm,
                 "concurrency": concurrency},
    )  # fmt: skip
    pipe.sadd(keys.API_KEYS, key_digest)
    pipe.execute()


def configured(redis: Client) -> bool:
    return bool(redis.scard(keys.API_KEYS))


def bearer_digest(authorization: str | None) -> str | None:
    """The digest of the key in an ``Authorization: Bearer`` header; None without one."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    return digest(authorization[len("Bearer ") :].strip())


def record_of(key_digest: str, stored: dict[Any, Any]) -> dict[str, Any] | None:
    """A key's record from its stored hash (``HGETALL``); None if unknown or revoked."""
    record = {as_text(k): as_text(v) for k, v in stored.items()}
    if not record or record.get("revoked") == "1":
        return None
    return {"id": key_digest[:ID_LENGTH], **record}


def read(pipe: Any, key_digest: str) -> None:
    """Queue the read of a key's stored hash on ``pipe``; its reply goes to :func:`record_of`."""
    pipe.hgetall(keys.api_key(key_digest))


def authenticate(redis: Client, authorization: str | None) -> dict[str, Any] | None:
    """The key's record for an ``Authorization: Bearer`` header; None if missing, unknown or
    revoked."""
    key_digest = bearer_digest(authorization)
    if key_digest is None:
        return None
    return record_of(key_digest, redis.hgetall(keys.api_key(key_digest)))


def listing(redis: Client) -> list[dict[str, Any]]:
    """Every key's record: its id (what the CLI shows), label, limits, whether revoked, and
    (not for display) its full digest."""
    out = []
    for key_digest in sorted(as_text(d) for d in redis.smembers(keys.API_KEYS)):
        record = {
            as_text(k): as_text(v) for k, v in redis.hgetall(keys.api_key(key_digest)).items()
        }
        out.append({"id": key_digest[:ID_LENGTH], **record, "digest": key_digest})
    return out


def delete(redis: Client, key_digest: str) -> None:
    """Forget a key altogether (by its full digest)."""
    redis.srem(keys.API_KEYS, key_digest)
    redis.delete(keys.api_key(key_digest))


def matching(redis: Client, key_id: str) -> list[str]:
    """The digests of the keys whose id starts with ``key_id`` (at least 8 characters)."""
    if len(key_id) < MIN_ID_LENGTH:
        raise ValueError(f"give at least {MIN_ID_LENGTH} characters of the key id")
    return [as_text(d) for d in redis.smembers(keys.API_KEYS) if as_text(d).startswith(key_id)]


def revoke(redis: Client, key_id: str) -> int:
    """Revoke every key whose id (digest prefix, at least 8 characters) matches; how many."""
    matched = matching(redis, key_id)
    for key_digest in matched:
        redis.hset(keys.api_key(key_digest), "revoked", 1)
    return len(matched)
