"""Relay wake-ups: how a finished batch wakes its blocking callers.

Waking every caller of a batch at once makes each woken thread fight the worker (and each other)
for the GIL. Instead the worker wakes the first caller of each of `relay_width(n)` relays, and each
caller, once it runs, wakes the next caller of its relay (it passes the "baton").
"""
from __future__ import annotations

__all__ = ["RELAY_LENGTH", "relay_width"]

# Relays of at most this many callers. Measured with Python threads pinned to one CPU: 256 callers
# in batches of about 200 went from 25k to 37k requests/s with 4 relays instead of 2, while batches
# of 64 ran as fast with 1 or 2 relays as with 4 (docs/benchmarks.md).
RELAY_LENGTH = 64


def relay_width(num_callers: int, wake_width: int | None = None) -> int:
    """Relays that wake `num_callers` blocking callers: `wake_width`, or automatically enough relays
    of at most RELAY_LENGTH callers each, and at least 2."""
    return wake_width or max(2, -(-num_callers // RELAY_LENGTH))
