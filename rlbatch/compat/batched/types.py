"""batched's public types: the stats snapshot, cache statistics and protocol, priority strategies.

Same names, fields and meanings as batched 0.1.5's `batched.types`, so that code printing or
comparing `processor.stats` keeps working. Times are in seconds.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Generic, Protocol, TypeVar, Union, runtime_checkable

__all__ = ["T", "U", "BatchFunc", "NDArrayOrTensor", "Feature", "BatchInfer", "PriorityStrategy",
           "CacheStats", "BatchProcessorStats", "AsyncCache"]

T = TypeVar("T")
U = TypeVar("U")

BatchFunc = Callable[[list], list]
NDArrayOrTensor = Any  # a numpy array or a torch tensor (torch is never imported here)
Feature = Union[NDArrayOrTensor, list]
BatchInfer = Callable[..., Feature]


class PriorityStrategy(int, enum.Enum):
    """How the aio processors order queued items (the thread processors always use the
    small-call rule).

    NONE: first come, first served; small_batch_threshold is not used.
    LENGTH: calls of at most small_batch_threshold items first, then shorter items before longer
        ones (batched's min-heap order: its docstring says the opposite, its code does this).
    PRIORITY: calls of at most small_batch_threshold items before larger calls.
    """

    NONE = 1
    LENGTH = 2
    PRIORITY = 3


@dataclasses.dataclass
class CacheStats:
    """Counters of an AsyncCache (kept by the cache itself)."""

    gets: int = 0
    hits: int = 0
    sets: int = 0
    total_get_time: float = 0.0
    total_hit_time: float = 0.0
    total_set_time: float = 0.0

    @property
    def avg_get_time(self) -> float:
        return self.total_get_time / self.gets if self.gets else 0.0

    @property
    def avg_hit_time(self) -> float:
        return self.total_hit_time / self.hits if self.hits else 0.0

    @property
    def avg_set_time(self) -> float:
        return self.total_set_time / self.sets if self.sets else 0.0

    def update_get(self, *, hit: bool, time_taken: float) -> None:
        self.gets += 1
        self.total_get_time += time_taken
        if hit:
            self.hits += 1
            self.total_hit_time += time_taken

    def update_set(self, *, time_taken: float) -> None:
        self.sets += 1
        self.total_set_time += time_taken


@dataclasses.dataclass
class BatchProcessorStats:
    """A snapshot of a processor's counters; `processor.stats` builds a new one on each access.

    queue_size: items waiting now; total_processed: items that went through the batch function
    (failed batches included); total_batches: batch function calls; avg_batch_size:
    total_processed / total_batches; avg_processing_time: mean seconds per batch;
    cache_stats: the aio cache's counters, or None without a cache.
    """

    queue_size: int = 0
    total_processed: int = 0
    total_batches: int = 0
    avg_batch_size: float = 0.0
    avg_processing_time: float = 0.0
    cache_stats: CacheStats | None = None

    def update(self, batch_size: int, processing_time: float) -> None:
        """Counts one batch of `batch_size` items that took `processing_time` seconds."""
        total_time = self.avg_processing_time * self.total_batches + processing_time
        self.total_processed += batch_size
        self.total_batches += 1
        self.avg_batch_size = self.total_processed / self.total_batches
        self.avg_processing_time = total_time / self.total_batches

    def clone(self, *, queue_size: int, cache_stats: CacheStats | None = None) -> "BatchProcessorStats":
        return dataclasses.replace(self, queue_size=queue_size, cache_stats=cache_stats)


@runtime_checkable
class AsyncCache(Protocol, Generic[T, U]):
    """A result cache for the aio processors, keyed by item: `get` returns None on a miss."""

    async def get(self, key: T) -> U | None: ...

    async def set(self, key: T, value: U) -> None: ...

    async def clear(self) -> None: ...

    def stats(self) -> CacheStats: ...
