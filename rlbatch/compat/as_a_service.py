"""as_a_service 1.0.3's public API on rlbatch's BatchedService: change only the import line.

    from rlbatch.compat.as_a_service import BatchedService, as_batched_service, as_service

    @as_batched_service(batch_size=3, max_delay=0.1)      # max_delay in seconds
    def square(batch_xs):                                  # gets a list, returns an iterable
        return [x_i ** 2 for x_i in batch_xs]

    square.submit_many(range(10))   # batches [0, 1, 2] [3, 4, 5] [6, 7, 8] [9]
    square(2.0)                     # 4.0: one item, blocks
    square.stop()                   # runs what is queued, then ends the worker

as_a_service's rules, kept: a call is ONE item whatever its type (`square([1, 2])` passes the
list as one item); the batch function gets a Python list and may return any iterable (a 2-D
numpy array gives each caller one row); results are paired with items in order and extra results
are ignored; `batch_size` and `max_delay` may be changed on a running service; `submit` after
`stop()` raises an AssertionError; `join()` raises ValueError; `max_delay` must be > 0.

The original's faults, fixed (none of them can be relied on, they only hang): a soft `stop()` runs
every queued item (the original dropped them); `stop(hard=True)` fails queued items with
ServiceClosed (the original left them pending forever); an exception in the batch function reaches
that batch's callers and the worker keeps serving (the original's worker died); a cancelled
Future is skipped; too few results fail the batch with BatchOutputError (the original left the
unmatched callers waiting forever); the worker is a daemon thread, so a script that never calls
`stop()` still exits; `stop()` on a service never started runs its queue instead of raising.

What differs otherwise: the delay counts from the oldest queued item's arrival, as the original's
docstring says (its code counted from when the worker began gathering); a `__call__` that times
out drops its item if it has not run yet; an Exception instance among the results fails that
caller (rlbatch's rule) instead of being returned; `name` is the batch function's name; the
service is not a `threading.Thread` (`start`, `is_alive` and `join` are provided, `run` is not).
Everything of rlbatch's BatchedService is there too (`stats`, `map`, `acall`, `close`, `with`).
"""
from __future__ import annotations

import concurrent.futures
import itertools
import numbers
import operator
import threading
from typing import Any, Callable, Iterable

import rlbatch
from rlbatch.errors import BatchOutputError, ServiceClosed

__all__ = ["BatchedService", "ServiceClosing", "as_batched_service", "as_service"]


class ServiceClosing(ServiceClosed, AssertionError):
    """A request submitted after `stop()`: an AssertionError, as as_a_service's `assert` raised,
    and rlbatch's ServiceClosed."""


class InvalidDelay(ValueError, AssertionError):
    """`max_delay` is not a number > 0: a ValueError, and the AssertionError as_a_service raised."""


class _QueueView:
    """Read-only stand-in for the original's `queue.Queue` attribute, for code that watches the
    backlog (`service.queue.qsize()`); items are queued through the service only."""

    def __init__(self, service: "BatchedService", maxsize: int):
        self._service = service
        self.maxsize = maxsize

    def qsize(self) -> int:
        return self._service.stats.pending

    def empty(self) -> bool:
        return self.qsize() == 0

    def full(self) -> bool:
        return 0 < self.maxsize <= self.qsize()


