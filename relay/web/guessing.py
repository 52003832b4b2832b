"""Throttling guesses: failed credential checks (an API key, a job's token, chatgpt-web's secret,
a conversation's message id) count per client address, and past
``RELAY_AUTH_FAILURES_PER_MINUTE`` the address is refused with 429 for a minute, whatever it
sends: a guesser cannot keep trying and learn from the answers which guess was right.
"""

from __future__ import annotations

from typing import Any

from flask import g, request

from relay.core.errors import RateLimited
from relay.web.limits import blocked_seconds
from relay.web.state import settings, state


def _caller() -> str:
    return f"addr:{request.remote_addr}"


def check() -> None:
    """Before checking a credential: refuse a client address blocked for failed checks."""
    if _limit() and not g.get("not_blocked"):
        _refuse_if_blocked(state().throttle.blocked(_caller()))


def check_in(pipe: Any) -> bool:
    """:func:`check`'s read queued on ``pipe``, to share a round trip with the credential's
    own; True if it was queued: then give its reply to :func:`checked`."""
    if not _limit() or g.get("not_blocked"):
        return False
    state().throttle.read_blocked(pipe, _caller())
    return True


def checked(reply: int) -> None:
    """Refuse the caller if the reply to :func:`check_in`'s read says its address is blocked."""
    _refuse_if_blocked(blocked_seconds(reply))


def _limit() -> int:
    return settings().auth_failures_per_minute


def _refuse_if_blocked(wait: int) -> None:
    if wait:
        raise RateLimited(
            "Too many failed attempts from this address; try again later.",
            retry_after=wait,
            code="too_many_failures",
        )
    g.not_blocked = True  # for the rest of this request: a failure below ends it anyway


def failed() -> None:
    """A credential check failed: count it against the client's address."""
    g.pop("not_blocked", None)
    limit = _limit()
    if limit > 0:
        state().throttle.failed(_caller(), limit)
