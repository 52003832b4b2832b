"""Who may watch or cancel a job: the key that created it, or the holder of one of its tokens.

Every job gets two unguessable tokens when it is made. The *read token* grants watching only
(``?token=`` on the events and status URLs and the share link, because ``EventSource`` cannot
send headers); the *cancel token* grants cancelling and is returned only to the creator. The
creating API key may do both. Anything else is answered exactly like an unknown job, so that
nobody learns whether a job id exists. The tokens live in the job's hash and die with it.

They are kept in clear, unlike API keys: each protects only its own job, whose whole text sits
in the same hash, so hashing them would protect nothing.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from relay.core import apikeys, keys
from relay.core.connections import Client, as_text

_FIELDS = ("owner", "read_token", "cancel_token")


def _same(presented: str | None, expected: str) -> bool:
    """Constant-time comparison; an empty expected token never matches."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


@dataclass(frozen=True)
class Access:
    owner: str  # the creating API key's id; "" when the relay runs open
    read_token: str
    cancel_token: str

    @classmethod
    def new(cls, owner: str = "") -> Access:
        return cls(owner, "rt-" + secrets.token_urlsafe(24), "ct-" + secrets.token_urlsafe(24))

    def fields(self) -> dict[str, str]:
        return dict(zip(_FIELDS, (self.owner, self.read_token, self.cancel_token), strict=True))

    def is_owner(self, key_id: str | None) -> bool:
        return bool(self.owner) and key_id is not None and _same(key_id, self.owner)

    def may_watch(self, token: str | None, key_id: str | None) -> bool:
        return _same(token, self.read_token) or self.is_owner(key_id)

    def may_cancel(self, token: str | None, key_id: str | None) -> bool:
        return _same(token, self.cancel_token) or self.is_owner(key_id)


NOBODY = Access.new()
"""Tokens no job has: what a token for a missing job is compared with (the same work)."""


def load(redis: Client, job_id: str) -> Access | None:
    """The job's access record, or None if there is no such job."""
    values = [as_text(v) for v in redis.hmget(keys.job(job_id), *_FIELDS)]
    if not values[1]:  # no job (or one made before tokens existed: nobody may see it)
        return None
    return Access(*(v or "" for v in values))


def caller_key_id(redis: Client, authorization: str | None) -> str | None:
    """The id of a valid (unrevoked) API key in an ``Authorization`` header, else None."""
    if not authorization:
        return None
    record: dict[str, Any] | None = apikeys.authenticate(redis, authorization)
    return record["id"] if record else None