class BatchedService(rlbatch.BatchedService):
    """Groups calls into batches of at most `batch_size` items and runs `batch_process_func` on each.

    A batch goes when it holds `batch_size` items or when its oldest item has waited `max_delay`
    seconds. Only the batch size and the delay form batches, as in as_a_service: a thread waiting
    alone still waits out the delay (rlbatch's early flush is off: `implicit_callers=False`).

    Args:
      batch_process_func: takes a list of items, returns an iterable with one result per item, in
        order (extra results are ignored; too few fail the batch with BatchOutputError). Read
        again for every batch, as in the original.
      batch_size: most items per call; may be changed while the service runs.
      max_delay: seconds (> 0) the oldest item of a batch waits for more; may be changed while the
        service runs.
      max_queued: most items waiting; `submit` blocks while it is reached. 0: unlimited.
      start: start the worker now (default); False: items queue until `start()`.
    """

    NO_MORE_ITEMS = 0xDEADC0DE  # the original's stop sentinel; kept for code that names it

    def __init__(self, batch_process_func: Callable[[list], Iterable], batch_size: int, max_delay: float,
                 max_queued: int = 0, start: bool = True):
        if not callable(batch_process_func):
            raise TypeError(f"batch_process_func must be callable, got {type(batch_process_func).__name__}")
        if isinstance(max_delay, bool) or not isinstance(max_delay, numbers.Real) or not max_delay > 0:
            # The original's assertion message first, for code that matches it.
            raise InvalidDelay("delay must be non-negative. Please set some small number (e.g. 1e-5) instead. "
                               f"Expected max_delay > 0 seconds, got {max_delay!r}")
        try:
            batch_size = operator.index(batch_size)  # numpy ints too, as the original's range() took
        except TypeError:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}") from None
        max_queued = operator.index(max_queued)
        self.batch_process_func = batch_process_func
        # Held by submit_many for all its items and by stop() to close, so that a stop() ordered
        # meanwhile waits until every item of the call is queued (the original's contract).
        self.lock_closing = threading.Lock()
        self._started = False
        super().__init__(
            self._run_batch, batch_size, float(max_delay),
            max_queue=max_queued if max_queued > 0 else None,  # queue.Queue's rule: <= 0 is unlimited
            implicit_callers=False,  # as_a_service's rule: batches form by size and delay only
            name=getattr(batch_process_func, "__name__", type(batch_process_func).__name__),
            start=False)  # started below when asked, so that is_alive() is True at once as a Thread's
        self._queue_view = _QueueView(self, max_queued)
        if start:
            self.start()

    def _run_batch(self, items: list) -> list:
        # Runs on the worker. The original zipped futures with whatever iterable came back; a list
        # of exactly one result per item is what the core pairs with its requests.
        n = len(items)
        output = self.batch_process_func(items)
        try:
            results = list(itertools.islice(output, n))  # a 2-D array gives its rows
        except TypeError:
            raise BatchOutputError(f"batch_process_func must return an iterable of {n} results "
                                   f"(one per item), got {type(output).__name__}") from None
        if len(results) < n:
            raise BatchOutputError(f"batch_process_func returned {len(results)} results for a batch of {n} "
                                   "items; expected one per item")
        return results

    # ------------------------------------------------------------------ settings (on the fly)

    @property
    def batch_size(self) -> int:
        return self.max_batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        """The next batch takes at most this many items."""
        self.max_batch_size = value

    @property
    def max_delay(self) -> float:
        return rlbatch.BatchedService.max_delay.fget(self)

    @max_delay.setter
    def max_delay(self, value: float) -> None:
        """Queued items wait by the new delay at once (0: no wait, as the original's get(timeout=0))."""
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = float(value)  # numpy floats too
        rlbatch.BatchedService.max_delay.fset(self, value)

    @property
    def closing(self) -> bool:
        """True once `stop()` (or `close()`) was called."""
        return self.closed

    @property
    def queue(self) -> _QueueView:
        """The backlog: `qsize()`, `empty()`, `full()`, `maxsize` (read-only)."""
        return self._queue_view

    # ------------------------------------------------------------------ requests

    def submit(self, item: Any) -> concurrent.futures.Future:
        """Queues one item; returns a `concurrent.futures.Future` of its result.

        Blocks while `max_queued` items wait. Raises ServiceClosing (an AssertionError) after stop().
        """
        self._check_open()
        try:
            return super().submit(item)
        except ServiceClosed as e:  # stop() came between the check and the queue
            raise self._closing_error() from e

    def submit_many(self, items: Iterable) -> list:
        """Queues every item of `items` (each one item); one Future each, in order. A stop()
        ordered meanwhile waits until all of them are queued."""
        with self.lock_closing:
            self._check_open()
            try:
                return super().submit_many(items)
            except ServiceClosed as e:
                raise self._closing_error() from e

    def __call__(self, item: Any, timeout: float | None = None) -> Any:
        """Submits one item and returns its result, blocking. `timeout` (seconds) bounds the wait:
        then a TimeoutError (concurrent.futures') is raised and the item is dropped if not yet run."""
        self._check_open()
        return super().__call__(item, timeout=timeout)

    def _check_open(self) -> None:
        if self.closed:
            raise self._closing_error()

    def _closing_error(self) -> ServiceClosing:
        return ServiceClosing(f"Service is closing, no new requests can be submitted (service {self.name!r} "
                              "was stopped; expected submits before stop())")

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "BatchedService":
        """Starts the worker (a service made with start=False); idempotent. ServiceClosed once stopped."""
        super().start()
        self._started = True
        return self

    def is_alive(self) -> bool:
        """True from start() until stop(), as the original's thread."""
        return self._started and not self.closed

    def join(self, timeout: float | None = None):
        raise ValueError("Please use .stop(...) instead of .join")

    def stop(self, wait: bool = True, timeout: float | None = None, hard: bool = False) -> None:
        """Runs every queued item, then stops the worker. Safe to call more than once.

        wait: block until the worker has ended, for at most `timeout` seconds.
        hard: queued items do not run; their Futures (and blocked callers) fail with ServiceClosed.
        A batch already running completes either way.
        """
        with self.lock_closing:
            self.close(wait=False, cancel_pending=hard)
        if wait:
            self.close(wait=True, timeout=timeout)  # already closed: only joins the worker


def as_batched_service(batch_size: int, max_delay: float, max_queued: int = 0, start: bool = True):
    """`@as_batched_service(batch_size=3, max_delay=0.1)` on a batch function returns a
    BatchedService for it (the service itself, as in as_a_service, not a wrapped function)."""

    def wrap(batch_process_func):
        return BatchedService(batch_process_func, batch_size, max_delay, max_queued=max_queued, start=start)

    return wrap


def as_service(max_delay: float = 1.0, max_queued: int = 0, start: bool = True):
    """`@as_service()` on a one-item function returns a BatchedService of batch size 1: calls from
    any number of threads run one at a time, in the order they were submitted. Each call goes at
    once; `max_delay` (seconds, > 0) only matters if `batch_size` is raised later."""

    def wrap(item_process_func):
        def process(items):
            # batch_size 1 unless someone raised it on the fly; then say so rather than drop items.
            if len(items) != 1:
                raise ValueError(f"an as_service function takes 1 item per batch, got {len(items)} "
                                 "(its batch_size was changed)")
            return [item_process_func(items[0])]

        process.__name__ = getattr(item_process_func, "__name__", type(item_process_func).__name__)
        return BatchedService(process, 1, max_delay, max_queued=max_queued, start=start)

    return wrap
