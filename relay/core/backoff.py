"""How long to wait before trying a lost connection again: the same rule for every loop that
reconnects (the fan-out subscription, the worker's claim loop and its control channel)."""

from __future__ import annotations

FIRST_DELAY = 0.1  # seconds: a blip (a Redis restart) is over before a user notices
MAX_DELAY = 5.0  # seconds: a long outage is retried often enough to recover within seconds


class Backoff:
    """Delays that double from ``first`` up to ``cap``, back to ``first`` after a success."""

    def __init__(self, first: float = FIRST_DELAY, cap: float = MAX_DELAY) -> None:
        self.first, self.cap = first, cap
        self.delay = first

    def next(self) -> float:
        """The delay to wait now; the one after it is twice as long (up to the cap)."""
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        """The connection works again: the next failure starts from the first delay."""
        self.delay = self.first
