"""Relay wake-ups: how a finished batch wakes its blocking callers.

Waking every caller of a batch at once makes each woken thread fight the worker (and each other)
for the GIL. Instead the worker wakes the first caller of each of `relay_width(n)` relays, and each
caller, once it runs, wakes the next caller of its relay (it passes the "baton").
"""
from __future__ import annotations

import threading

__all__ = ["RELAY_LENGTH", "RelayHelpers", "relay_width", "wait_turn", "wake_relays"]

# Relays of at most this many callers. Measured with Python threads pinned to one CPU: 256 callers
# in batches of about 200 went from 25k to 37k requests/s with 4 relays instead of 2, while batches
# of 64 ran as fast with 1 or 2 relays as with 4 (docs/benchmarks.md).
RELAY_LENGTH = 64


def relay_width(num_callers: int, wake_width: int | None = None) -> int:
    """Relays that wake `num_callers` blocking callers: `wake_width`, or automatically enough relays
    of at most RELAY_LENGTH callers each, and at least 2."""
    return wake_width or max(2, -(-num_callers // RELAY_LENGTH))


def wake_relays(requests, wake_width: int | None = None) -> None:
    """Wakes the blocking callers of `requests` (results already stored) as relays: the first
    caller of each relay now, each of the others by the caller before it (see `wait_turn`)."""
    width = relay_width(len(requests), wake_width)
    for a, b in zip(requests, requests[width:]):
        a.baton = b
    for head in requests[:width]:
        head.lock.release()


def wait_turn(req, helpers: "RelayHelpers") -> None:
    """Blocks a caller until its request `req` is complete, then wakes the next caller of its relay.

    Interrupted (Ctrl-C) before its turn came, the caller leaves at once and a helper thread takes
    its turn when it comes, so the callers behind it are still woken.

    One window is left open: a KeyboardInterrupt raised after `acquire` has taken the lock but
    before its result is stored in `got` (a few bytecodes) leaves `got` False while the turn was
    taken; the helper thread then waits for a release that never comes, and the callers behind this
    one in its relay (at most RELAY_LENGTH - 1) are never woken. Python gives no way to make the
    acquire and the store one step.
    """
    got = False
    try:
        got = req.lock.acquire()
    finally:
        if got:  # this caller's turn: wake the next of its relay
            if req.baton is not None:
                req.baton.lock.release()
        else:
            helpers.take_turn(req)


def _pass_baton(req) -> None:
    """Waits for req's turn in place of its caller, then wakes the next caller."""
    req.lock.acquire()
    if req.baton is not None:
        req.baton.lock.release()


class RelayHelpers:
    """The helper threads that take the turns of callers interrupted while they waited."""

    def __init__(self, name: str):
        self._name = name
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def take_turn(self, req) -> None:
        helper = threading.Thread(target=_pass_baton, args=(req,), name=f"rlbatch-{self._name}-relay",
                                  daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(helper)
        helper.start()

    def join(self) -> None:
        """Joins every helper (once every request is complete, each has had its turn)."""
        with self._lock:
            threads, self._threads = self._threads, []
        for t in threads:
            t.join()
