"""The Flask application factory: settings, the per-process state, blueprints and errors."""

from __future__ import annotations

import logging
import signal
from collections.abc import Mapping
from typing import Any

import gevent
from flask import Flask
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from relay.core.errors import RelayError, Unavailable
from relay.core.settings import Settings
from relay.web.api import api
from relay.web.backend_api import backend_api
from relay.web.chatgpt_web import chatgpt_web
from relay.web.http_errors import error_response, from_http_exception
from relay.web.origins import guard
from relay.web.pages import pages
from relay.web.state import RelayState

logger = logging.getLogger(__name__)


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


def create_app(config: Settings | Mapping[str, Any] | None = None) -> Flask:
    """The relay's app: settings from ``RELAY_*`` variables, or ``config`` (a :class:`Settings`,
    or a mapping of fields to override them, for tests)."""
    if isinstance(config, Settings):
        settings = config
    else:
        settings = Settings.from_env(**dict(config or {}))
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    if settings.trusted_proxies:  # the client address (rate limits in open mode) from XFF
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["relay"] = RelayState(settings)

    guard(app, settings)
    app.register_blueprint(api)
    app.register_blueprint(chatgpt_web)
    app.register_blueprint(backend_api)
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
