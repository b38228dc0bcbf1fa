"""One queued request, its state machine, and the one place where requests are completed.

A request is completed in one of three ways, all through `complete()`:
- a blocking call (`svc(x)`): the caller waits on its own lock; the result is stored on the request
  and the lock released (as relays: see `rlbatch.batching.relay`);
- a Future (`submit`): the stdlib Future gets the result or the exception;
- a part of a request split over several batches: its `SplitRequest` collects the parts and
  completes the Future once every part is in.

States of a request (only blocking calls read them; a Future keeps its own):

    PENDING --taken into a batch or off the queue--> TAKEN --complete()--> DONE
    PENDING --its blocking caller gave up (timeout)--> CANCELLED (dropped when taken)
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading

from rlbatch.batching.relay import wake_relays

__all__ = ["Request", "SplitRequest", "complete", "is_special", "WAS_CANCELLED",
           "PENDING", "TAKEN", "DONE", "CANCELLED"]

PENDING, TAKEN, DONE, CANCELLED = 0, 1, 2, 3
# In place of a result: the request was cancelled (its Future said so, or its blocking caller left).
WAS_CANCELLED = object()
_log = logging.getLogger("rlbatch")


class Request:
    """One queued request: its values (as the collator prepared them), its rows (None: one row),
    its priority, arrival time `t0`, absolute `deadline` (or None), registered `caller`, and how
    it is completed (`future`, or `lock` for a blocking call).

    A blocking call does not need a Future's condition variable and callbacks: it waits on a lock
    the worker releases, which is the cheapest way for one thread to wake another in CPython.
    """

    __slots__ = ("values", "rows", "priority", "t0", "deadline", "caller", "state",
                 "future", "lock", "value", "error", "parent", "index", "baton")

    def __init__(self, values, rows, priority, t0, deadline, caller, future):
        self.values = values
        self.rows = rows
        self.priority = priority
        self.t0 = t0
        self.deadline = deadline
        self.caller = caller
        self.state = PENDING
        self.future = future
        self.lock = None
        self.value = None
        self.error = None
        self.parent = None  # the SplitRequest this is a part of
        self.index = 0  # which part
        self.baton = None  # the next blocking caller of this one's relay

    @property
    def num_rows(self) -> int:
        return 1 if self.rows is None else self.rows

    def claim(self) -> bool:
        """Worker side, before running: False if the request was cancelled meanwhile."""
        if self.parent is not None:
            return self.parent.claim_part()
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        return self.state == TAKEN  # a blocking call: False if its caller timed out and left


def is_special(r: Request) -> bool:
    """Not a plain blocking call of one row without a deadline: a Future, a deadline, several rows
    or a part of a split request. A batch of plain requests needs no per-request checks."""
    return r.lock is None or r.deadline is not None or r.rows is not None


class SplitRequest:
    """A request larger than max_batch_size, split into parts and reassembled in order."""

    def __init__(self, future: concurrent.futures.Future, num_parts: int, join):
        self.future = future
        self._results = [None] * num_parts
        self._left = num_parts
        self._join = join
        self._lock = threading.Lock()
        self._claimed = False
        self._failed = False
        self._abandoned = False

    @property
    def started(self) -> bool:
        """A part has run or is running (and the request has not failed)."""
        return self._claimed and not self._failed

    def claim_part(self) -> bool:
        with self._lock:
            if self._failed or self._abandoned:
                return False
            if not self._claimed:
                self._claimed = True
                if not self.future.set_running_or_notify_cancel():
                    self._failed = True
                    return False
            return True

    def abandon(self) -> bool:
        """True, and no part may start, if none has started yet.

        False once a part has run: the rest of the request then runs too, so that no caller is told
        "not run" about a request whose function was partly applied.
        """
        with self._lock:
            if self._claimed and not self._failed:
                return False
            self._abandoned = True
            return True

    def part_done(self, index: int, value, error: BaseException | None) -> None:
        with self._lock:
            if self._failed:
                return
            if error is not None:
                self._failed = True
            else:
                self._results[index] = value
                self._left -= 1
                if self._left:
                    return
        if error is not None:
            _set_exception(self.future, error)
            return
        try:
            joined = self._join(self._results)
        except BaseException as e:  # noqa: BLE001 - a join error belongs to this caller
            _set_exception(self.future, e)
            return
        self.future.set_result(joined)


def _set_exception(future: concurrent.futures.Future, error: BaseException) -> None:
    if not future.done() and (future.running() or future.set_running_or_notify_cancel()):
        future.set_exception(error)


def complete(requests: list, results: list, wake_width: int | None, plain: bool = False,
             name: str = "") -> None:
    """Hands each request its result: a value, an exception, or WAS_CANCELLED.

    `plain`: every request is a blocking call without a deadline and every result a value (a
    bucketed batch of plain calls): the results are stored without per-request checks. Blocking
    callers are woken as relays, after every other request is complete. Never raises: a
    done-callback that raises what concurrent.futures does not catch itself (SystemExit,
    KeyboardInterrupt) is logged, and the other requests still complete.
    """
    if plain:
        for r, res in zip(requests, results):
            r.value = res
        wake_relays(requests, wake_width)
        return
    blocked = []
    for r, res in zip(requests, results):
        try:
            if r.parent is not None:
                if res is not WAS_CANCELLED:
                    failed = isinstance(res, BaseException)
                    r.parent.part_done(r.index, None if failed else res, res if failed else None)
            elif r.future is not None:
                if res is WAS_CANCELLED:
                    continue  # the Future already says so
                if isinstance(res, BaseException):
                    _set_exception(r.future, res)
                else:
                    r.future.set_result(res)
            else:  # a blocking call
                if res is WAS_CANCELLED:
                    r.error = concurrent.futures.CancelledError()
                elif isinstance(res, BaseException):
                    r.error = res
                else:
                    r.value = res
                r.state = DONE
                if r.deadline is None:
                    blocked.append(r)  # woken as a relay below
                else:
                    # A caller with a timeout may have left already: it is nobody's relay turn.
                    r.baton = None
                    r.lock.release()
        except BaseException:  # noqa: BLE001 - the worker never dies; the other requests still complete
            _log.exception("rlbatch: a done-callback of a Future from service %r raised", name)
    if blocked:
        wake_relays(blocked, wake_width)
