"""batched's public helpers that user code calls (`ensure_async` is used in its FastAPI example).

batched's `AsyncDiskCache` (which needs the `diskcache` package) is not reproduced: any object
with async `get`/`set`/`clear` and `stats()` (types.AsyncCache) can be passed as an aio cache.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
from typing import Any, Callable, Iterable, Iterator, Sequence

__all__ = ["ensure_async", "first", "is_method", "get_or_create_event_loop", "batch_iter"]


def ensure_async(func: Callable) -> Callable:
    """`func` itself if it is an `async def`; else an async wrapper running it in a thread."""
    if inspect.iscoroutinefunction(func):
        return func

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any):
        return await asyncio.to_thread(func, *args, **kwargs)

    return wrapper


def first(it: Iterable):
    """The first element of an iterable (StopIteration when empty)."""
    return next(iter(it))


def is_method(func: Callable) -> bool:
    """batched's test for a method: more than one parameter, the first named `self` or `cls`."""
    try:
        params = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return False
    return len(params) > 1 and params[0] in ("self", "cls")


def get_or_create_event_loop() -> asyncio.AbstractEventLoop:
    """The running event loop, or a new one set as this thread's loop."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        return loop


def batch_iter(seq: Sequence, batch_size: int) -> Iterator[Sequence]:
    """Consecutive slices of `seq` of `batch_size` elements (the last may be shorter)."""
    for i in range(0, len(seq), batch_size):
        yield seq[i:i + batch_size]
