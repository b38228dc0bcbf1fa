"""Running one batch: drop what is no longer wanted, collate, call the batch function, split the
output, record the statistics and complete every request (rlbatch.batching.request.complete).

The worker thread calls `dispatch`; `finish` runs on the worker too, or on the completer thread
when batches are pipelined (`max_in_flight > 1`); a caller that runs its own batch
(`BatchedService.call_inline`) calls both in its own thread. Neither raises: whatever goes wrong in
a batch reaches that batch's callers and the worker serves on.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from rlbatch.batching.request import WAS_CANCELLED, complete
from rlbatch.errors import BatchOutputError, DeadlineExceeded

__all__ = ["BatchRunner"]

_clock = time.perf_counter
_log = logging.getLogger("rlbatch")


class BatchRunner:
    """Runs the batches of one service: its batch function, collator and statistics."""

    def __init__(self, batch_fn, collator, stats, *, setup, wake_width, name):
        self.batch_fn = batch_fn
        self.collator = collator
        self.stats = stats
        self.wake_width = wake_width
        self.name = name
        self._setup = setup
        self._context = None
        self._pass_num_valid = collator.passes_num_valid
        self._loop: asyncio.AbstractEventLoop | None = None  # see _event_loop
        # Batches may finish in several threads at once (the completer, callers running their own
        # batches inline): the statistics are updated under this lock, never a result computed.
        self._stats_lock = threading.Lock()

    @property
    def needs_worker_thread(self) -> bool:
        """Batches must run on the worker thread: a setup context made there, or an async batch
        function run on the worker's own event loop."""
        return self._setup is not None or asyncio.iscoroutinefunction(self.batch_fn)

    def set_up(self) -> BaseException | None:
        """Runs `setup` on the worker thread before the first batch; returns what it raised."""
        if self._setup is not None:
            try:
                self._context = self._setup()
            except BaseException as e:  # noqa: BLE001 - every waiting caller must hear of it
                return e
        return None

    def tear_down(self) -> None:
        if self._loop is not None:
            self._loop.close()

    def dispatch(self, requests, num_rows, plain):
        """Drops cancelled and expired requests, then calls the batch function on the rest.
        Returns the job to finish, or None when nothing was left to run (or the call failed)."""
        now = _clock()
        if plain:  # the common case: blocking calls, no deadline, none cancelled
            return self._call_batch_fn(requests, num_rows, now, True)
        live, dead, dead_results = [], [], []
        for r in requests:
            if r.deadline is not None and now > r.deadline and (r.parent is None or not r.parent.started):
                # (the rest of a split request whose first part ran runs too: see SplitRequest.abandon)
                dead.append(r)
                dead_results.append(DeadlineExceeded(
                    f"request waited {now - r.t0:.4f} s in service {self.name!r}, past its deadline; it was not run"))
                self.stats.timed_out += 1
            elif r.claim():
                live.append(r)
            else:
                dead.append(r)
                dead_results.append(WAS_CANCELLED)
                self.stats.cancelled += 1
        if dead:
            self.complete(dead, dead_results)
        if not live:
            return None
        return self._call_batch_fn(live, sum([r.num_rows for r in live]), now, False)

    def _call_batch_fn(self, live, num_rows, now, plain):
        ctx = None
        try:
            with self._stats_lock:
                self.stats.queue_waits.extend([now - r.t0 for r in live])
            args, kwargs, ctx, padded = self.collator.gather(live, num_rows)
            if self._pass_num_valid:
                kwargs["num_valid"] = num_rows
            if self._setup is not None:
                output = self.batch_fn(self._context, *args, **kwargs)
            else:
                output = self.batch_fn(*args, **kwargs)
            if asyncio.iscoroutine(output):  # an `async def` batch function
                output = self._event_loop().run_until_complete(output)
        except BaseException as e:  # noqa: BLE001 - reaches every caller of this batch
            with self._stats_lock:
                self.stats.errors += len(live)
            try:
                if ctx is not None:
                    self.collator.release(ctx)
                with self._stats_lock:
                    self.stats.record_batch(num_rows, None, _clock() - now)
            except Exception:  # noqa: BLE001 - the callers must still hear of e
                _log.exception("rlbatch: service %r could not clean up after a failed batch", self.name)
            self.complete(live, [e] * len(live))
            return None
        return live, output, ctx, num_rows, padded, now, plain

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The worker's own event loop for async batch functions: made on first use, in the worker
        thread, and closed when the worker ends (it is never the callers' loop)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop

    def finish(self, job, release_slot=None) -> None:
        live, output, ctx, num_rows, padded, t_start, plain = job
        try:
            try:
                results = self.collator.scatter(output, live, num_rows, ctx)
                if len(results) != len(live):
                    raise BatchOutputError(f"the batch output split into {len(results)} results for "
                                           f"{len(live)} requests ({num_rows} rows); expected one per request")
            except BaseException as e:  # noqa: BLE001 - a bad output fails its batch only
                with self._stats_lock:
                    self.stats.errors += len(live)
                results = [e] * len(live)
                plain = False
            finally:
                if ctx is not None:
                    self.collator.release(ctx)
        finally:
            if release_slot is not None:
                release_slot()  # the worker may dispatch the next batch while these callers wake
        now = _clock()
        try:
            with self._stats_lock:
                self.stats.record_batch(num_rows, padded, now - t_start)
                self.stats.latencies.extend([now - r.t0 for r in live])
        except Exception:  # noqa: BLE001 - statistics never cost a caller its result
            _log.exception("rlbatch: service %r could not record a batch's statistics", self.name)
        # A plain batch of a collator whose results are always values needs no per-request checks.
        self.complete(live, results, plain and self.collator.results_are_values)

    def record_own_batch(self, num_rows: int, bucket: int | None, t_start: float, failed: bool) -> None:
        """The statistics of a batch of one request that a front end ran in its caller's thread
        without this runner (PolicyService's inline fast path), as `finish` records a batch."""
        now = _clock()
        with self._stats_lock:
            stats = self.stats
            stats.queue_waits.append(0.0)
            if failed:
                stats.errors += 1
                stats.record_batch(num_rows, None, now - t_start)
            else:
                stats.record_batch(num_rows, bucket, now - t_start)
                stats.latencies.append(now - t_start)

    def complete(self, requests, results, plain: bool = False) -> None:
        complete(requests, results, self.wake_width, plain, self.name)
