"""batched's asyncio processor: `await fn(x)` batches the items of many tasks.

    @batched.aio.dynamically(batch_size=64)
    async def embed(texts: list[str]) -> list[list[float]]: ...   # or a plain def

    await embed("one")          # one item -> one result
    await embed(["a", "b"])     # a list is many items -> a list of results

The batches run on an rlbatch.BatchedService worker (an `async def` batch function on the
worker's own event loop, a plain one on the worker thread), and a call awaits a thread-safe
Future. So a processor is bound to no event loop: batched 0.1.5 bound it to the loop of its first
call, and a second `asyncio.run` failed with "attached to a different loop".

Priorities (`priority_strategy`): NONE (default) is first come, first served; PRIORITY serves
calls of at most `small_batch_threshold` items first; LENGTH does too, then shorter items before
longer ones. `cache`: an AsyncCache; an item found in it is not batched, a computed result is
stored in it. `max_batch_length` is not supported (batches are bounded by `batch_size` only) and
raises; `batch_item_cls` (batched's internal queue item class) is not used.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Generic

from rlbatch.batching.service import BatchedService
from rlbatch.compat.batched._core import ServiceSlot, check_settings, dynamic_batch
from rlbatch.compat.batched.types import AsyncCache, BatchProcessorStats, PriorityStrategy, T, U
from rlbatch.compat.batched.utils import ensure_async

__all__ = ["AsyncBatchProcessor", "dynamically", "check_aio_extras"]


def check_aio_extras(max_batch_length, priority_strategy, cache) -> PriorityStrategy:
    if max_batch_length is not None:
        raise NotImplementedError(f"max_batch_length is not supported by rlbatch.compat.batched (batches "
                                  f"are bounded by batch_size only): expected None, got {max_batch_length!r}")
    try:
        strategy = PriorityStrategy(priority_strategy)
    except ValueError:
        raise ValueError(f"priority_strategy must be one of {[s.name for s in PriorityStrategy]}, "
                         f"got {priority_strategy!r}") from None
    if cache is not None and not isinstance(cache, AsyncCache):
        raise TypeError(f"cache must have async get/set/clear and stats() (types.AsyncCache), "
                        f"got {type(cache).__name__}")
    return strategy


class AsyncBatchProcessor(Generic[T, U]):
    """Batches the items of many tasks' `await processor(items)` into `func(list_of_items)` calls."""

    def __init__(self, func: Callable, *, batch_size: int = 32, timeout_ms: float = 5.0,
                 small_batch_threshold: int = 8, cache: AsyncCache | None = None,
                 max_batch_length: int | None = None, priority_strategy: PriorityStrategy = PriorityStrategy.NONE,
                 batch_item_cls: type | None = None):
        if not callable(func):
            raise TypeError(f"the batch function must be callable, got {type(func).__name__}")
        check_settings(batch_size, timeout_ms, small_batch_threshold)
        self.priority_strategy = check_aio_extras(max_batch_length, priority_strategy, cache)
        self.batch_func = ensure_async(func)  # batched's attribute; the worker calls `func` itself
        self.batch_size, self.timeout_ms = batch_size, timeout_ms
        self.small_batch_threshold = small_batch_threshold
        self.batch_item_cls = batch_item_cls
        self.cache = cache
        # NONE ignores the threshold, as batched's FIFO queue did.
        threshold = None if self.priority_strategy == PriorityStrategy.NONE else small_batch_threshold

        def run_batch(items):
            return func(items)

        self._slot = ServiceSlot(lambda: BatchedService(
            run_batch, batch_size, timeout_ms / 1000.0, implicit_callers=False,
            small_batch_threshold=threshold, name=getattr(func, "__name__", None)))

    def _submit(self, items: list) -> list:
        service = self._slot.get()
        if self.priority_strategy != PriorityStrategy.LENGTH or len(items) <= self.small_batch_threshold:
            return service.submit_many(items)
        # Shorter items first: each item its own priority, all below the small calls' (0).
        return [service.submit(item, priority=-_length(item)) for item in items]

    async def _schedule(self, items: list) -> list:
        if self.cache is None:
            return list(await asyncio.gather(*[asyncio.wrap_future(f) for f in self._submit(items)]))
        results = [await self.cache.get(item) for item in items]
        missing = [i for i, r in enumerate(results) if r is None]
        if missing:
            futures = self._submit([items[i] for i in missing])
            computed = await asyncio.gather(*[asyncio.wrap_future(f) for f in futures])
            for i, value in zip(missing, computed):
                results[i] = value
                await self.cache.set(items[i], value)
        return results

    async def __call__(self, items):
        if isinstance(items, list):
            return await self._schedule(items)
        return (await self._schedule([items]))[0]

    def shutdown(self) -> None:
        """Runs what is queued, then stops and joins the worker (blocking); a later call starts a new one."""
        self._slot.shutdown()

    def shutdown_nowait(self) -> None:
        self._slot.shutdown_nowait()

    @property
    def stats(self) -> BatchProcessorStats:
        return self._slot.stats(self.cache.stats() if self.cache is not None else None)

    def clear_stats(self) -> None:
        self._slot.clear()


def _length(item) -> int:
    try:
        return len(item)
    except TypeError:
        return 0


def dynamically(func: Callable | None = None, /, *, batch_size: int = 32, timeout_ms: float = 5.0,
                small_batch_threshold: int = 8, max_batch_length: int | None = None,
                priority_strategy: PriorityStrategy = PriorityStrategy.NONE, cache: AsyncCache | None = None,
                batch_item_cls: type | None = None):
    """`@aio.dynamically` or `@aio.dynamically(...)` on a sync or async batch function or method."""
    check_settings(batch_size, timeout_ms, small_batch_threshold)
    check_aio_extras(max_batch_length, priority_strategy, cache)

    def make(f):
        return AsyncBatchProcessor(f, batch_size=batch_size, timeout_ms=timeout_ms,
                                   small_batch_threshold=small_batch_threshold, cache=cache,
                                   priority_strategy=priority_strategy, batch_item_cls=batch_item_cls)

    return dynamic_batch(make, func)
