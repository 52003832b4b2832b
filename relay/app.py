"""The Flask application factory and the per-process state it owns."""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping
from typing import Any

import gevent
from flask import Flask, current_app
from redis import Redis
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from .config import DEFAULTS
from .conversations import Conversations
from .errors import RelayError, Unavailable, error_response, from_http_exception
from .fanout import Hub
from .jobs import JobStore
from .limits import Throttle
from .redis_client import connect

logger = logging.getLogger(__name__)


class RelayState:
    """Connections of one process, made on first use: gunicorn forks after ``create_app``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self._config = config
        self._redis: Redis | None = None
        self._store: JobStore | None = None
        self._hub: Hub | None = None
        self._conversations: Conversations | None = None
        self._throttle: Throttle | None = None

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            self._redis = connect(
                self._config["REDIS_URL"], max_connections=self._config["REDIS_MAX_CONNECTIONS"]
            )
        return self._redis

    @property
    def store(self) -> JobStore:
        if self._store is None:
            self._store = JobStore(
                self.redis,
                retention=int(self._config["RETENTION_SECONDS"]),
                max_age=int(self._config["JOB_MAX_AGE_SECONDS"]),
            )
        return self._store

    @property
    def conversations(self) -> Conversations:
        if self._conversations is None:
            self._conversations = Conversations(
                self.redis,
                ttl=int(self._config["CONVERSATION_TTL_SECONDS"]),
                max_context_tokens=int(self._config["MAX_CONTEXT_TOKENS"]),
                max_response_tokens=int(self._config["MAX_RESPONSE_TOKENS"]),
            )
        return self._conversations

    @property
    def throttle(self) -> Throttle:
        if self._throttle is None:
            self._throttle = Throttle(self.redis)
        return self._throttle

    @property
    def viewer_count(self) -> int:
        """Viewers this process serves (without starting the hub just to count them)."""
        return self._hub.viewer_count if self._hub is not None else 0

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            self._hub = Hub(self.redis, queue_size=int(self._config["VIEWER_QUEUE_SIZE"]))
        return self._hub

    def close_streams(self) -> int:
        """End this process's open streams (shutdown); how many were ended."""
        return self._hub.close_streams() if self._hub is not None else 0


def end_streams_on_sigterm(app: Flask) -> None:
    """Make SIGTERM end the process's open streams at once (called by gunicorn's
    ``post_worker_init`` in deploy/gunicorn.conf.py).

    gunicorn stops accepting on SIGTERM, then waits up to ``graceful_timeout`` for requests to
    end; a stream may not end by itself in time and would be cut off mid-response. Ended now,
    each response closes cleanly and its client resumes on another process after Last-Event-ID.
    """
    previous = signal.getsignal(signal.SIGTERM)

    def close(_: Any = None) -> None:
        closed = app.extensions["relay"].close_streams()
        logger.info("shutting down: ended %d open streams; clients resume elsewhere", closed)

    def on_sigterm(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        gevent.spawn(close)  # not in the signal handler: it may switch greenlets

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn has it: don't disturb requests


def state() -> RelayState:
    return current_app.extensions["relay"]


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Defaults, then ``RELAY_*`` environment variables, then ``config`` (for tests)."""
    app = Flask(__name__)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env("RELAY")
    if config:
        app.config.from_mapping(config)
    app.config["MAX_CONTENT_LENGTH"] = int(app.config["MAX_BODY_BYTES"])
    hops = int(app.config["TRUSTED_PROXIES"])
    if hops:  # the client address (rate limits in open mode) from X-Forwarded-For
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["relay"] = RelayState(app.config)

    from .api import api
    from .chatgpt_web import chatgpt_web
    from .pages import pages

    app.register_blueprint(api)
    app.register_blueprint(chatgpt_web)
    app.register_blueprint(pages)

    @app.errorhandler(RelayError)
    def _relay_error(error: RelayError):
        return error_response(error)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return error_response(from_http_exception(exc))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if isinstance(exc, RedisError):
            logger.warning("redis unavailable: %s", exc)
            return error_response(Unavailable("The relay cannot reach Redis; try again."))
        logger.exception("unhandled error")
        return error_response(RelayError("The relay had an internal error."))

    return app
