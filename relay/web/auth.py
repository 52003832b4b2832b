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
from relay.web.state import state

logger = logging.getLogger(__name__)

_CHECK_EVERY = 2.0  # seconds between looks at whether any key exists


class KeyMode:
    """Per process: seed RELAY_API_KEYS once, and remember briefly whether keys exist."""

    def __init__(self) -> None:
        self.seeded = False
        self.enabled = False
        self.checked_at = float("-inf")
        self.announced = False

    def keys_required(self) -> bool:
        redis, seeded = state().redis, state().settings.api_keys
        if not self.seeded:
            apikeys.seed(redis, seeded)
            self.seeded = True
        now = time.monotonic()
        if now - self.checked_at > _CHECK_EVERY:
            self.enabled, self.checked_at = apikeys.configured(redis), now
            if seeded and not self.enabled:
                # Redis lost its data (restarted without persistence): seed again rather
                # than run open, which a relay configured with keys must never do.
                apikeys.seed(redis, seeded)
                self.enabled = True
            if not self.enabled and not self.announced:
                logger.warning(OPEN_MODE)
                self.announced = True
        return self.enabled


OPEN_MODE = "no API keys configured: anyone may create jobs (open mode)"


def key_mode_at_start(settings: Settings) -> tuple[bool, str]:
    """Seed ``RELAY_API_KEYS`` and say whether keys are required: (open, message to log).

    Called once by gunicorn's master when it is ready (deploy/gunicorn.conf.py), so that an
    open relay says so at start and not only at its first request.
    """
    redis = connect(settings.redis_url, max_connections=2)
    try:
        apikeys.seed(redis, settings.api_keys)
        if apikeys.configured(redis):
            return False, "API keys required to create jobs"
        return True, OPEN_MODE
    except RedisError as exc:
        return False, f"could not check API keys at start (Redis: {exc}); checked per request"
    finally:
        redis.close()


def keys_required() -> bool:
    """Whether any API key exists (then every request that creates something needs one)."""
    mode: KeyMode = current_app.extensions.setdefault("relay.keymode", KeyMode())
    return mode.keys_required()


def require_api_key() -> dict[str, Any] | None:
    """The caller's key record, or 401; None when the relay runs open (no keys configured)."""
    if not keys_required():
        return None
    record = apikeys.authenticate(state().redis, request.headers.get("Authorization"))
    if record is None:
        raise Unauthorized(
            "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
        )
    g.api_key = record
    return record
