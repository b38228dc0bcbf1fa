"""Decorators: `@batched` and `@service` turn a function into a drop-in single-input callable.

    @rlbatch.batched(max_batch_size=32, max_delay=0.002)
    def square(xs):                 # receives a list, returns a list
        return [x * x for x in xs]

    square(3)                       # 9: one input, blocks until its batch ran
    square([1, 2, 3])               # [1, 4, 9]: a list is many inputs (as in `batched`)
    square.submit(3).result()       # also .submit_many, .map, .acall, .stats, .close, .register

Decorating a method gives every instance its own service (and worker thread), created on first
use. The service holds the instance only weakly, and is closed when the instance is collected,
so its thread ends with it.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable

from rlbatch.batcher import BatchedService
from rlbatch.codecs import CallCodec
from rlbatch.errors import ServiceClosed

__all__ = ["batched", "service", "BatchedFunction"]


class BatchedFunction:
    """The callable that `@batched` and `@service` return (one per function or per instance)."""

    def __init__(self, service: BatchedService, lists_are_batches: bool):
        self.service = service
        self._lists_are_batches = lists_are_batches

    def __call__(self, *args, **kwargs):
        if self._lists_are_batches and len(args) == 1 and not kwargs and isinstance(args[0], list):
            return self.service.map(args[0])
        return self.service(*args, **kwargs)

    async def acall(self, *args, **kwargs):
        if self._lists_are_batches and len(args) == 1 and not kwargs and isinstance(args[0], list):
            import asyncio

            return list(await asyncio.gather(*[asyncio.wrap_future(f) for f in self.service.submit_many(args[0])]))
        return await self.service.acall(*args, **kwargs)

    def __getattr__(self, name):
        # submit, submit_many, submit_rows, call_rows, map, stats, close, stop, register, ...
        return getattr(self.service, name)

    def __repr__(self):
        return f"<batched {self.service!r}>"


class _Decorated:
    """A decorated function; as a class attribute it binds one service per instance."""

    def __init__(self, fn: Callable, make_service: Callable[[Callable], BatchedService], lists_are_batches: bool):
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._make_service = make_service
        self._lists_are_batches = lists_are_batches
        self._attr = None
        self._function = None

    def __set_name__(self, owner, name):
        self._attr = f"__rlbatch_{name}"

    def _plain(self) -> BatchedFunction:
        if self._function is None:
            self._function = BatchedFunction(self._make_service(self._fn), self._lists_are_batches)
        return self._function

    def __get__(self, instance, owner=None):
        if instance is None or self._attr is None:
            return self
        try:
            return instance.__dict__[self._attr]
        except KeyError:
            pass
        except AttributeError:
            raise TypeError(f"@batched methods need instances with a __dict__; {owner.__name__} has none") from None
        bound = BatchedFunction(self._make_service(self._bind(instance)), self._lists_are_batches)
        # setdefault: two threads racing on first use get the same service.
        bound = instance.__dict__.setdefault(self._attr, bound)
        weakref.finalize(instance, bound.service.close, False)
        return bound

    def _bind(self, instance):
        ref = weakref.ref(instance)
        fn = self._fn

        def method(*args, **kwargs):
            obj = ref()
            if obj is None:
                raise ServiceClosed(f"the instance behind {fn.__qualname__} was garbage-collected")
            return fn(obj, *args, **kwargs)

        params = list(inspect.signature(fn).parameters.values())
        method.__signature__ = inspect.Signature(params[1:])  # without self: what callers pass
        method.__name__ = fn.__name__
        return method

    def __call__(self, *args, **kwargs):
        return self._plain()(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._plain(), name)


def batched(fn: Callable | None = None, *, max_batch_size: int | None = None, max_delay: float = 0.002, **options: Any):
    """Makes a batch function a drop-in single-input callable. Options as for BatchedService."""

    def wrap(f):
        return _Decorated(f, lambda g: BatchedService(g, max_batch_size, max_delay, **options), True)

    return wrap if fn is None else wrap(fn)


def service(fn: Callable | None = None, *, max_queue: int | None = None, on_full: str = "block",
            setup: Callable[[], Any] | None = None, name: str | None = None):
    """Runs a one-input function on its own worker thread, one call at a time (e.g. to own a device).

    There is no batching: each call runs with its own arguments, in arrival order.
    """

    def wrap(f):
        def make(g):
            return BatchedService(g, 1, 0.0, max_queue=max_queue, on_full=on_full, setup=setup,
                                  name=name or f.__name__, _codec=CallCodec())

        return _Decorated(f, make, False)

    return wrap if fn is None else wrap(fn)
