"""chat-relay: reliable, shareable LLM chat streaming (Flask SSE relay with Redis fan-out)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from flask import Flask


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The relay's Flask app (see :func:`relay.app.create_app`).

    Imported lazily so that ``python -m relay.dev.simulator`` and the worker can monkey-patch
    gevent before Flask and redis are loaded.
    """
    from relay.web.app import create_app as factory

    return factory(config)


__all__ = ["create_app"]
