"""Cancelling a job, keeping its text so far as a reply that a follow-up can name."""

from __future__ import annotations

from relay.web.state import state


def cancel_and_keep_reply(job_id: str) -> bool:
    """Cancel a job and keep its text so far as a reply that can be a parent; whether this call
    ended it (False: it had already ended)."""
    relay = state()
    ended, _ = relay.store.cancel(job_id)
    turn = relay.store.turn(job_id)
    if ended and turn is not None:
        status = relay.store.status(job_id) or {}
        relay.conversations.save_reply(turn, status.get("text") or "")
    return ended
