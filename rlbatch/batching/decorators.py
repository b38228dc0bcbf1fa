"""Decorators: `@batched` and `@service` turn a function into a drop-in single-input callable.

    @rlbatch.batched(max_batch_size=32, max_delay=0.002)
    def square(xs):                 # receives a list, returns a list
        return [x * x for x in xs]

    square(3)                       # 9: one input, blocks until its batch ran
    list(square.map([1, 2, 3]))     # [1, 4, 9]: many inputs (also submit_many, call_rows)
    square.submit(3).result()       # also .acall, .stats, .close, .register

One rule for arguments, the same as BatchedService's: each call is one input, whatever its type
(`square([1, 2])` passes the list [1, 2] as one input). Many inputs go through `map`,
`submit_many` or `call_rows`. (rlbatch.compat.batched keeps that library's rule, a list being
many inputs.)

Decorating a method gives every instance its own service (and worker thread), created on first
use. The service holds the instance only weakly, and is closed when the instance is collected,
so its thread ends with it. What `instance.method` returns holds the instance strongly, as a bound
method does, and so do its Futures until they are done: `Model().predict(x)` works on a temporary.
"""
from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any, Callable

from rlbatch.batching.service import BatchedService
from rlbatch.batching.collate import CallCollator
from rlbatch.errors import ServiceClosed

__all__ = ["batched", "service", "BatchedFunction"]


class BatchedFunction:
    """The callable that `@batched` and `@service` return (one per function or per instance)."""

    def __init__(self, service: BatchedService, lists_are_batches: bool):
        self.service = service
        self.lists_are_batches = lists_are_batches

    def __call__(self, *args, **kwargs):
        if self.lists_are_batches and len(args) == 1 and not kwargs and isinstance(args[0], list):
            return list(self.service.map(args[0]))
        return self.service(*args, **kwargs)

    async def acall(self, *args, **kwargs):
        if self.lists_are_batches and len(args) == 1 and not kwargs and isinstance(args[0], list):
            import asyncio

            return list(await asyncio.gather(*[asyncio.wrap_future(f) for f in self.service.submit_many(args[0])]))
        return await self.service.acall(*args, **kwargs)

    def __getattr__(self, name):
        # submit, submit_many, submit_rows, call_rows, map, stats, close, stop, register, ...
        return getattr(self.service, name)

    def __repr__(self):
        return f"<batched {self.service!r}>"


class _BoundMethod(BatchedFunction):
    """`instance.method` for a decorated method: the instance's BatchedFunction plus a strong
    reference to the instance. Without it `Model().predict(x)` would lose its temporary instance
    between the attribute lookup and the call, and the instance's finalizer would close the
    service before the call reached it.

    The blocking calls (__call__, acall, map, call_rows) keep this object, and so the instance,
    alive until they return; a Future holds the instance until it is done.
    """

    def __init__(self, function: BatchedFunction, instance):
        super().__init__(function.service, function.lists_are_batches)
        self._instance = instance

    def _hold(self, future):
        # Until done, not for the Future's whole life: the worker may keep its last batch's
        # requests (and their Futures) referenced until the next batch, which would keep the
        # instance, and so the worker itself, alive for good.
        holder = [self._instance]
        future.add_done_callback(lambda _: holder.clear())
        return future

    def submit(self, *args, **kwargs):
        return self._hold(self.service.submit(*args, **kwargs))

    def submit_rows(self, *args, **kwargs):
        return self._hold(self.service.submit_rows(*args, **kwargs))

    def submit_many(self, items, **kwargs):
        return [self._hold(f) for f in self.service.submit_many(items, **kwargs)]

    # Defined here, not reached through __getattr__, which would return the service's own method
    # and let go of this object (and perhaps the instance) before the call.
    def map(self, *iterables, **kwargs):
        return _held(self.service.map(*iterables, **kwargs), self)

    def register(self, **kwargs):
        # The caller keeps the instance alive until it is closed: `Model().predict.register()`.
        kwargs.setdefault("keep_alive", self._instance)
        return self.service.register(**kwargs)

    def call_rows(self, *args, **kwargs):
        return self.service.call_rows(*args, **kwargs)


def _held(results, owner):
    """Yields from `results` while keeping `owner` (and so the instance) alive."""
    yield from results


class _Decorated:
    """A decorated function; as a class attribute it binds one service per instance."""

    def __init__(self, fn: Callable, make_service: Callable[[Callable], BatchedService], lists_are_batches: bool):
        functools.update_wrapper(self, fn)
        self._fn = fn
        self._make_service = make_service
        self.lists_are_batches = lists_are_batches
        self._attr = None
        self._function = None

    def __set_name__(self, owner, name):
        self._attr = f"__rlbatch_{name}"

    def _plain(self) -> BatchedFunction:
        if self._function is None:
            self._function = BatchedFunction(self._make_service(self._fn), self.lists_are_batches)
        return self._function

    def __get__(self, instance, owner=None):
        if instance is None or self._attr is None:
            return self
        try:
            function = instance.__dict__[self._attr]
        except KeyError:
            function = BatchedFunction(self._make_service(self._bind(instance)), self.lists_are_batches)
            # setdefault: two threads racing on first use get the same service.
            function = instance.__dict__.setdefault(self._attr, function)
            weakref.finalize(instance, function.service.close, False)
        except AttributeError:
            raise TypeError(f"@batched methods need instances with a __dict__; {owner.__name__} has none") from None
        # The instance's own BatchedFunction (kept in its __dict__) refers to it only weakly, or
        # the instance would never be collected; this per-lookup wrapper refers to it strongly.
        return _BoundMethod(function, instance)

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
        return _Decorated(f, lambda g: BatchedService(g, max_batch_size, max_delay, **options), False)

    return wrap if fn is None else wrap(fn)


def service(fn: Callable | None = None, *, max_queue: int | None = None, on_full: str = "block",
            setup: Callable[[], Any] | None = None, name: str | None = None):
    """Runs a one-input function on its own worker thread, one call at a time (e.g. to own a device).

    There is no batching: each call runs with its own arguments, in arrival order.
    """

    def wrap(f):
        def make(g):
            return BatchedService(g, 1, 0.0, max_queue=max_queue, on_full=on_full, setup=setup,
                                  name=name or f.__name__, collator=CallCollator())

        return _Decorated(f, make, False)

    return wrap if fn is None else wrap(fn)
