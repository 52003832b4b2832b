"""chat-relay: reliable, shareable LLM chat streaming (Flask SSE relay with Redis fan-out)."""

from .app import create_app

__all__ = ["create_app"]
