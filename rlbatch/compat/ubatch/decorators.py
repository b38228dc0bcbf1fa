"""uBatch's `ubatch_decorator` (module `ubatch.decorators`).

    @ubatch_decorator(max_size=5, timeout=0.01)      # timeout: seconds
    def squared_cube(xs, modes):                      # one list per argument
        return [x ** 2 if m == "square" else x ** 3 for x, m in zip(xs, modes)]

    squared_cube([1, 2], ["square", "cube"])          # [1, 8]: the function itself, no batching
    squared_cube.ubatch(2, "cube")                    # 8: one input, batched with other threads'

The decorated object is a UBatchWrapper whose UBatch is started at decoration; `stop()` (not
in uBatch) stops it and joins its thread.
"""
from __future__ import annotations

import functools
from typing import Callable, List, Protocol

from rlbatch.compat.ubatch.ubatch import S, T, UBatch

__all__ = ["UBatchWrapper", "VariableArgsFunction", "ubatch_decorator"]


class VariableArgsFunction(Protocol):
    """A batch function: one list per argument in, a list of outputs back."""

    def __call__(self, *args: List[T], **kwargs: List[T]) -> S: ...


class UBatchWrapper:
    """A user function with a started UBatch: call it directly with lists, or batch one input
    per thread through `.ubatch(...)`."""

    def __init__(self, max_size: int, timeout: float, function: VariableArgsFunction):
        if not callable(function):
            raise TypeError(f"ubatch_decorator needs a callable, got {type(function).__name__}")
        # updated=(): the function's own attributes must not shadow `function`, `ubatch`, ...
        functools.update_wrapper(self, function, updated=())
        self.function: Callable[..., List[S]] = function
        self.max_size = max_size
        self.timeout = timeout
        self._mb = UBatch[T, S](max_size=max_size, timeout=timeout)
        self._mb.set_handler(function)
        self._mb.start()

    def ubatch(self, *args: T, **kwargs: T) -> S:
        """One input (each argument one item); blocks until its batch ran and returns its output."""
        return self._mb.ubatch(*args, **kwargs)

    def __call__(self, *args: List[T], **kwargs: List[T]) -> List[S]:
        """The user function itself, on lists: no thread, no batching."""
        return self.function(*args, **kwargs)

    def stop(self) -> None:
        """Runs what is queued and stops the worker thread (uBatch never stopped it)."""
        self._mb.stop()

    def __repr__(self):
        name = getattr(self.function, "__qualname__", repr(self.function))
        return f"<ubatch_decorator {name}: {self._mb!r}>"


def ubatch_decorator(max_size: int, timeout: float) -> Callable[[VariableArgsFunction], UBatchWrapper]:
    """Wraps a batch function in a UBatchWrapper (max_size inputs per call, timeout seconds)."""

    def wrap(function: VariableArgsFunction) -> UBatchWrapper:
        return UBatchWrapper(max_size, timeout, function)

    return wrap
