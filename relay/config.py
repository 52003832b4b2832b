"""Settings shared by the relay and the worker: defaults, overridden by ``RELAY_*`` variables.

The README's configuration table lists each one. Values from the environment are parsed as
JSON when they can be (``"30"`` becomes ``30``), exactly as Flask's ``from_prefixed_env`` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

DEFAULTS: dict[str, Any] = {
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    # Per process. Viewers borrow a connection only to read the replay log; live events come
    # over the one shared subscription, so a few connections serve thousands of viewers.
    "REDIS_MAX_CONNECTIONS": 16,
    "UPSTREAM_BASE_URL": "https://api.openai.com/v1",
    "UPSTREAM_API_KEY": "",
    "UPSTREAM_CONNECT_TIMEOUT": 10.0,
    "UPSTREAM_READ_TIMEOUT": 60.0,
    "UPSTREAM_MAX_RETRIES": 2,
    "UPSTREAM_INCLUDE_USAGE": True,
    "DEFAULT_MODEL": "gpt-4o-mini",
    "LEASE_SECONDS": 30,
    "RETENTION_SECONDS": 3600,
    "JOB_MAX_AGE_SECONDS": 86400,
    "MAX_BODY_BYTES": 1024 * 1024,
    "MAX_MESSAGES": 500,
    "MAX_INPUT_CHARS": 400_000,
    "MAX_TOKENS": 0,
    "KEEPALIVE_SECONDS": 15.0,
    "RETRY_MS": 2000,
    "VIEWER_QUEUE_SIZE": 1024,
    # Caught-up viewers get live events written by the process's dispatcher in one send each
    # (relay.fanout); false routes every event through the viewer's own greenlet.
    "DIRECT_WRITES": True,
    "WORKER_CONCURRENCY": 256,
    "WORKER_GRACE_SECONDS": 30.0,
    "CANCEL_ON_DISCONNECT": True,
    "MAX_CONTEXT_TOKENS": 4096,
    "MAX_RESPONSE_TOKENS": 1000,
    "CONVERSATION_TTL_SECONDS": 30 * 24 * 3600,
    "CHATGPT_WEB_SECRET": "",
    "API_KEYS": "",
    # Per caller (an API key, or a client address when the relay runs open); 0: no limit. A
    # key's own limits (python -m relay.apikeys create --rpm/--concurrency) take precedence.
    "RATE_LIMIT_RPM": 0,
    "CONCURRENCY_LIMIT": 0,
    # Beyond this many queued jobs new ones are refused (503) until workers catch up; 0: no cap.
    # Proxies in front of gunicorn trusted to set X-Forwarded-For/-Proto (1 behind one nginx).
    "TRUSTED_PROXIES": 0,
    "MAX_QUEUED_JOBS": 10000,
    "QUEUE_FULL_RETRY_AFTER": 5,
    # A viewer whose connection takes no bytes for this long is cut off (it may resume).
    "SEND_TIMEOUT_SECONDS": 30.0,
    "MODERATION": False,
    "MODERATION_FAIL_OPEN": False,
    "MODERATION_MODEL": "",
}


def _parse(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def from_env(environ: Mapping[str, str] | None = None, prefix: str = "RELAY_") -> dict[str, Any]:
    """The defaults overridden by ``RELAY_*`` variables (for processes that are not Flask apps)."""
    environ = os.environ if environ is None else environ
    settings = dict(DEFAULTS)
    for name, value in environ.items():
        if name.startswith(prefix):
            settings[name[len(prefix) :]] = _parse(value)
    return settings
