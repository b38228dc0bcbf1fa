"""batched's thread processor: `BatchProcessor` and `dynamically`, on an rlbatch.BatchedService.

    @batched.dynamically(batch_size=64, timeout_ms=5.0)
    def embed(texts: list[str]) -> list[list[float]]: ...

    embed("one")           # one item -> one result (blocks)
    embed(["a", "b"])      # a list is many items -> a list of results
    await embed.acall(x)   # the same without blocking an event loop

batched's rules kept: only a real `list` is many items (a tuple, an array or a dict is one item);
the items of a list call are queued one by one and may go in different batches; a call of at most
`small_batch_threshold` items goes before items of larger calls; `timeout_ms` is milliseconds.

What differs, on purpose: a batch goes as soon as it is full or when its oldest item has waited
`timeout_ms` (batched polled every `timeout_ms`, so even a full batch waited); items of equal rank
go first come, first served (batched's heap scrambled them); `async def` batch functions work (they
run on the worker's own event loop; batched failed with "coroutine has no len()"); a call after
`shutdown()` starts a fresh worker (batched hung forever); a wrong output length fails the batch's
callers with rlbatch.errors.BatchOutputError, also under `python -O` (batched: AssertionError).
"""
from __future__ import annotations

import asyncio
from typing import Callable, Generic

from rlbatch.batching.service import BatchedService
from rlbatch.compat.batched._core import ServiceSlot, check_settings, dynamic_batch
from rlbatch.compat.batched.types import BatchProcessorStats, T, U

__all__ = ["BatchProcessor", "dynamically"]


def _list_service(func: Callable, batch_size: int, timeout_ms: float, threshold: int | None) -> BatchedService:
    """A service whose batch function receives the list of items and returns a list of results."""

    def run_batch(items):  # one parameter whatever func's signature: a list of items
        return func(items)

    return BatchedService(run_batch, batch_size, timeout_ms / 1000.0, implicit_callers=False,
                          small_batch_threshold=threshold, name=getattr(func, "__name__", None))


class BatchProcessor(Generic[T, U]):
    """Batches the items of many threads' calls into calls of `func(list_of_items)`.

    Args:
      _func: the batch function: a list of items in, a list of as many results out (sync or async).
      batch_size: most items per batch.
      timeout_ms: milliseconds the oldest queued item may wait for the batch to fill.
      small_batch_threshold: calls of at most this many items go before larger calls.
    """

    def __init__(self, _func: Callable, batch_size: int = 32, timeout_ms: float = 5.0,
                 small_batch_threshold: int = 8):
        if not callable(_func):
            raise TypeError(f"the batch function must be callable, got {type(_func).__name__}")
        check_settings(batch_size, timeout_ms, small_batch_threshold)
        self.batch_func = _func
        self.batch_size = batch_size
        self.timeout_ms = timeout_ms
        self.small_batch_threshold = small_batch_threshold
        self._slot = ServiceSlot(lambda: _list_service(_func, batch_size, timeout_ms, small_batch_threshold))

    @property
    def _running(self) -> bool:
        return self._slot.running

    def start(self) -> None:
        """Starts the worker now (it otherwise starts on the first call); idempotent."""
        self._slot.start()

    def shutdown(self) -> None:
        """Runs what is queued, then stops and joins the worker; a later call starts a new one."""
        self._slot.shutdown()

    def shutdown_nowait(self) -> None:
        self._slot.shutdown_nowait()

    def __call__(self, items):
        service = self._slot.get()
        if isinstance(items, list):
            return list(service.map(items))
        return service(items)

    async def acall(self, items):
        service = self._slot.get()
        if isinstance(items, list):
            futures = service.submit_many(items)
            return list(await asyncio.gather(*[asyncio.wrap_future(f) for f in futures]))
        return await service.acall(items)

    @property
    def stats(self) -> BatchProcessorStats:
        return self._slot.stats()

    def __repr__(self):
        return (f"BatchProcessor({getattr(self.batch_func, '__name__', self.batch_func)!r}, "
                f"batch_size={self.batch_size}, timeout_ms={self.timeout_ms}, "
                f"small_batch_threshold={self.small_batch_threshold})")


def dynamically(func: Callable | None = None, /, batch_size: int = 32, timeout_ms: float = 5.0,
                small_batch_threshold: int = 8):
    """`@dynamically` or `@dynamically(batch_size=..., timeout_ms=..., small_batch_threshold=...)`
    on a batch function or method: returns a BatchProcessor (one per instance for a method)."""
    check_settings(batch_size, timeout_ms, small_batch_threshold)

    def make(f):
        return BatchProcessor(f, batch_size=batch_size, timeout_ms=timeout_ms,
                              small_batch_threshold=small_batch_threshold)

    return dynamic_batch(make, func)
