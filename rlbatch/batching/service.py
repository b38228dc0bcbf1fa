"""BatchedService: many callers, one input each; one worker, one batch function call per batch.

The service is an executor for one function: `submit` returns a `concurrent.futures.Future`,
`map` behaves as `Executor.map`, `shutdown` as `Executor.shutdown`. A blocking call (`svc(x)`)
waits on a lock of its own instead of a Future, which is the cheapest way for the worker to wake
one thread in CPython; a thread that makes blocking calls becomes a known caller by itself (see
rlbatch.batching.callers), so the batch goes as soon as every known caller waits.

What is where: arguments and the public calls here; the lock, the queue, batch formation and the
worker threads in rlbatch.batching.worker; collation in rlbatch.batching.collate; the request
state machine and its completion in rlbatch.batching.request; relay wake-ups in
rlbatch.batching.relay.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from rlbatch.batching.callers import Caller, ThreadCallers
from rlbatch.batching.arrays import ArrayCollator
from rlbatch.batching.collate import ArgSpec, ListCollator
from rlbatch.batching.options import check_max_batch_size, check_options, check_seconds
from rlbatch.batching.relay import wait_turn
from rlbatch.batching.request import CANCELLED, PENDING, Request, SplitRequest
from rlbatch.batching.stats import ServiceStats, StatsRecorder
from rlbatch.batching.worker import Worker
from rlbatch.errors import DeadlineExceeded, InvalidRequest, QueueFull, ServiceClosed

__all__ = ["BatchedService", "Caller"]

_clock = time.perf_counter


class BatchedService:
    """Turns a batch function into a service that many threads call one input at a time.

    Args:
      batch_fn: the batch function. Without buckets each parameter receives a list (one entry per
        row) and it returns a sequence of results of the same length; with buckets, see `buckets`.
      max_batch_size: most rows in one call (default: the largest bucket, or 32).
      max_delay: seconds the oldest request of a batch may wait for more to arrive.
      buckets: padded sizes; turns on array mode: rows (numpy arrays or pytrees of arrays) are
        stacked into a preallocated buffer of the smallest bucket >= n and padded, and the function
        is called as `fn(*padded_args, num_valid=n)`, returning arrays with the bucket as leading axis.
      pad: "repeat" (the last valid row, default), "zeros", or a fill value.
      example: a tuple with one example row per argument, fixing the accepted shapes and dtypes
        (default: the first request fixes them).
      max_queue: most requests waiting; then `on_full` = "block" (default) or "raise" (QueueFull).
      setup: called once on the worker thread before the first batch; its result is passed to the
        batch function as its first argument (as a `functools.partial` would bind a model).
      max_in_flight: batches dispatched and not yet completed; > 1 splits result handling onto a
        second thread so the next batch forms while this one computes.
      starvation_timeout: seconds after which a waiting request is served before higher priorities.
      wake_width: blocking callers of a finished batch are woken as this many relays (see
        rlbatch.batching.relay); default: enough relays of at most 64 callers each, at least 2.
      implicit_callers: count every thread that makes blocking calls as a known caller (early
        flush without `register()`, see rlbatch.batching.callers). False: only registered callers
        count, and a plain call waits for a full batch or max_delay, as in the seed libraries.
      idle_horizon: seconds without a call after which a thread stops counting as a known caller.
      collator: how requests become arguments and outputs results (rlbatch.batching.collate), for
        front ends that check and stack their own inputs (PolicyService); replaces what `buckets`,
        `pad` and `example` would build.
      small_batch_threshold: calls of at most this many inputs (one `submit` or blocking call is
        one; `submit_many`/`map` of n items or a request of n rows is n) are served before larger
        calls of the same priority, so a lone request is not stuck behind a bulk job (batched's
        rule). Default None: FIFO within a priority.
      name: a name for the worker threads and messages.
      start: start the worker on the first request (default); False: requests queue until
        `start()` (or run when the service is closed without cancelling them).
    """

    def __init__(
        self,
        batch_fn: Callable,
        max_batch_size: int | None = None,
        max_delay: float = 0.002,
        *,
        buckets: Sequence[int] | None = None,
        pad: Any = "repeat",
        example: tuple | None = None,
        max_queue: int | None = None,
        on_full: str = "block",
        setup: Callable[[], Any] | None = None,
        max_in_flight: int = 1,
        starvation_timeout: float = 1.0,
        wake_width: int | None = None,
        implicit_callers: bool = True,
        idle_horizon: float = 1.0,
        collator: Any = None,
        small_batch_threshold: int | None = None,
        name: str | None = None,
        start: bool = True,
    ):
        if not callable(batch_fn):
            raise TypeError(f"batch_fn must be callable, got {type(batch_fn).__name__}")
        if collator is None:
            argspec = ArgSpec(batch_fn, skip=1 if setup is not None else 0,
                              reserved=("num_valid",) if buckets is not None else ())
            collator = ArrayCollator(argspec, buckets, pad=pad, example=example) if buckets is not None \
                else ListCollator(argspec)
        buckets = getattr(collator, "buckets", None)
        if max_batch_size is None:
            max_batch_size = max(buckets) if buckets else 32
        check_options(max_batch_size=max_batch_size, buckets=buckets, max_delay=max_delay, on_full=on_full,
                      max_queue=max_queue, max_in_flight=max_in_flight, wake_width=wake_width,
                      starvation_timeout=starvation_timeout, idle_horizon=idle_horizon,
                      small_batch_threshold=small_batch_threshold)
        self.small_batch_threshold = small_batch_threshold

        self.batch_fn = batch_fn
        self.name = name or getattr(batch_fn, "__name__", "batch_fn")
        self.collator = collator
        argspec = getattr(collator, "argspec", None)
        # Positional arguments a plain list-mode call may pass as they are, unchecked (-1: none).
        self._fast_arity = argspec.fast_arity if isinstance(collator, ListCollator) else -1
        self._stats = StatsRecorder(max_batch_size)
        self._worker = Worker(
            batch_fn, collator, self._stats, max_batch_size=max_batch_size, max_delay=float(max_delay),
            max_queue=max_queue, on_full=on_full, setup=setup, max_in_flight=max_in_flight,
            starvation_timeout=float(starvation_timeout), wake_width=wake_width,
            idle_horizon=float(idle_horizon), name=self.name, autostart=start)
        self._thread_callers = ThreadCallers(self) if implicit_callers else None

    # ------------------------------------------------------------------ settings

    @property
    def max_batch_size(self) -> int:
        return self._worker.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        """Changeable while the service runs: the next batch takes at most this many rows."""
        check_max_batch_size(value, getattr(self.collator, "buckets", None))
        with self._worker.lock:
            self._worker.max_batch_size = value
            self._stats.grow(value)
        self._worker.wake()

    @property
    def max_delay(self) -> float:
        return self._worker.max_delay

    @max_delay.setter
    def max_delay(self, value: float) -> None:
        """Changeable while the service runs: queued requests wait by the new delay at once."""
        check_seconds("max_delay", value)
        self._worker.max_delay = float(value)
        self._worker.wake()

    max_queue = property(lambda self: self._worker.max_queue)
    on_full = property(lambda self: self._worker.on_full)
    max_in_flight = property(lambda self: self._worker.max_in_flight)
    starvation_timeout = property(lambda self: self._worker.starvation_timeout)
    wake_width = property(lambda self: self._worker.wake_width)
    idle_horizon = property(lambda self: self._worker.idle_horizon)

    # ------------------------------------------------------------------ Futures

    def submit(self, *args, priority: int = 0, timeout: float | None = None, **kwargs) -> concurrent.futures.Future:
        """Queues one input; returns a `concurrent.futures.Future` of its result.

        `timeout` is a deadline in seconds: if the request has not run by then it fails with
        DeadlineExceeded (a TimeoutError) without being run, at the deadline if it is still queued
        (while the worker waits for a batch to fill) or else when the worker next takes a batch.
        Invalid input gives a Future that already holds InvalidRequest.
        """
        return self.submit_request(args, kwargs, priority=priority, timeout=timeout)

    def submit_rows(self, *args, priority: int = 0, timeout: float | None = None, **kwargs) -> concurrent.futures.Future:
        """Queues one request of k rows (lists of k values, or arrays with leading axis k).

        The rows stay together in one batch; more than max_batch_size rows are split over several
        batches and reassembled. The Future's result holds the k results (a list, or arrays).
        """
        return self.submit_request(args, kwargs, rows=True, priority=priority, timeout=timeout)

    def submit_many(self, items: Iterable, *, priority: int = 0, timeout: float | None = None) -> list[concurrent.futures.Future]:
        """Queues many single-argument inputs at once; one Future each, in order."""
        return self._submit_all([(item,) for item in items], priority, timeout)

    def map(self, *iterables: Iterable, timeout: float | None = None) -> Iterator:
        """As `concurrent.futures.Executor.map`: queues one request per zipped tuple of arguments
        at once and returns an iterator of their results in order. A result that raised raises
        when the iterator reaches it; `timeout` (seconds from this call) raises TimeoutError when
        a result is not ready in time; requests not yet run are cancelled when the iterator is
        closed early."""
        end = None if timeout is None else _clock() + timeout
        futures = self._submit_all(list(zip(*iterables)), 0, None)

        def results():
            try:
                futures.reverse()
                while futures:
                    f = futures.pop()
                    yield f.result(None if end is None else end - _clock())
            finally:
                for f in futures:
                    f.cancel()

        return results()

    async def acall(self, *args, priority: int = 0, timeout: float | None = None, **kwargs):
        """`await svc.acall(x)`: the result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit_request(args, kwargs, priority=priority, timeout=timeout))

    def _level(self, priority: int, call_size: int) -> int:
        """The queue level of a request: its priority, split by small_batch_threshold when set
        (twice the priority, plus one for a small call: higher priorities still go first)."""
        threshold = self.small_batch_threshold
        return priority if threshold is None else 2 * priority + (call_size <= threshold)

    def submit_request(self, args: tuple, kwargs: dict, *, rows: bool = False, priority: int = 0,
                       timeout: float | None = None, caller: Caller | None = None) -> concurrent.futures.Future:
        """The general form of `submit` (and `submit_rows` with rows=True), on behalf of `caller`."""
        future = concurrent.futures.Future()
        now = _clock()
        try:
            num_rows = self.collator.count_rows(args, kwargs) if rows else None
            values = self.collator.prepare(args, kwargs, num_rows)
        except InvalidRequest as e:
            self.record_invalid()
            future.set_exception(e)
            return future
        priority = self._level(priority, num_rows or 1)
        deadline = None if timeout is None else now + timeout
        if num_rows is not None and num_rows > self.max_batch_size:
            self._enqueue_split(values, num_rows, priority, now, timeout, deadline, caller, future)
        else:
            r = Request(values, num_rows, priority, now, deadline, caller, future)
            self._worker.enqueue_one(r, now, timeout, True)
        return future

    def _submit_all(self, arg_tuples: list, priority: int, timeout: float | None) -> list:
        priority = self._level(priority, len(arg_tuples))
        now = _clock()
        deadline = None if timeout is None else now + timeout
        futures, requests = [], []
        for args in arg_tuples:
            f = concurrent.futures.Future()
            futures.append(f)
            try:
                values = self.collator.prepare(args, {}, None)
            except InvalidRequest as e:
                self.record_invalid()
                f.set_exception(e)
                continue
            requests.append(Request(values, None, priority, now, deadline, None, f))
        refused = self._enqueue_all(requests, now, timeout) if requests else None
        if refused is not None:  # those before it are queued and will run; the rest hold why
            for rest in requests[refused[0]:]:
                rest.future.set_exception(refused[1])
        return futures

    def _enqueue_all(self, requests: list, now: float, timeout: float | None):
        """Queues requests (one at a time if bounded); (index, error) of the first refused, or None."""
        if self.max_queue is None:
            self._worker.enqueue(requests, now, timeout)
            return None
        for i, r in enumerate(requests):
            try:
                self._worker.enqueue_one(r, now, timeout, True)
            except (QueueFull, ServiceClosed, DeadlineExceeded) as e:
                return i, e
        return None

    def _enqueue_split(self, values, num_rows, priority, now, timeout, deadline, caller, future) -> None:
        """Queues a request of more than max_batch_size rows as parts of at most that many rows."""
        step = self.max_batch_size
        starts = range(0, num_rows, step)
        split = SplitRequest(future, len(starts), self.collator.join)
        parts = []
        for i, s in enumerate(starts):
            k = min(step, num_rows - s)
            r = Request(self.collator.slice_rows(values, s, s + k), k, priority, now, deadline, caller, None)
            r.parent, r.index = split, i
            parts.append(r)
        refused = self._enqueue_all(parts, now, timeout)
        if refused is not None:
            i, error = refused
            if i == 0:
                raise error
            split.part_done(i, None, error)  # parts already queued are dropped when taken: it failed

    # ------------------------------------------------------------------ blocking calls

    def __call__(self, *args, timeout: float | None = None, priority: int = 0, **kwargs):
        """Runs one input through the service and returns its result, blocking the caller."""
        return self.call_request(args, kwargs, timeout=timeout, priority=priority)

    def call_rows(self, *args, timeout: float | None = None, priority: int = 0, **kwargs):
        """Blocking form of `submit_rows`."""
        return self.call_request(args, kwargs, rows=True, timeout=timeout, priority=priority)

    def call_request(self, args: tuple, kwargs: dict, *, rows: bool = False, timeout: float | None = None,
                     priority: int = 0, caller: Caller | None = None):
        """The general form of `__call__` (and `call_rows` with rows=True), on behalf of `caller`
        (default: the calling thread's own known caller)."""
        num_rows = None
        try:
            if rows:
                num_rows = self.collator.count_rows(args, kwargs)
                if num_rows > self.max_batch_size:  # split over several batches: the Future path
                    now = _clock()
                    future = self.submit_request(args, kwargs, rows=True, priority=priority, timeout=timeout,
                                                 caller=caller)
                    try:
                        return future.result(None if timeout is None else max(0.0, now + timeout - _clock()))
                    except concurrent.futures.TimeoutError:
                        future.cancel()  # parts not started yet are dropped (see SplitRequest.abandon)
                        raise DeadlineExceeded(f"no result from service {self.name!r} within {timeout} s") from None
            if num_rows is None and not kwargs and len(args) == self._fast_arity:
                values = args  # plain positional list-mode call: nothing to check or reorder
            else:
                values = self.collator.prepare(args, kwargs, num_rows)
        except InvalidRequest:
            self.record_invalid()
            raise  # a blocking caller gets its InvalidRequest at once
        if self.small_batch_threshold is not None:
            priority = self._level(priority, num_rows or 1)
        return self.call_prepared(values, num_rows, timeout, priority, caller)

    def call_prepared(self, values, rows: int | None = None, timeout: float | None = None, priority: int = 0,
                      caller: Caller | None = None):
        """The blocking call of one request whose values the collator has already prepared
        (`collator.prepare`'s output): the fast path for front ends that check their own inputs.
        `rows`: None for one row, else the request's row count (at most max_batch_size)."""
        now = _clock()
        if caller is None and self._thread_callers is not None:
            caller = self._thread_callers.get()
        deadline = None if timeout is None else now + timeout
        req = None
        if caller is not None:
            try:
                req = caller.spares.pop()
            except IndexError:
                pass
        if req is None:
            req = Request(values, rows, priority, now, deadline, caller, None)
            req.lock = lock = threading.Lock()
            lock.acquire()
        else:
            req.values, req.rows, req.priority, req.t0, req.deadline = values, rows, priority, now, deadline
            req.state = PENDING
        worker = self._worker
        worker.enqueue_one(req, now, timeout, timeout is not None or rows is not None)
        if timeout is None:
            wait_turn(req, worker.relay_helpers)
        elif not req.lock.acquire(timeout=max(0.0, deadline - _clock())):  # time spent waiting for room counts
            with worker.lock:
                if req.state == PENDING:
                    req.state = CANCELLED
            raise DeadlineExceeded(f"no result from service {self.name!r} within {timeout} s")
        value, error = req.value, req.error
        if caller is not None and deadline is None:
            # Done with it (the worker let go of it before releasing its lock). A request that had
            # a deadline is not reused: the deadline heap may still hold an entry for it.
            req.values = req.value = req.error = req.baton = None
            caller.spares.append(req)
        if error is not None:
            raise error
        return value

    def call_inline(self, values, rows: int | None = None):
        """Runs one prepared request (`rows`: None for one row, else at most max_batch_size) as a batch of
        its own in the calling thread, no queue, no hand-off; calls from several threads run at once.
        ServiceClosed once closing; TypeError where batches need the worker thread."""
        return self._worker.run_inline(values, rows)

    def own_batch_hooks(self):
        """(begin, end) for a front end that runs its own batch (PolicyService's inline fast path):
        begin(rows) counts it (ServiceClosed once closing) -> start; end(rows, bucket, start, failed)."""
        return self._worker.begin_own_batch, self._worker.runner.record_own_batch

    def record_invalid(self, n: int = 1) -> None:
        """Counts requests refused for their inputs, also by a front end's own checks (stats.invalid)."""
        with self._worker.lock:
            self._stats.invalid += n

    # ------------------------------------------------------------------ known callers

    def register(self, *, keep_alive: Any = None) -> Caller:
        """A registered caller whose requests count towards early flush; close it when done.

        For a known set of callers (actor threads): once every one has a request waiting, the batch
        goes. `keep_alive`: kept alive until closed (a decorated method's instance, whose collection
        would close the service)."""
        caller = Caller(self, holds=keep_alive)
        self.add_caller(caller)
        return caller

    def add_caller(self, caller: Caller) -> None:
        """Starts counting `caller` (ServiceClosed once closed)."""
        self._worker.add_caller(caller)

    def remove_caller(self, caller: Caller) -> None:
        """Stops counting `caller` for good; idempotent."""
        self._worker.remove_caller(caller)

    def set_caller_active(self, caller: Caller, active: bool) -> None:
        """Pauses (False) or resumes (True) counting `caller`."""
        self._worker.set_active(caller, active)

    # ------------------------------------------------------------------ lifecycle and stats

    @property
    def stats(self) -> ServiceStats:
        return self._worker.snapshot()

    def latency_samples(self) -> list:
        """Recent request latencies in seconds (submit to result), for plots and reports."""
        return list(self._stats.latencies)

    @property
    def closed(self) -> bool:
        return self._worker.closing

    def start(self) -> "BatchedService":
        """Starts the worker now (a service made with start=False); idempotent."""
        self._worker.start()
        return self

    def close(self, wait: bool = True, *, cancel_pending: bool = False, timeout: float | None = None) -> bool:
        """Stops the service. Safe to call more than once.

        Queued requests run (drained without waiting for max_delay), or with `cancel_pending=True`
        fail with ServiceClosed (except the rest of a split request whose first part ran); later
        submits raise ServiceClosed. `wait=True` joins the worker threads for at most `timeout` s:
        False if they still ran then; once they have ended, any request still queued has failed.
        """
        return self._worker.close(wait, cancel_pending, timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """`close` under `concurrent.futures.Executor.shutdown`'s name and arguments."""
        self._worker.close(wait, cancel_futures)

    stop = close  # as_a_service's name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return (f"BatchedService({self.name!r}, max_batch_size={self.max_batch_size}, "
                f"max_delay={self.max_delay}, {state}, pending={self._worker.queue.pending})")
