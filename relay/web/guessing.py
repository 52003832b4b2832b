"""Throttling guesses: failed credential checks (an API key, a job's token, chatgpt-web's secret,
a conversation's message id) count per client address, and past
``RELAY_AUTH_FAILURES_PER_MINUTE`` the address is refused with 429 for a minute, whatever it
sends: a guesser cannot keep trying and learn from the answers which guess was right.
"""

from __future__ import annotations

from flask import request

from relay.core.errors import RateLimited
from relay.web.state import settings, state


def _caller() -> str:
    return f"addr:{request.remote_addr}"


def check() -> None:
    """Before checking a credential: refuse a client address blocked for failed checks."""
    if settings().auth_failures_per_minute <= 0:
        return
    wait = state().throttle.blocked(_caller())
    if wait:
        raise RateLimited(
            "Too many failed attempts from this address; try again later.",
            retry_after=wait,
            code="too_many_failures",
        )


def failed() -> None:
    """A credential check failed: count it against the client's address."""
    limit = settings().auth_failures_per_minute
    if limit > 0:
        state().throttle.failed(_caller(), limit)
