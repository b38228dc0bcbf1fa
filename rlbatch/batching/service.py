"""BatchedService: many callers, one input each; one worker, one batch function call per batch.

Threading model
---------------
Callers (threads or asyncio tasks) enqueue requests under one lock (`_cond`). A single worker thread
forms batches and calls the batch function; with `max_in_flight > 1` a second thread, the completer,
turns the outputs into results while the worker already forms and dispatches the next batch (JAX
dispatch is asynchronous, so batch k+1 is prepared while batch k runs on the device).
Nothing polls: the worker blocks on `_cond` (with no timeout while the queue is empty, and with the
oldest request's remaining delay otherwise), callers block on a lock or a Future, the completer on
a queue.

Batch formation
---------------
A batch goes as soon as one of these holds:
1. it holds `max_batch_size` rows;
2. its oldest request has waited `max_delay` seconds (the clock starts at that request's arrival);
3. early flush: every registered caller (`register()`) has a request waiting in the queue, so
   nothing more can come from them until a batch runs. Callers whose requests are already in a
   batch in flight do not count as waiting: they will be back as soon as it completes, and
   flushing the few that arrived meanwhile would only make small batches;
4. the service is closing (the queue is drained without waiting).
Submitters wake the worker only when one of these becomes true, not on every request.

Priorities: higher `priority` first, FIFO within a level. A request that has waited longer than
`starvation_timeout` is taken before any higher level, so no request waits more than that plus
the batches already ahead of it.

Errors never kill the worker: anything the batch function raises (BaseException too) goes to every
caller of that batch; an Exception instance in place of one result fails that caller alone; an
output that cannot be split back fails its batch with BatchOutputError; invalid inputs are refused
at submit time and fail their own request only.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import jax

from rlbatch.batching.relay import relay_width
from rlbatch.batching.collate import ArgSpec, ArrayCodec, CallCodec, ListCodec
from rlbatch.errors import BatchOutputError, DeadlineExceeded, InvalidRequest, QueueFull, ServiceClosed
from rlbatch.batching.stats import ServiceStats, StatsRecorder

__all__ = ["BatchedService", "Caller"]

_PENDING, _TAKEN, _DONE, _CANCELLED = 0, 1, 2, 3
_log = logging.getLogger("rlbatch")
_WAS_CANCELLED = object()  # in place of a result in _complete: the request was cancelled, not run
_clock = time.perf_counter


def _pass_baton(req) -> None:
    """Waits for req's turn in its relay in place of its caller, then wakes the next caller."""
    req.lock.acquire()
    if req.baton is not None:
        req.baton.lock.release()


def _is_special(r) -> bool:
    """Not a plain blocking call of one row without a deadline: a Future, a deadline, several rows
    or a part of a split request. `_take` checks each request only while some are queued."""
    return r.lock is None or r.deadline is not None or r.rows is not None


