"""The seed libraries' batcher, the design the benchmarks compare rlbatch against.

`SeedStyleBatcher`: a queue.Queue of (item, Future), one worker that gathers up to
`max_batch_size` items or what came within `max_delay` of the first, calls `batch_fn(items) ->
results` (one result per item, in order) and sets one concurrent.futures.Future per item.
`StackedPolicyBatch` is a `batch_fn` for a jitted policy step (experiments.lib.policy_step):
np.stack, optional padding to a fixed size, one call, one result per row.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

__all__ = ["SeedStyleBatcher", "StackedPolicyBatch"]


class SeedStyleBatcher:
    """The seed libraries' design, for comparison: queue.Queue + one worker + one Future per item.

    `batch_fn(items: list) -> results` gets up to `max_batch_size` items (the first, and what came
    within `max_delay` seconds of it) and returns one result per item, in order. An exception it
    raises (any BaseException) goes to every future of its batch; the worker goes on.
    """

    def __init__(self, batch_fn: Callable[[list], Sequence], max_batch_size: int, max_delay: float,
                 *, name: str = "seed-style"):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"SeedStyleBatcher: max_batch_size must be a positive int, got {max_batch_size!r}")
        if not max_delay >= 0:
            raise ValueError(f"SeedStyleBatcher: max_delay must be >= 0 seconds, got {max_delay!r}")
        self.batch_fn, self.max_batch_size, self.max_delay = batch_fn, max_batch_size, max_delay
        self.batches = self.items = 0
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, item) -> concurrent.futures.Future:
        f: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # no item can slip in behind the sentinel
            if self._closed:
                raise RuntimeError("SeedStyleBatcher.submit: the batcher was closed")
            self._queue.put((item, f))
        return f

    def __call__(self, item):
        return self.submit(item).result()

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def _gather(self):
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_delay
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # seen again once this batch is done: the worker exits then
                break
            batch.append(item)
        return batch

    def _work(self):
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                results = self.batch_fn([x for x, _ in batch])
                self.batches += 1
                self.items += len(batch)
                for (_, f), y in zip(batch, results):
                    f.set_result(y)
            except BaseException as e:  # noqa: BLE001 - every waiting caller hears of it
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)

    def close(self) -> None:
        """Runs what was submitted, then stops the worker; safe to call twice."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StackedPolicyBatch:
    """A `batch_fn` for SeedStyleBatcher around a jitted policy step: one observation per item.

    np.stack's the observations ([n, ...]); with `pad_to`, pads every batch to `pad_to` rows by
    repeating the last one (a real row keeps the padding a valid input; zeros may not be one), so
    the step sees one shape; without, it sees the exact size, and every new size is a new
    compilation. Calls `step_fn(params, obs, key, i)` with i counting batches, copies the
    `(action, extras)` outputs to the host once, and returns `(action[j], {k: extras[k][j]})` per
    item. `batch_sizes` holds the sizes the step was called with.
    """

    def __init__(self, step_fn: Callable, params: Any, key, pad_to: int | None = None):
        self.step_fn, self.params, self.key, self.pad_to = step_fn, params, key, pad_to
        self.batch_sizes: set[int] = set()
        self._index = 0

    def __call__(self, observations: list) -> list:
        n = len(observations)
        obs = np.stack(observations)
        if self.pad_to is not None and n < self.pad_to:
            obs = np.concatenate([obs, np.repeat(obs[-1:], self.pad_to - n, axis=0)])
        self.batch_sizes.add(len(obs))
        action, extras = jax.device_get(self.step_fn(self.params, obs, self.key, np.uint32(self._index)))
        self._index += 1
        return [(action[j], {k: v[j] for k, v in extras.items()}) for j in range(n)]
