"""What every batched-compat processor shares: its rlbatch service, its stats, method binding.

A processor owns at most one `rlbatch.BatchedService` at a time, made on first use (batched's
processors start lazily). `shutdown()` closes it and joins its threads; a later call or `start()`
makes a fresh one, where batched 0.1.5 restarted a thread on a stopped generator and the call hung
forever. The counters of closed services are kept, so `stats` covers the processor's whole life.
"""
from __future__ import annotations

import functools
import inspect
import threading
import weakref
from typing import Callable

from rlbatch.batching.service import BatchedService
from rlbatch.batching.stats import ServiceStats
from rlbatch.compat.batched.types import BatchProcessorStats, CacheStats
from rlbatch.compat.batched.utils import is_method

__all__ = ["ServiceSlot", "check_settings", "dynamic_batch"]


def check_settings(batch_size, timeout_ms, small_batch_threshold) -> None:
    """Settings checks with batched's names (the service would name its own)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) or not timeout_ms >= 0:
        raise ValueError(f"timeout_ms must be a number of milliseconds >= 0, got {timeout_ms!r}")
    if isinstance(small_batch_threshold, bool) or not isinstance(small_batch_threshold, int) \
            or small_batch_threshold < 0:
        raise ValueError(f"small_batch_threshold must be an int >= 0, got {small_batch_threshold!r}")


def _counts(s: ServiceStats) -> tuple[int, int, float]:
    """(items processed, batches, seconds in batches) of one service's snapshot."""
    processed = sum(size * n for size, n in s.batch_size_hist.items())
    return processed, s.batches, s.processing_time_total


class ServiceSlot:
    """The processor's current service, made by `make()` on demand, and its stats."""

    def __init__(self, make: Callable[[], BatchedService]):
        self._make = make
        self._service: BatchedService | None = None
        self._lock = threading.Lock()
        self._base = (0, 0, 0.0)  # counts of services already closed, less those cleared
        self.running = False

    def get(self) -> BatchedService:
        service = self._service
        if service is None:
            with self._lock:
                if self._service is None:
                    self._service = self._make()
                    # Started here, under the lock, so that thread start-up happens before the
                    # first item's delay starts: callers that arrive together still batch together.
                    self._service.start()
                    # A processor that is dropped without shutdown() closes its service; the
                    # worker holds the service, not the processor, so the processor can be collected.
                    weakref.finalize(self, self._service.close, False)
                service = self._service
        self.running = True
        return service

    def start(self) -> None:
        self.get().start()

    def shutdown(self) -> None:
        """Closes the service (queued items still run) and joins its threads; idempotent."""
        with self._lock:
            service, self._service = self._service, None
            self.running = False
            if service is None:
                return
            service.close()
            self._base = tuple(a + b for a, b in zip(self._base, _counts(service.stats)))

    def shutdown_nowait(self) -> None:
        """Closes the service without waiting (its instance was collected); queued items still run."""
        with self._lock:
            service = self._service
        if service is not None:
            service.close(False)

    def clear(self) -> None:
        """Starts the counters again from zero (aio `clear_stats`)."""
        with self._lock:
            service = self._service
            self._base = (0, 0, 0.0) if service is None else tuple(-c for c in _counts(service.stats))

    def stats(self, cache_stats: CacheStats | None = None) -> BatchProcessorStats:
        with self._lock:
            service, base = self._service, self._base
        current = service.stats if service is not None else None
        processed, batches, seconds = base if current is None else \
            tuple(a + b for a, b in zip(base, _counts(current)))
        return BatchProcessorStats(
            queue_size=current.pending if current is not None else 0,
            total_processed=processed,
            total_batches=batches,
            avg_batch_size=processed / batches if batches else 0.0,
            avg_processing_time=seconds / batches if batches else 0.0,
            cache_stats=cache_stats,
        )


class _Bound:
    """`instance.method` of a decorated method: the instance's processor, holding the instance.

    The processor itself reaches its instance only weakly (else the instance, its processor and
    the worker thread would keep each other alive for good); this wrapper holds it strongly for
    the duration of a call, so `Model().predict(x)` works on a temporary, as a bound method does.
    """

    def __init__(self, processor, instance):
        self._processor = processor
        self._instance = instance

    def __call__(self, *args, **kwargs):
        result = self._processor(*args, **kwargs)
        return self._holding(result) if inspect.iscoroutine(result) else result

    async def _holding(self, coroutine):
        return await coroutine  # an aio processor's call: this frame holds self, so the instance

    async def acall(self, *args, **kwargs):
        return await self._processor.acall(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __repr__(self):
        return f"<bound {self._processor!r} of {self._instance!r}>"


class _PerInstance:
    """A decorated method: one processor per instance, made on first use."""

    def __init__(self, func, make_processor):
        functools.update_wrapper(self, func)
        self._func = func
        self._make = make_processor
        self._key = f"__batched_{func.__name__}"

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        processor = instance.__dict__.get(self._key)
        if processor is None:
            processor = self._make(self._weakly_bound(instance))
            # setdefault: two threads racing on first use share one processor.
            processor = instance.__dict__.setdefault(self._key, processor)
            weakref.finalize(instance, processor.shutdown_nowait)
        return _Bound(processor, instance)

    def _weakly_bound(self, instance):
        ref, func = weakref.ref(instance), self._func

        def target():
            obj = ref()
            if obj is None:
                raise ReferenceError(f"the instance behind {func.__qualname__} was garbage-collected")
            return obj

        if inspect.iscoroutinefunction(func):
            async def method(*args, **kwargs):
                return await func(target(), *args, **kwargs)
        else:
            def method(*args, **kwargs):
                return func(target(), *args, **kwargs)
        method.__name__ = func.__name__
        return method


def dynamic_batch(make_processor: Callable, func: Callable | None):
    """The decorator body of every `dynamically`: bare or called, function or method."""

    def decorate(f):
        if is_method(f):
            return _PerInstance(f, make_processor)
        return functools.update_wrapper(make_processor(f), f)

    return decorate if func is None else decorate(func)