class _Request:
    """One queued request. Completed through a stdlib Future, or (blocking calls) a bare lock.

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
        self.state = _PENDING
        self.future = future
        self.lock = None
        self.value = None
        self.error = None
        self.parent = None
        self.index = 0
        self.baton = None

    def claim(self) -> bool:
        """Worker side, before running: False if the request was cancelled meanwhile."""
        if self.parent is not None:
            return self.parent.claim_part()
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        return self.state == _TAKEN  # a blocking call: False if its caller timed out and left

    def finish(self, value) -> None:
        if self.parent is not None:
            self.parent.part_done(self.index, value, None)
        elif self.future is not None:
            self.future.set_result(value)
        else:
            self.value = value
            self.state = _DONE
            self.lock.release()

    def fail(self, error: BaseException) -> None:
        if self.parent is not None:
            self.parent.part_done(self.index, None, error)
        elif self.future is not None:
            if not self.future.done():
                if self.future.running() or self.future.set_running_or_notify_cancel():
                    self.future.set_exception(error)
        else:
            self.error = error
            self.state = _DONE
            self.lock.release()


class _Joined:
    """A request larger than max_batch_size, split into parts and reassembled in order."""

    def __init__(self, future, num_parts, join):
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
        """On close(cancel_pending=True): True, and no part may start, if none has started yet.

        False once a part has run: the rest of the request then runs too, so that no caller is told
        "not run" about a request whose function was partly applied.
        """
        with self._lock:
            if self._claimed and not self._failed:
                return False
            self._abandoned = True
            return True

    def part_done(self, index, value, error) -> None:
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
            if not self.future.done():
                if self.future.running() or self.future.set_running_or_notify_cancel():
                    self.future.set_exception(error)
            return
        try:
            self.future.set_result(self._join(self._results))
        except BaseException as e:  # noqa: BLE001 - a join error belongs to this caller
            self.future.set_exception(e)


class Caller:
    """A registered caller (an actor thread, say). See `BatchedService.register`.

    While every registered caller has a request waiting in the queue, the service knows no more
    requests are coming from them and sends the batch at once instead of waiting out `max_delay`.
    A registered caller should therefore call the service in a loop (an actor does); one that goes
    quiet for a while holds batches back by up to max_delay, and should `close()` when done.
    """

    def __init__(self, service: "BatchedService"):
        self._service = service
        self.outstanding = 0  # this caller's requests still in the queue
        self.closed = False
        self.active = True  # counted towards early flush: registered, not paused, not closed

    def submit(self, *args, priority: int = 0, timeout: float | None = None, **kwargs) -> concurrent.futures.Future:
        return self._service._submit(args, kwargs, priority=priority, deadline=timeout, caller=self)

    def submit_rows(self, *args, priority: int = 0, timeout: float | None = None, **kwargs) -> concurrent.futures.Future:
        return self._service._submit(args, kwargs, priority=priority, deadline=timeout, caller=self, rows=True)

    def __call__(self, *args, timeout: float | None = None, priority: int = 0, **kwargs):
        return self._service._call(args, kwargs, timeout, priority, caller=self)

    def call_rows(self, *args, timeout: float | None = None, priority: int = 0, **kwargs):
        return self._service._call(args, kwargs, timeout, priority, caller=self, rows=True)

    def pause(self) -> None:
        """Stops counting this caller towards early flush (it will be busy elsewhere for a while,
        e.g. an actor blocked on a full trajectory queue), until `resume()`."""
        self._service._set_active(self, False)

    def resume(self) -> None:
        self._service._set_active(self, True)

    def close(self) -> None:
        self._service._unregister(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
      wake_width: blocking callers of a finished batch are woken as this many relays (see _call);
        default: enough relays of at most 64 callers each, and at least 2.
      name: a name for the worker threads and messages.
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
        name: str | None = None,
        _codec=None,
    ):
        if not callable(batch_fn):
            raise TypeError(f"batch_fn must be callable, got {type(batch_fn).__name__}")
        if max_batch_size is None:
            max_batch_size = max(buckets) if buckets else 32
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        if not isinstance(max_delay, (int, float)) or max_delay < 0:
            raise ValueError(f"max_delay must be a number of seconds >= 0, got {max_delay!r}")
        if buckets is not None and max(buckets) < max_batch_size:
            raise ValueError(f"the largest bucket must hold max_batch_size={max_batch_size} rows, got buckets {tuple(buckets)}")
        if on_full not in ("block", "raise"):
            raise ValueError(f'on_full must be "block" or "raise", got {on_full!r}')
        if max_queue is not None and (not isinstance(max_queue, int) or max_queue < 1):
            raise ValueError(f"max_queue must be a positive int or None, got {max_queue!r}")
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a positive int, got {max_in_flight!r}")
        if wake_width is not None and (not isinstance(wake_width, int) or wake_width < 1):
            raise ValueError(f"wake_width must be a positive int or None (automatic), got {wake_width!r}")

        self.batch_fn = batch_fn
        self.max_batch_size = max_batch_size
        self.max_delay = float(max_delay)
        self.max_queue = max_queue
        self.on_full = on_full
        self.max_in_flight = max_in_flight
        self.starvation_timeout = float(starvation_timeout)
        self.wake_width = wake_width
        self.name = name or getattr(batch_fn, "__name__", "batch_fn")
        self._setup = setup
        if _codec is not None:
            self._codec = _codec
        else:
            argspec = ArgSpec(batch_fn, skip=1 if setup is not None else 0,
                              reserved=("num_valid",) if buckets is not None else ())
            if buckets is not None:
                self._codec = ArrayCodec(argspec, buckets, pad=pad, example=example)
            else:
                self._codec = ListCodec(argspec)
        self._pass_num_valid = isinstance(self._codec, ArrayCodec)
        argspec = getattr(self._codec, "argspec", None)
        self._fast_arity = (argspec.fast_arity if isinstance(self._codec, ListCodec) else -1)

        # An RLock, because a garbage-collected instance may close its service from a finalizer
        # that runs in whichever thread dropped the last reference, possibly while holding this lock.
        self._cond = threading.Condition(threading.RLock())
        self._lock = self._cond._lock  # `with self._lock` skips Condition's Python-level __enter__
        self._not_full = threading.Condition(self._lock)  # same lock: one consistent queue state
        self._levels: dict[int, collections.deque] = {0: collections.deque()}
        self._level_order = [0]  # priorities present, highest first
        self._pending = 0  # requests queued, not yet taken
        self._pending_rows = 0
        self._pending_special = 0  # queued requests that are not plain (see _is_special)
        self._deadlines: list = []  # heap of (deadline, seq, request) for queued requests with one
        self._deadline_seq = itertools.count()
        self._worker_waiting = False
        self._idle = False
        self._registered = 0
        self._outstanding_callers = 0
        self._closing = False
        self._closed_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._completer: threading.Thread | None = None
        self._done_queue: queue.SimpleQueue | None = None
        # Only a pipelined service needs the slot count (threading.Semaphore costs microseconds).
        self._in_flight = threading.Semaphore(max_in_flight) if max_in_flight > 1 else None
        self._dispatched = 0  # written by the worker only
        self._completed = 0  # written by the completer only
        self._context = None
        self._relay_helpers: list[threading.Thread] = []  # see _leave_relay; joined by close()
        self._stats = StatsRecorder(max_batch_size)

    # ------------------------------------------------------------------ submitting

    def submit(self, *args, priority: int = 0, timeout: float | None = None, **kwargs) -> concurrent.futures.Future:
        """Queues one input; returns a `concurrent.futures.Future` of its result.

        `timeout` is a deadline in seconds: if the request has not run by then it fails with
        DeadlineExceeded (a TimeoutError) without being run, at the deadline if it is still queued
        (while the worker waits for a batch to fill) or else when the worker next takes a batch.
        Invalid input gives a Future that already holds InvalidRequest.
        """
        return self._submit(args, kwargs, priority=priority, deadline=timeout)

    def submit_rows(self, *args, priority: int = 0, timeout: float | None = None, **kwargs) -> concurrent.futures.Future:
        """Queues one request of k rows (lists of k values, or arrays with leading axis k).

        The rows stay together in one batch; more than max_batch_size rows are split over several
        batches and reassembled. The Future's result holds the k results (a list, or arrays).
        """
        return self._submit(args, kwargs, priority=priority, deadline=timeout, rows=True)

    def submit_many(self, items: Iterable, *, priority: int = 0, timeout: float | None = None) -> list[concurrent.futures.Future]:
        """Queues many single-argument inputs at once (one lock acquisition); one Future each."""
        items = list(items)
        now = _clock()
        deadline = None if timeout is None else now + timeout
        futures, requests = [], []
        for item in items:
            f = concurrent.futures.Future()
            futures.append(f)
            try:
                values = self._codec.prepare((item,), {}, None)
            except InvalidRequest as e:
                self._count_invalid()
                f.set_exception(e)
                continue
            requests.append(_Request(values, None, priority, now, deadline, None, f))
        if self.max_queue is None:
            self._enqueue(requests, now)
        else:  # one at a time, so that a long list waits for room instead of being refused whole
            for i, r in enumerate(requests):
                try:
                    self._enqueue([r], now, deadline=timeout)
                except (QueueFull, ServiceClosed, DeadlineExceeded) as e:
                    # The items before this one are queued and will run: every item keeps its
                    # Future, and the ones refused hold why.
                    for rest in requests[i:]:
                        rest.future.set_exception(e)
                    break
        return futures

    def map(self, items: Iterable, *, timeout: float | None = None) -> list:
        """Results of many single-argument inputs, in order; raises the first error met."""
        futures = self.submit_many(items)
        end = None if timeout is None else _clock() + timeout
        return [f.result(None if end is None else max(0.0, end - _clock())) for f in futures]

    def __call__(self, *args, timeout: float | None = None, priority: int = 0, **kwargs):
        """Runs one input through the service and returns its result, blocking the caller."""
        return self._call(args, kwargs, timeout, priority, caller=None)

    def call_rows(self, *args, timeout: float | None = None, priority: int = 0, **kwargs):
        """Blocking form of `submit_rows`."""
        return self._call(args, kwargs, timeout, priority, caller=None, rows=True)

    async def acall(self, *args, priority: int = 0, timeout: float | None = None, **kwargs):
        """`await svc.acall(x)`: the result without blocking the event loop."""
        return await asyncio.wrap_future(self._submit(args, kwargs, priority=priority, deadline=timeout))

    def register(self) -> Caller:
        """Registers a caller whose requests count towards early flush; close it when done.

        Use it for a known set of callers (actor threads): when every registered caller has a
        request waiting, the batch goes at once. Unregistered requests are batched as usual.
        """
        with self._lock:
            self._check_open()
            self._registered += 1
        return Caller(self)

    def _unregister(self, caller: Caller) -> None:
        with self._lock:
            if caller.closed:
                return
            self._set_active_locked(caller, False)
            caller.closed = True

    def _set_active(self, caller: Caller, active: bool) -> None:
        with self._lock:
            if not caller.closed:
                self._set_active_locked(caller, active)

    def _set_active_locked(self, caller, active):
        if caller.active == active:
            return
        caller.active = active
        step = 1 if active else -1
        self._registered += step
        if caller.outstanding:
            self._outstanding_callers += step
        if self._worker_waiting:
            self._wake_if_ready()

    def _count_invalid(self):
        with self._lock:
            self._stats.invalid += 1

    def _check_open(self):
        if self._closing:
            self._stats.rejected += 1
            raise ServiceClosed(f"service {self.name!r} is closed") from self._closed_error

    def _submit(self, args, kwargs, *, priority=0, deadline=None, caller=None, rows=False):
        future = concurrent.futures.Future()
        now = _clock()
        try:
            num_rows = self._num_rows(args, kwargs) if rows else None
            values = self._codec.prepare(args, kwargs, num_rows)
        except InvalidRequest as e:
            self._count_invalid()
            future.set_exception(e)
            return future
        dl = None if deadline is None else now + deadline
        if num_rows is not None and num_rows > self.max_batch_size:
            parts = self._split(values, num_rows, priority, now, dl, caller, future)
            self._enqueue(parts, now, caller=caller, deadline=deadline)
        else:
            self._enqueue([_Request(values, num_rows, priority, now, dl, caller, future)], now,
                          caller=caller, deadline=deadline)
        return future

    def _num_rows(self, args, kwargs):
        first = next(itertools.chain(args, kwargs.values()), None)
        if first is None:
            raise InvalidRequest("a multi-row request needs at least one argument")
        try:
            if isinstance(self._codec, ArrayCodec):  # rows are the leading axis of every leaf
                n = len(jax.tree_util.tree_leaves(first)[0])
            else:  # rows are the entries of a list
                n = len(first)
        except (TypeError, IndexError):
            raise InvalidRequest(
                f"a multi-row request needs sequences or arrays with a leading row axis, got {type(first).__name__}") from None
        if n < 1:
            raise InvalidRequest("a multi-row request needs at least one row, got 0")
        return n

    def _split(self, values, num_rows, priority, now, deadline, caller, future):
        step = self.max_batch_size
        starts = list(range(0, num_rows, step))
        joined = _Joined(future, len(starts), self._codec.join)
        parts = []
        for i, s in enumerate(starts):
            k = min(step, num_rows - s)
            r = _Request(self._codec.slice_rows(values, s, s + k), k, priority, now, deadline, caller, None)
            r.parent, r.index = joined, i
            parts.append(r)
        return parts

    def _call(self, args, kwargs, timeout, priority, caller, rows=False):
        now = _clock()
        num_rows = None
        try:
            if rows:
                num_rows = self._num_rows(args, kwargs)
                if num_rows > self.max_batch_size:  # split over several batches: the Future path
                    future = self._submit(args, kwargs, priority=priority, deadline=timeout, caller=caller, rows=True)
                    try:
                        return future.result(None if timeout is None else max(0.0, now + timeout - _clock()))
                    except concurrent.futures.TimeoutError:
                        future.cancel()  # parts not started yet are dropped (see _Joined.abandon)
                        raise DeadlineExceeded(f"no result from service {self.name!r} within {timeout} s") from None
            if num_rows is None and not kwargs and len(args) == self._fast_arity:
                values = args  # plain positional list-mode call: nothing to check or reorder
            else:
                values = self._codec.prepare(args, kwargs, num_rows)
        except InvalidRequest:
            self._count_invalid()
            raise  # a blocking caller gets its InvalidRequest at once
        return self._call_prepared(values, num_rows, now, timeout, priority, caller)

    def _call_prepared(self, values, num_rows, now, timeout, priority, caller):
        """The blocking call of values already checked by the codec (`prepare`'s output).

        A registered caller reuses the request object of its last call, whose lock it holds
        again once woken: no allocation per call (a Caller used by two threads at once gives one
        of them a fresh request: dict.pop is atomic under the GIL).
        """
        deadline = None if timeout is None else now + timeout
        req = None if caller is None else caller.__dict__.pop("_spare", None)
        if req is None:
            req = _Request(values, num_rows, priority, now, deadline, caller, None)
            req.lock = lock = threading.Lock()
            lock.acquire()
        else:
            req.values, req.rows, req.priority, req.t0, req.deadline = values, num_rows, priority, now, deadline
            req.state = _PENDING
        self._enqueue_one(req, now, caller, timeout, timeout is not None or num_rows is not None)
        if timeout is None:
            # Relay wake-up: the worker wakes the first `wake_width` callers of a batch, and each
            # caller wakes the next of its relay once it has the GIL. Waking all at once makes
            # every woken thread contend for the GIL the worker holds (measured: relays are about
            # 2x faster with hundreds of callers); one relay per core overlaps the OS's wake-up
            # latency on both cores (measured +15-25% requests/s with 256 policy callers when a
            # hand-off costs 100-200 us, as on a loaded VM); chains longer than _RELAY_LENGTH
            # were slower again with the threads pinned to one CPU.
            got = False
            try:
                got = req.lock.acquire()
            finally:
                if got:  # this caller's turn: wake the next of its relay
                    if req.baton is not None:
                        req.baton.lock.release()
                else:
                    # Interrupted (Ctrl-C) before its turn came: leave at once, and let a helper
                    # thread take the turn when it comes and wake the next caller.
                    self._leave_relay(req)
        elif not req.lock.acquire(timeout=max(0.0, deadline - _clock())):  # time spent waiting for room counts
            with self._lock:
                if req.state == _PENDING:
                    req.state = _CANCELLED
            raise DeadlineExceeded(f"no result from service {self.name!r} within {timeout} s")
        value, error = req.value, req.error
        if caller is not None and deadline is None:
            # Done with it (the worker let go of it before releasing its lock). A request that had
            # a deadline is not reused: the deadline heap may still hold an entry for it.
            req.values = req.value = req.error = req.baton = None
            caller._spare = req
        if error is not None:
            raise error
        return value

    def _enqueue_one(self, r, now, caller, deadline, special=True):
        # The per-request hot path: one lock, no loops, the worker woken only when a batch can go.
        # `special`: r is not a plain blocking call (see _is_special); the caller knows which.
        with self._lock:
            if self._closing:
                self._check_open()
            if self.max_queue is not None and self._pending >= self.max_queue:
                self._wait_for_room(1, now, deadline)
            if self._thread is None:
                self._start()
            level = self._levels.get(r.priority)
            if level is None:
                level = self._new_level(r.priority)
            level.append(r)
            if special:
                self._pending_special += 1
                if r.deadline is not None:
                    self._push_deadlines((r,))
            rows = 1 if r.rows is None else r.rows
            self._pending += 1
            self._pending_rows += rows
            stats = self._stats
            stats.requests += 1
            stats.rows += rows
            if caller is not None:
                if caller.outstanding == 0 and caller.active:
                    self._outstanding_callers += 1
                caller.outstanding += 1
            if self._worker_waiting:
                self._wake_if_ready()

    def _enqueue(self, requests, now, caller=None, deadline=None):
        if len(requests) == 1:
            return self._enqueue_one(requests[0], now, caller, deadline, _is_special(requests[0]))
        if not requests:
            return
        with self._lock:
            self._check_open()
            if self.max_queue is not None and self._pending + len(requests) > self.max_queue:
                self._wait_for_room(len(requests), now, deadline)
            if self._thread is None:
                self._start()
            for r in requests:
                level = self._levels.get(r.priority)
                if level is None:
                    level = self._new_level(r.priority)
                level.append(r)
                self._pending_rows += 1 if r.rows is None else r.rows
            self._pending += len(requests)
            self._pending_special += sum(map(_is_special, requests))
            self._push_deadlines([r for r in requests if r.deadline is not None])
            self._stats.requests += len(requests)
            self._stats.rows += sum(1 if r.rows is None else r.rows for r in requests)
            if caller is not None:
                if caller.outstanding == 0 and caller.active:
                    self._outstanding_callers += 1
                caller.outstanding += len(requests)
            if self._worker_waiting:
                self._wake_if_ready()

    def _push_deadlines(self, requests):
        """Adds queued requests with deadlines to the heap (lock held). A waiting worker is woken
        when one of them is due before the time it is waiting for, so that it fails it on time."""
        heap = self._deadlines
        first = heap[0][0] if heap else None
        for r in requests:
            heapq.heappush(heap, (r.deadline, next(self._deadline_seq), r))
        if self._worker_waiting and heap and (first is None or heap[0][0] < first):
            self._cond.notify()

    def _new_level(self, priority):
        level = self._levels[priority] = collections.deque()
        self._level_order = sorted(self._levels, reverse=True)
        return level

    def _wait_for_room(self, n, now, deadline):
        if self.on_full == "raise" or n > self.max_queue:
            self._stats.rejected += 1
            raise QueueFull(
                f"service {self.name!r} has {self._pending} requests queued (max_queue={self.max_queue}); "
                "try again later")
        end = None if deadline is None else now + deadline
        while self._pending + n > self.max_queue and not self._closing:
            remaining = None if end is None else end - _clock()
            if remaining is not None and remaining <= 0:
                self._stats.rejected += 1
                raise DeadlineExceeded(f"service {self.name!r} stayed full for {deadline} s")
            self._not_full.wait(remaining)
        if self._closing:
            self._stats.rejected += 1
            raise ServiceClosed(f"service {self.name!r} closed while waiting for room in its queue")

    def _wake_if_ready(self):
        # Called with the lock held while the worker waits. Wakes it only when a batch can go now,
        # and clears the flag so the submitters that follow before it runs do not notify again.
        if (self._idle
                or self._pending_rows >= self.max_batch_size
                or self._closing
                or (self._registered and self._outstanding_callers >= self._registered and self._pending)):
            self._worker_waiting = self._idle = False
            self._cond.notify()

    # ------------------------------------------------------------------ worker

    def _start(self):
        self._thread = threading.Thread(target=self._worker, name=f"rlbatch-{self.name}", daemon=True)
        if self.max_in_flight > 1:
            self._done_queue = queue.SimpleQueue()
            self._completer = threading.Thread(target=self._complete_loop, name=f"rlbatch-{self.name}-done", daemon=True)
            self._completer.start()
        self._thread.start()

    def _oldest_t0(self):
        if len(self._levels) == 1:
            return self._levels[0][0].t0
        return min(level[0].t0 for level in self._levels.values() if level)

    def _next_batch(self):
        """Blocks until a batch may go or queued requests pass their deadline. Returns
        (`_take()`'s batch or None, requests that expired in the queue); (None, []) once closed
        and drained."""
        with self._lock:
            while True:
                if self._deadlines:
                    expired = self._expire_locked(_clock())
                    if expired:
                        return None, expired
                if not self._pending:
                    if self._closing:
                        return None, []
                    self._idle = self._worker_waiting = True
                    self._cond.wait()
                    self._idle = self._worker_waiting = False
                    continue
                if (self._closing or self._pending_rows >= self.max_batch_size
                        or (self._registered and self._outstanding_callers >= self._registered)):
                    break
                now = _clock()
                remaining = self._oldest_t0() + self.max_delay - now
                if remaining <= 0:
                    break
                if self._deadlines:  # wake when the first queued deadline passes, to fail it then
                    remaining = min(remaining, self._deadlines[0][0] - now)
                self._worker_waiting = True
                self._cond.wait(max(remaining, 0.0))
                self._worker_waiting = False
            return self._take(), []

    def _expire_locked(self, now):
        """Takes the queued requests whose deadline has passed off the queue (the rest of a split
        request that started running stays: see _Joined.abandon) and returns them."""
        heap, expired = self._deadlines, []
        while heap and (heap[0][2].state != _PENDING or heap[0][0] <= now):
            deadline, _, r = heapq.heappop(heap)
            if r.state != _PENDING:
                continue  # taken, drained or given up by its caller: nothing to do
            if r.parent is not None and not r.parent.abandon():
                continue
            self._levels[r.priority].remove(r)
            r.state = _TAKEN
            self._pending -= 1
            self._pending_rows -= 1 if r.rows is None else r.rows
            self._pending_special -= 1
            if r.caller is not None:
                self._caller_dequeued(r.caller)
            expired.append(r)
        if expired:
            self._stats.timed_out += len(expired)
            if self.max_queue is not None:
                self._not_full.notify(len(expired))
        return expired

    def _take(self):
        """Takes the next batch off the queue: (requests, rows, plain). `plain`: every request is a
        blocking call without a deadline, still wanted (nothing to drop before running)."""
        if not self._pending_special and len(self._level_order) == 1:
            return self._take_plain()
        now = _clock()
        capacity = self.max_batch_size
        taken = []
        plain = True
        order = self._level_order
        if len(order) > 1:
            starving = [lv for lv in order[1:] if self._levels[lv] and now - self._levels[lv][0].t0 > self.starvation_timeout]
            if starving:
                order = sorted(starving, key=lambda lv: self._levels[lv][0].t0) + order
        for lv in order:
            level = self._levels[lv]
            while level:
                r = level[0]
                k = 1 if r.rows is None else r.rows
                if k > capacity:
                    break
                level.popleft()
                capacity -= k
                taken.append(r)
                if r.lock is not None and r.state == _PENDING:
                    r.state = _TAKEN
                    if r.deadline is not None:
                        plain = False
                else:  # a Future, or a blocking call whose caller timed out and left
                    plain = False
                    if r.state == _PENDING:
                        r.state = _TAKEN  # off the queue (see _expire_locked)
                c = r.caller
                if c is not None:  # _caller_dequeued, inlined: this loop runs once per request
                    c.outstanding -= 1
                    if c.outstanding == 0 and c.active:
                        self._outstanding_callers -= 1
            if capacity == 0:
                break
        rows = self.max_batch_size - capacity
        self._pending -= len(taken)
        self._pending_rows -= rows
        self._pending_special -= sum(map(_is_special, taken))
        if self.max_queue is not None:
            self._not_full.notify(len(taken))
        return taken, rows, plain

    def _take_plain(self):
        """`_take` when every queued request is a plain blocking call of one row (one priority
        level, nothing special queued): the oldest max_batch_size of them, without per-request
        checks; their state stays _PENDING, which nothing reads for a plain call."""
        level = self._levels[self._level_order[0]]
        capacity = self.max_batch_size
        if len(level) <= capacity:
            taken = list(level)
            level.clear()
        else:
            popleft = level.popleft
            taken = [popleft() for _ in range(capacity)]
        left = 0  # registered callers that have no request queued any more
        for r in taken:
            c = r.caller
            if c is not None:
                c.outstanding -= 1
                if c.outstanding == 0 and c.active:
                    left += 1
        self._outstanding_callers -= left
        self._pending -= len(taken)
        self._pending_rows -= len(taken)
        if self.max_queue is not None:
            self._not_full.notify(len(taken))
        return taken, len(taken), True

    def _worker(self):
        if self._setup is not None:
            try:
                self._context = self._setup()
            except BaseException as e:  # noqa: BLE001 - every waiting caller must hear of it
                self._fail_setup(e)
                return
        while True:
            batch, expired = self._next_batch()
            if expired:
                now = _clock()
                self._complete(expired, [DeadlineExceeded(
                    f"request waited {now - r.t0:.4f} s in service {self.name!r}, past its deadline; it was not run")
                    for r in expired])
                continue
            if batch is None:
                break
            requests = batch[0]
            slots = self._in_flight
            if slots is not None:
                slots.acquire()  # bounds the batches dispatched and not yet completed
            job = None
            try:
                job = self._dispatch(*batch)
            except BaseException as e:  # noqa: BLE001 - the worker never dies
                self._complete(requests, [e] * len(requests))
            finally:
                if job is None and slots is not None:
                    slots.release()
            if job is not None:
                if slots is not None:
                    self._dispatched += 1
                    self._done_queue.put(job)
                else:
                    self._finish(job)
        if self._done_queue is not None:
            self._done_queue.put(None)

    def _fail_setup(self, error):
        with self._lock:
            self._closing = True
            self._closed_error = error
            drained = self._drain_locked()
            self._not_full.notify_all()
        err = ServiceClosed(f"setup of service {self.name!r} failed: {error!r}")
        err.__cause__ = error
        self._complete(drained, [err] * len(drained))
        if self._done_queue is not None:
            self._done_queue.put(None)

    def _caller_dequeued(self, caller):
        caller.outstanding -= 1
        if caller.outstanding == 0 and caller.active:
            self._outstanding_callers -= 1

    def _drain_locked(self, keep_started=False):
        """Empties the queue and returns what it held; `keep_started` keeps the remaining parts of
        split requests that already started running."""
        drained = []
        for level in self._levels.values():
            if keep_started and any(r.parent is not None for r in level):
                kept = []
                for r in level:
                    (kept if r.parent is not None and not r.parent.abandon() else drained).append(r)
                level.clear()
                level.extend(kept)
            else:
                drained.extend(level)
                level.clear()
        for r in drained:
            if r.state == _PENDING:
                r.state = _TAKEN  # off the queue (see _expire_locked)
            if r.caller is not None:
                self._caller_dequeued(r.caller)
        self._pending -= len(drained)
        self._pending_rows -= sum(1 if r.rows is None else r.rows for r in drained)
        self._pending_special -= sum(map(_is_special, drained))
        return drained

    def _dispatch(self, requests, num_rows, plain):
        """Drops cancelled and expired requests, then calls the batch function on the rest.

        Returns the job to finish, or None when nothing was left to run (or the call failed).
        """
        now = _clock()
        if plain:  # the common case: blocking calls, no deadline, none cancelled
            return self._call_batch_fn(requests, num_rows, now, True)
        live, dead, dead_errors = [], [], []
        for r in requests:
            if r.deadline is not None and now > r.deadline and (r.parent is None or not r.parent.started):
                # (the rest of a split request whose first part ran runs too: see _Joined.abandon)
                dead.append(r)
                dead_errors.append(DeadlineExceeded(
                    f"request waited {now - r.t0:.4f} s in service {self.name!r}, past its deadline; it was not run"))
                self._stats.timed_out += 1
            elif r.claim():
                live.append(r)
            else:
                dead.append(r)
                dead_errors.append(_WAS_CANCELLED)
                self._stats.cancelled += 1
        if dead:
            self._complete(dead, dead_errors)
        if not live:
            return None
        return self._call_batch_fn(live, sum([1 if r.rows is None else r.rows for r in live]), now, False)

    def _call_batch_fn(self, live, num_rows, now, plain):
        self._stats.queue_waits.extend([now - r.t0 for r in live])
        ctx = None
        try:
            args, kwargs, ctx, padded = self._codec.gather(live, num_rows)
            if self._pass_num_valid:
                kwargs["num_valid"] = num_rows
            if self._setup is not None:
                output = self.batch_fn(self._context, *args, **kwargs)
            else:
                output = self.batch_fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reaches every caller of this batch
            self._stats.errors += len(live)
            if ctx is not None:
                self._codec.release(ctx)
            self._stats.record_batch(num_rows, None, _clock() - now)
            self._complete(live, [e] * len(live))
            return None
        return (live, output, ctx, num_rows, padded, now, plain)

    def _complete_loop(self):
        while True:
            job = self._done_queue.get()
            if job is None:
                return
            self._finish(job)
            self._completed += 1

    def _finish(self, job):
        live, output, ctx, num_rows, padded, t_start, plain = job
        try:
            try:
                results = self._codec.scatter(output, live, num_rows, ctx)
                if len(results) != len(live):
                    raise BatchOutputError(f"the batch output split into {len(results)} results for "
                                           f"{len(live)} requests ({num_rows} rows); expected one per request")
            except BaseException as e:  # noqa: BLE001 - a bad output fails its batch only
                self._stats.errors += len(live)
                results = [e] * len(live)
                plain = False
            finally:
                if ctx is not None:
                    self._codec.release(ctx)
        finally:
            if self._in_flight is not None:
                self._in_flight.release()
        now = _clock()
        self._stats.record_batch(num_rows, padded, now - t_start)
        self._stats.latencies.extend([now - r.t0 for r in live])
        if plain and self._codec.results_are_values:
            # Every request is a blocking call without a deadline and every result a value (an
            # array codec's rows): hand them over without _complete's per-request checks.
            for r, res in zip(live, results):
                r.value = res
            self._relay(live)
        else:
            self._complete(live, results)

    def _complete(self, requests, results):
        """Hands each request its result: a value, an exception, or _WAS_CANCELLED."""
        relay = []
        for r, res in zip(requests, results):
            if r.lock is not None and r.deadline is None and res is not _WAS_CANCELLED:
                # Blocking callers are woken as a relay (see _call), not all at once.
                if isinstance(res, BaseException):
                    r.error = res
                else:
                    r.value = res
                r.state = _DONE
                relay.append(r)
                continue
            try:
                if res is _WAS_CANCELLED:  # a Future already says so; a blocking call's caller left
                    if r.lock is not None:
                        r.fail(concurrent.futures.CancelledError())
                elif isinstance(res, BaseException):
                    r.fail(res)
                else:
                    r.finish(res)
            except BaseException:  # noqa: BLE001 - the worker never dies, the other requests still complete
                # A done-callback of this caller's Future raised something concurrent.futures does
                # not catch itself (SystemExit, KeyboardInterrupt): report it, as it reports the rest.
                _log.exception("rlbatch: a done-callback of a Future from service %r raised", self.name)
        if relay:
            self._relay(relay)

    def _leave_relay(self, req):
        """A blocking caller that stops waiting (KeyboardInterrupt) still owes its relay a turn:
        a helper thread waits for it in the caller's place and passes the baton on."""
        helper = threading.Thread(target=_pass_baton, args=(req,), name=f"rlbatch-{self.name}-relay",
                                  daemon=True)
        with self._lock:
            self._relay_helpers = [t for t in self._relay_helpers if t.is_alive()]
            self._relay_helpers.append(helper)
        helper.start()

    def _relay(self, relay):
        """Wakes blocking callers whose results are set, as relays (see _call_prepared)."""
        width = relay_width(len(relay), self.wake_width)
        for a, b in zip(relay, relay[width:]):
            a.baton = b
        for head in relay[:width]:
            head.lock.release()

    # ------------------------------------------------------------------ lifecycle and stats

    @property
    def stats(self) -> ServiceStats:
        return self._stats.snapshot(self._pending, self._dispatched - self._completed)

    def latency_samples(self):
        """Recent request latencies in seconds (submit to result), for plots and reports."""
        return list(self._stats.latencies)

    @property
    def closed(self) -> bool:
        return self._closing

    def close(self, wait: bool = True, cancel_pending: bool = False) -> None:
        """Stops the service. Safe to call more than once.

        Requests already queued run to completion (the queue is drained without waiting for
        max_delay), or with `cancel_pending=True` fail at once with ServiceClosed (except the rest
        of a request split over several batches whose first part already ran). Later submits
        raise ServiceClosed. With `wait=True` the worker threads are joined before this returns.
        """
        drained = []
        with self._lock:
            if not self._closing:
                self._closing = True
            if cancel_pending:
                drained = self._drain_locked(keep_started=True)
            self._cond.notify_all()
            self._not_full.notify_all()
        if drained:
            err = ServiceClosed(f"service {self.name!r} closed before this request ran")
            self._stats.cancelled += len(drained)
            self._complete(drained, [err] * len(drained))
        me = threading.current_thread()
        if wait and me is not self._thread and me is not self._completer:
            # Called from inside the batch function, close cannot wait for its own thread.
            for t in (self._thread, self._completer):
                if t is not None:
                    t.join()
            with self._lock:
                helpers, self._relay_helpers = self._relay_helpers, []
            for t in helpers:  # every request is complete now, so each has had its turn
                t.join()

    stop = close  # as_a_service's name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closing else "open"
        return (f"BatchedService({self.name!r}, max_batch_size={self.max_batch_size}, "
                f"max_delay={self.max_delay}, {state}, pending={self._pending})")
