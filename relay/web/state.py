"""Per-process state of the web tier: its Redis client and what is built on it, made lazily.

gunicorn imports the app in its master and forks the workers afterwards; connections made
before the fork would be shared by every process, so each is made on first use, after it.
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property

from flask import current_app

from relay.core import routes
from relay.core.connections import Client, connect
from relay.core.conversations import Conversations
from relay.core.jobs import JobStore
from relay.core.settings import Settings
from relay.web.fanout import Hub
from relay.web.limits import Throttle
from relay.web.models import ModelCatalog


class RelayState:
    """Connections of one process, made on first use: gunicorn forks after ``create_app``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.routes = routes.load(settings)  # a bad routes file stops the app here
        self._hub: Hub | None = None
        # Open streams by client address and by read token (relay.web.streams' caps).
        self.open_streams: Counter[str] = Counter()
        # Each job URL with slots for its id and token, per way of reaching the relay
        # (relay.web.api.job_links).
        self.url_templates: dict[tuple[str | None, ...], dict[str, str]] = {}

    @cached_property
    def redis(self) -> Client:
        settings = self.settings
        return connect(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            cluster=settings.redis_cluster,
        )

    @cached_property
    def store(self) -> JobStore:
        return JobStore(
            self.redis,
            retention=self.settings.retention_seconds,
            max_age=self.settings.job_max_age_seconds,
        )

    @cached_property
    def conversations(self) -> Conversations:
        return Conversations(
            self.redis,
            ttl=self.settings.conversation_ttl_seconds,
            max_context_tokens=self.settings.max_context_tokens,
            max_response_tokens=self.settings.max_response_tokens,
        )

    @cached_property
    def models(self) -> ModelCatalog:
        return ModelCatalog(self.redis, self.routes)

    @cached_property
    def throttle(self) -> Throttle:
        return Throttle(self.redis)

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            self._hub = Hub(self.redis, queue_size=self.settings.viewer_queue_size)
        return self._hub

    @property
    def viewer_count(self) -> int:
        """Viewers this process serves (without starting the hub just to count them)."""
        return self._hub.viewer_count if self._hub is not None else 0

    def close_streams(self) -> int:
        """End this process's open streams (shutdown); how many were ended."""
        return self._hub.close_streams() if self._hub is not None else 0


def state() -> RelayState:
    """The current app's :class:`RelayState`."""
    return current_app.extensions["relay"]


def settings() -> Settings:
    """The current app's settings."""
    return state().settings
