"""Checking the caller's API key on requests that create or change jobs."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import current_app, g, request
from redis.exceptions import RedisError

from relay.core import apikeys
from relay.core.connections import connect
from relay.core.errors import Unauthorized
from relay.core.settings import Settings
from relay.web import guessing
from relay.web.state import state

logger = logging.getLogger(__name__)

_CHECK_EVERY = 2.0  # seconds between looks at whether any key exists


class KeyMode:
    """Per process: seed RELAY_API_KEYS once, and remember briefly whether keys exist."""

    def __init__(self) -> None:
        self.seeded = False
        self.open = False
        self.checked_at = float("-inf")
        self.announced = False

    def keys_required(self, fresh: bool = False) -> bool:
        """``fresh``: look again now, not within ``_CHECK_EVERY`` of the last look."""
        relay = state()
        redis, settings = relay.redis, relay.settings
        if not self.seeded:
            apikeys.seed(redis, settings.api_keys)
            self.seeded = True
        now = time.monotonic()
        if fresh or now - self.checked_at > _CHECK_EVERY:
            exist, self.checked_at = apikeys.configured(redis), now
            if settings.api_keys and not exist:
                # Redis lost its data (restarted without persistence): seed again.
                apikeys.seed(redis, settings.api_keys)
                exist = True
            self.open = settings.open_access and not exist
            if self.open and not self.announced:
                logger.warning(OPEN_MODE)
                self.announced = True
        return not self.open


OPEN_MODE = "no API keys configured: anyone may create jobs (RELAY_OPEN_ACCESS=true)"
NO_KEYS = (
    "no API key exists and RELAY_OPEN_ACCESS is not true: creating jobs is refused until a key "
    "is made (python -m relay.apikeys create --label NAME) or RELAY_API_KEYS is set"
)


def key_mode_at_start(settings: Settings) -> tuple[bool, str]:
    """Seed ``RELAY_API_KEYS`` and say how the relay admits requests: (warn?, message to log).

    Called once by gunicorn's first worker (deploy/gunicorn.conf.py), so that an
    open relay, or one that refuses everything, says so at start and not only at its first
    request.
    """
    redis = connect(settings.redis_url, max_connections=2, cluster=settings.redis_cluster)
    try:
        apikeys.seed(redis, settings.api_keys)
        if apikeys.configured(redis):
            return False, "API keys required to create jobs"
        return True, OPEN_MODE if settings.open_access else NO_KEYS
    except RedisError as exc:
        return False, f"could not check API keys at start (Redis: {exc}); checked per request"
    finally:
        redis.close()


def keys_required(fresh: bool = False) -> bool:
    """Whether creating something needs an API key: unless no key exists and the relay was
    told to run open (``RELAY_OPEN_ACCESS``)."""
    mode: KeyMode = current_app.extensions.setdefault("relay.keymode", KeyMode())
    return mode.keys_required(fresh)


def require_api_key() -> dict[str, Any] | None:
    """The caller's key record, or 401; None when the relay runs open (no keys configured)."""
    if not keys_required():
        return None
    record = _authenticated(request.headers.get("Authorization"))
    if record is None and not keys_required(fresh=True):
        return None  # the last key was deleted a moment ago: the relay is open again
    if record is None:
        guessing.failed()
        raise Unauthorized(
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
        )
    g.api_key = record
    return record


def _authenticated(authorization: str | None) -> dict[str, Any] | None:
    """The key's record (None if missing, unknown or revoked), read once the caller's address
    is known not to be blocked for failed checks: both in one round trip, on every ``POST``."""
    key_digest = apikeys.bearer_digest(authorization)
    pipe = state().redis.pipeline(transaction=False)
    guarded = guessing.check_in(pipe)
    if key_digest is not None:
        apikeys.read(pipe, key_digest)
    replies = pipe.execute()
    if guarded:
        guessing.checked(replies.pop(0))
    return apikeys.record_of(key_digest, replies[0]) if key_digest is not None else None
