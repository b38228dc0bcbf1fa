"""The engine behind a BatchedService: one lock, the request queue, and the threads that run batches.

Threading model. Callers (threads or asyncio tasks) enqueue requests under `lock`. One worker
thread forms batches and calls the batch function; with `max_in_flight > 1` a second thread, the
completer, turns outputs into results while the worker already forms and dispatches the next batch
(JAX dispatch is asynchronous, so batch k+1 is prepared while batch k runs on the device). Nothing
polls: the worker blocks on a condition (with no timeout while the queue is empty, else until the
oldest request's max_delay or the first deadline), callers block on a lock or a Future, the
completer on a queue.

A batch goes as soon as one of these holds (the trigger is counted in the stats):
1. "full": it holds max_batch_size rows;
2. "callers" (early flush): every known caller has a request waiting, so nothing more can come from
   them until a batch runs. Callers whose requests are in a batch in flight do not count as
   waiting: they will be back when it completes, and flushing the few that arrived meanwhile would
   only make small batches;
3. "delay": its oldest request has waited max_delay seconds (the clock starts at its arrival);
4. "closing": the service is closing (the queue drains without waiting).
Submitters wake the worker only when one of these becomes true, not on every request.

Known callers. A caller from `register()` counts until it is closed (or while paused, not). A
thread that makes blocking calls is known implicitly: it counts from its first call until its
thread ends, or until it has made no call for `idle_horizon` seconds. That idleness is checked
only when a batch goes by its delay while some known caller is not waiting (nothing runs for it
otherwise), so a thread that stops calling holds the others back by at most max_delay once it
is past the horizon, and a thread that calls again counts again at once.

Errors never kill the worker: anything the batch function raises (BaseException too) goes to every
caller of that batch; an Exception instance in place of one result fails that caller alone; an
output that cannot be split back fails its batch with BatchOutputError.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from rlbatch.batching.queue import RequestQueue
from rlbatch.batching.relay import RelayHelpers
from rlbatch.batching.runner import BatchRunner
from rlbatch.batching.request import Request
from rlbatch.errors import DeadlineExceeded, InvalidRequest, QueueFull, ServiceClosed

_log = logging.getLogger("rlbatch")

__all__ = ["Worker"]

_clock = time.perf_counter


class Worker:
    """Owns the lock, the queue, the known callers and the worker threads of one service.

    The service is the public face (arguments, collation, blocking calls and Futures); everything
    that happens under the lock happens here.
    """

    def __init__(self, batch_fn, collator, stats, *, max_batch_size, max_delay, max_queue, on_full,
                 setup, max_in_flight, starvation_timeout, wake_width, idle_horizon, name, autostart=True):
        self.runner = BatchRunner(batch_fn, collator, stats, setup=setup, wake_width=wake_width, name=name)
        self.stats = stats
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.on_full = on_full
        self.starvation_timeout = starvation_timeout
        self.wake_width = wake_width
        self.idle_horizon = idle_horizon
        self.name = name
        # An RLock, because a garbage-collected instance may close its service from a finalizer
        # that runs in whichever thread dropped the last reference, possibly while holding it.
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        self._not_full = threading.Condition(self.lock)  # same lock: one consistent queue state
        self.queue = RequestQueue()
        self.implicit_callers: set = set()  # the threads' known callers, for the idle horizon
        self.closing = False
        self.closed_error: BaseException | None = None
        self._waiting = False  # the worker waits for a batch to become ready
        self._idle = False  # ... with nothing queued at all
        self._thread: threading.Thread | None = None
        self._completer: threading.Thread | None = None
        self._done_queue: queue.SimpleQueue | None = None
        self.max_in_flight = max_in_flight
        # Only a pipelined service needs the slot count (threading.Semaphore costs microseconds).
        self._slots = threading.Semaphore(max_in_flight) if max_in_flight > 1 else None
        self.dispatched = 0  # written by the worker only
        self.completed = 0  # written by the completer only
        self.relay_helpers = RelayHelpers(name)
        self._autostart = autostart  # start the threads on the first request (else on start())

    # ------------------------------------------------------------------ submitting (lock taken here)

    def check_open(self) -> None:
        """Raises ServiceClosed once closing (lock held)."""
        if self.closing:
            self.stats.rejected += 1
            raise ServiceClosed(f"service {self.name!r} is closed") from self.closed_error

    def enqueue_one(self, r, now: float, timeout: float | None, special: bool) -> None:
        """Queues one request: the per-request hot path (one lock, no loops; the worker is woken
        only when a batch can go). `special`: r is not a plain blocking call (see is_special)."""
        with self.lock:
            if self.closing:
                self.check_open()
            q = self.queue
            if self.max_queue is not None and q.pending >= self.max_queue:
                self._wait_for_room(1, now, timeout)
            if self._thread is None and self._autostart:
                self._start()
            c = r.caller
            if c is not None:
                c.last_call = now
                if not c.active and c.implicit:
                    q.set_active(c, True)  # an idle thread calls again: it counts again
            earliest = q.push(r, special)
            stats = self.stats
            stats.requests += 1
            stats.rows += 1 if r.rows is None else r.rows
            if self._waiting:
                if earliest:
                    self._cond.notify()  # a new first deadline: the worker waits for it instead
                self._wake_if_ready()

    def run_inline(self, values, rows: int | None):
        """BatchedService.call_inline: one request run as a batch of its own in the calling thread."""
        n = 1 if rows is None else rows
        if n > self.max_batch_size:
            raise InvalidRequest(f"call_inline: expected at most max_batch_size={self.max_batch_size} rows, got {n} "
                                 f"(call_rows splits a larger request over several batches)")
        runner = self.runner
        if runner.needs_worker_thread:
            raise TypeError(f"call_inline: service {self.name!r} runs its batches on its worker thread only "
                            f"(it has a setup context or an async batch function)")
        now = self.begin_own_batch(n)
        req = Request(values, rows, 0, now, None, None, None)
        req.lock = threading.Lock()  # completing a request releases its lock; nobody waits on this one
        req.lock.acquire()
        job = runner.dispatch([req], n, True)
        if job is not None:
            runner.finish(job)
        if req.error is not None:
            raise req.error
        return req.value

    def begin_own_batch(self, n: int) -> float:
        """Counts a request of n rows that its caller runs as a batch of its own (run_inline, or a
        front end's own fast path), or ServiceClosed once closing; the time it started."""
        with self.lock:
            self.check_open()
            self.stats.requests += 1
            self.stats.rows += n
        return _clock()

    def enqueue(self, requests, now: float, timeout: float | None) -> None:
        """Queues several requests at once (all or none: the queue must have room for all)."""
        with self.lock:
            self.check_open()
            q = self.queue
            if self.max_queue is not None and q.pending + len(requests) > self.max_queue:
                self._wait_for_room(len(requests), now, timeout)
            if self._thread is None and self._autostart:
                self._start()
            for r in requests:
                if r.caller is not None:
                    r.caller.last_call = now
            earliest = q.push_many(requests)
            self.stats.requests += len(requests)
            self.stats.rows += sum(r.num_rows for r in requests)
            if self._waiting:
                if earliest:
                    self._cond.notify()
                self._wake_if_ready()

    def _wait_for_room(self, n: int, now: float, timeout: float | None) -> None:
        if self.on_full == "raise" or n > self.max_queue:
            self.stats.rejected += 1
            raise QueueFull(
                f"service {self.name!r} has {self.queue.pending} requests queued (max_queue={self.max_queue}); "
                f"a request of {n} more does not fit; try again later")
        end = None if timeout is None else now + timeout
        while self.queue.pending + n > self.max_queue and not self.closing:
            remaining = None if end is None else end - _clock()
            if remaining is not None and remaining <= 0:
                self.stats.rejected += 1
                raise DeadlineExceeded(f"service {self.name!r} stayed full for {timeout} s")
            self._not_full.wait(remaining)
        if self.closing:
            self.stats.rejected += 1
            raise ServiceClosed(f"service {self.name!r} closed while waiting for room in its queue")

    def _wake_if_ready(self) -> None:
        # Lock held, worker waiting. Wakes it only when a batch can go now, and clears the flag so
        # that the submitters that follow before it runs do not notify again.
        q = self.queue
        if self._idle or q.pending_rows >= self.max_batch_size or self.closing or q.all_callers_waiting:
            self._waiting = self._idle = False
            self._cond.notify()

    def wake(self) -> None:
        """Makes a waiting worker look at its queue again (after a settings change)."""
        with self.lock:
            self._cond.notify_all()

    def set_active(self, caller, active: bool) -> None:
        """Counts a caller towards early flush, or stops counting it."""
        with self.lock:
            if not caller.closed:
                self.queue.set_active(caller, active)
                if self._waiting:
                    self._wake_if_ready()

    def add_caller(self, caller) -> None:
        with self.lock:
            self.check_open()
            self.queue.set_active(caller, True)
            if caller.implicit:
                self.implicit_callers.add(caller)

    def remove_caller(self, caller) -> None:
        with self.lock:
            if caller.closed:
                return
            self.queue.set_active(caller, False)
            caller.closed = True
            self.implicit_callers.discard(caller)
            if self._waiting:
                self._wake_if_ready()

    def _forget_idle_callers(self, now: float) -> None:
        # Lock held; a batch goes by its delay while some known caller is not waiting.
        horizon = now - self.idle_horizon
        for c in list(self.implicit_callers):  # a copy: a thread may end and close its caller meanwhile
            if c.active and not c.outstanding and c.last_call < horizon:
                self.queue.set_active(c, False)

    # ------------------------------------------------------------------ the worker thread

    def start(self) -> None:
        """Starts the worker threads now (idempotent; ServiceClosed once closed)."""
        with self.lock:
            self.check_open()
            self._autostart = True
            if self._thread is None:
                self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"rlbatch-{self.name}", daemon=True)
        if self.max_in_flight > 1:
            self._done_queue = queue.SimpleQueue()
            self._completer = threading.Thread(target=self._complete_loop, name=f"rlbatch-{self.name}-done",
                                               daemon=True)
            self._completer.start()
        self._thread.start()

    def _next_batch(self):
        """Blocks until a batch may go or queued requests pass their deadline. Returns
        (`RequestQueue.take`'s batch or None, requests that expired in the queue); (None, []) once
        closed and drained."""
        q = self.queue
        with self.lock:
            while True:
                if q.next_deadline() is not None:
                    expired = q.expire(_clock())
                    if expired:
                        self.stats.timed_out += len(expired)
                        if self.max_queue is not None:
                            self._not_full.notify(len(expired))
                        return None, expired
                if not q.pending:
                    if self.closing:
                        return None, []
                    self._idle = self._waiting = True
                    self._cond.wait()
                    self._idle = self._waiting = False
                    continue
                if self.closing:
                    trigger = "closing"
                    break
                if q.pending_rows >= self.max_batch_size:
                    trigger = "full"
                    break
                if q.all_callers_waiting:
                    trigger = "callers"
                    break
                now = _clock()
                remaining = q.oldest_t0() + self.max_delay - now
                if remaining <= 0:
                    trigger = "delay"
                    if self.implicit_callers and q.waiting_callers < q.active_callers:
                        self._forget_idle_callers(now)
                    break
                first_deadline = q.next_deadline()
                if first_deadline is not None:  # wake when it passes, to fail its request then
                    remaining = min(remaining, first_deadline - now)
                self._waiting = True
                self._cond.wait(max(remaining, 0.0))
                self._waiting = False
            self.stats.triggers[trigger] += 1
            batch = q.take(self.max_batch_size, _clock(), self.starvation_timeout)
            if self.max_queue is not None:
                self._not_full.notify(len(batch[0]))
            return batch, []

    def _run(self) -> None:
        try:
            error = self.runner.set_up()
            if error is not None:
                self._fail_setup(error)
                return
            self._serve()
        finally:
            self.runner.tear_down()
            if self._done_queue is not None:
                self._done_queue.put(None)

    def _serve(self) -> None:
        while True:
            try:
                batch, expired = self._next_batch()
            except BaseException as e:  # noqa: BLE001 - the worker never dies
                self._fail_formation(e)
                continue
            if expired:
                now = _clock()
                self._complete(expired, [DeadlineExceeded(
                    f"request waited {now - r.t0:.4f} s in service {self.name!r}, past its deadline; it was not run")
                    for r in expired])
                continue
            if batch is None:
                break
            requests = batch[0]
            slots = self._slots
            if slots is not None:
                slots.acquire()  # bounds the batches dispatched and not yet completed
            job = None
            try:
                job = self.runner.dispatch(*batch)
            except BaseException as e:  # noqa: BLE001 - the worker never dies
                self._complete(requests, [e] * len(requests))
            finally:
                if job is None and slots is not None:
                    slots.release()
            if job is not None:
                if slots is not None:
                    self.dispatched += 1
                    self._done_queue.put(job)
                else:
                    self._finish(job)

    def _fail_formation(self, error: BaseException) -> None:
        """A fault while forming a batch (in rlbatch itself, not in the batch function): the
        requests queued fail with it. If none were queued, the fault is not in any request but in
        the machinery: the service closes rather than fail again at every wake-up."""
        _log.error("rlbatch: service %r failed to form a batch", self.name, exc_info=error)
        with self.lock:
            drained = self.queue.drain()
            if not drained:
                self.closing = True
                self.closed_error = error
            self._cond.notify_all()
            self._not_full.notify_all()
        self._complete(drained, [error] * len(drained))

    def _fail_setup(self, error: BaseException) -> None:
        with self.lock:
            self.closing = True
            self.closed_error = error
            drained = self.queue.drain()
            self._not_full.notify_all()
        err = ServiceClosed(f"setup of service {self.name!r} failed: {error!r}")
        err.__cause__ = error
        self._complete(drained, [err] * len(drained))
        if self._done_queue is not None:
            self._done_queue.put(None)

    def _complete_loop(self) -> None:
        while True:
            job = self._done_queue.get()
            if job is None:
                return
            self._finish(job)
            self.completed += 1

    def _finish(self, job) -> None:
        self.runner.finish(job, self._slots.release if self._slots is not None else None)

    def _complete(self, requests, results) -> None:
        self.runner.complete(requests, results)

    # ------------------------------------------------------------------ lifecycle

    def close(self, wait: bool, cancel_pending: bool, timeout: float | None = None) -> bool:
        """Closes; see BatchedService.close. Returns False when `timeout` passed before the worker
        threads ended."""
        drained = []
        with self.lock:
            self.closing = True
            if cancel_pending:
                drained = self.queue.drain(keep_started=True)
            if self._thread is None and self.queue.pending:
                self._start()  # never started: it runs what is queued, then ends
            self._cond.notify_all()
            self._not_full.notify_all()
        if drained:
            self.stats.cancelled += len(drained)
            err = ServiceClosed(f"service {self.name!r} closed before this request ran")
            self._complete(drained, [err] * len(drained))
        me = threading.current_thread()
        if not wait or me is self._thread or me is self._completer:
            # Called from inside the batch function, close cannot wait for its own thread.
            return True
        end = None if timeout is None else _clock() + timeout
        for t in self.threads:
            t.join(None if end is None else max(0.0, end - _clock()))
        if any(t.is_alive() for t in self.threads):
            return False
        # Whatever the worker's state, no request is left waiting: anything still queued now (a
        # worker that ended early) fails.
        with self.lock:
            left = self.queue.drain()
        if left:
            self._complete(left, [ServiceClosed(f"service {self.name!r} closed before this request ran")] * len(left))
        self.relay_helpers.join()  # every request is complete now, so each has had its turn
        return True

    @property
    def waiting(self) -> bool:
        """The worker blocks waiting for a batch to become ready (for tests and monitors)."""
        return self._waiting

    @property
    def idle(self) -> bool:
        """The worker blocks with nothing queued."""
        return self._idle

    @property
    def threads(self) -> tuple:
        """The worker thread and, when pipelined, the completer (once started)."""
        return tuple(t for t in (self._thread, self._completer) if t is not None)

    def snapshot(self):
        return self.stats.snapshot(self.queue.pending, self.dispatched - self.completed,
                                   self.queue.active_callers)
