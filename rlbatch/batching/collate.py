"""Collation: how queued requests become batch-function arguments, and outputs per-request results.

A collator has four steps, all called by the service:

- `prepare(args, kwargs, rows)` runs in the caller's thread at submit time: it checks one request
  and puts it in canonical form, raising InvalidRequest so that only that request fails;
- `gather(requests, num_rows)` runs on the worker and builds the arguments of one call;
- `scatter(output, requests, ctx)` splits the function's output into one result per request;
- `release(ctx)` gives back what `gather` borrowed (preallocated buffers) once results are out.

Three collators (ArrayCollator in rlbatch.batching.arrays):
- ListCollator (no buckets): every parameter of the batch function receives a list with one entry per
  row, in request order (uBatch's `f(a_list, mode_list)`); the function returns a sequence of results.
- ArrayCollator (`buckets=`): items are numpy arrays or pytrees of arrays; rows are stacked into a
  preallocated buffer of the smallest bucket >= rows and padded; the function is called as
  `fn(*padded_args, num_valid=n)` and returns arrays (or a pytree) whose leading axis is the bucket.
- CallCollator (`@service`): one request per call, the function called with the request's own arguments.
"""
from __future__ import annotations

import inspect
import itertools
import threading
from typing import Callable, Sequence

from rlbatch.errors import BatchOutputError, InvalidRequest

__all__ = ["ArgSpec", "CallCollator", "ListCollator", "all_single", "row_selectors", "split_rows"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class ArgSpec:
    """Maps a request's (args, kwargs) onto the batch function's parameters, in parameter order.

    Built once from the function's signature, so the common case (only positional arguments, as
    many as the function has) costs one comparison per request.
    """

    def __init__(self, fn: Callable, *, skip: int = 0, reserved: Sequence[str] = ()):
        try:
            params = list(inspect.signature(fn).parameters.values())[skip:]
        except (TypeError, ValueError):  # builtins and C functions without a signature
            params = None
        params = [p for p in params if p.name not in reserved] if params is not None else None
        free = params is None or any(
            p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD) for p in params
        )
        self.free = free
        self.fast_arity = -1  # positional arguments that need no checking (-1: always check)
        self._layout = None  # free mode: the (num positional, keyword names) of the first request
        self._layout_lock = threading.Lock()
        if not free:
            self.positional = [p for p in params if p.kind in _POSITIONAL]
            self.keyword_only = [p for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY]
            self.names = [p.name for p in self.positional + self.keyword_only]
            self._defaults = [p.default for p in self.positional + self.keyword_only]
            self._index = {p.name: i for i, p in enumerate(self.positional + self.keyword_only)
                           if p.kind != inspect.Parameter.POSITIONAL_ONLY}
            self._num_positional = len(self.positional)
            self._positional_only = not self.keyword_only
            if self._positional_only:
                self.fast_arity = self._num_positional

    def canonical(self, args: tuple, kwargs: dict) -> tuple:
        """The request's values, one per parameter, or InvalidRequest saying what is wrong."""
        if self.free:
            return self._canonical_free(args, kwargs)
        if self._positional_only and not kwargs and len(args) == self._num_positional:
            return args
        if len(args) > self._num_positional:
            raise InvalidRequest(
                f"expected at most {self._num_positional} positional arguments "
                f"({', '.join(self.names[:self._num_positional])}), got {len(args)}")
        values = list(args) + [inspect.Parameter.empty] * (len(self.names) - len(args))
        for name, value in kwargs.items():
            i = self._index.get(name)
            if i is None:
                raise InvalidRequest(f"unexpected keyword argument {name!r}; expected one of {self.names}")
            if i < len(args):
                raise InvalidRequest(f"argument {name!r} given both by position and by keyword")
            values[i] = value
        for i, value in enumerate(values):
            if value is inspect.Parameter.empty:
                if self._defaults[i] is inspect.Parameter.empty:
                    raise InvalidRequest(f"missing argument {self.names[i]!r}; expected arguments {self.names}")
                values[i] = self._defaults[i]
        return tuple(values)

    def _canonical_free(self, args: tuple, kwargs: dict) -> tuple:
        layout = (len(args), tuple(sorted(kwargs)))
        if self._layout is None:
            with self._layout_lock:
                if self._layout is None:
                    self._layout = layout
        if layout != self._layout:
            raise InvalidRequest(
                f"expected {self._layout[0]} positional and keyword arguments {list(self._layout[1])} "
                f"(as the first request), got {layout[0]} positional and {list(layout[1])}")
        return args + tuple(kwargs[k] for k in layout[1])

    def split(self, columns: list) -> tuple[list, dict]:
        """Per-parameter columns -> (positional arguments, keyword arguments) of the call."""
        if self.free:
            num_positional, keys = self._layout
            return columns[:num_positional], dict(zip(keys, columns[num_positional:]))
        if self._positional_only:
            return columns, {}
        n = self._num_positional
        return columns[:n], dict(zip(self.names[n:], columns[n:]))


class ListCollator:
    """Each parameter receives a list of values, one per row, in request order."""

    results_are_values = False  # the function may return an Exception for a row: it fails that row
    passes_num_valid = False

    def __init__(self, argspec: ArgSpec):
        self.argspec = argspec

    def count_rows(self, args, kwargs) -> int:
        """Rows of a multi-row request: the entries of each argument's list."""
        first = first_argument(args, kwargs)
        try:
            return checked_rows(len(first))
        except TypeError:
            raise InvalidRequest(
                f"a multi-row request needs a sequence per argument, got {type(first).__name__}") from None

    def prepare(self, args, kwargs, rows):
        values = self.argspec.canonical(args, kwargs)
        if rows is not None:
            for v in values:
                if not hasattr(v, "__len__") or len(v) != rows:
                    got = len(v) if hasattr(v, "__len__") else type(v).__name__
                    raise InvalidRequest(f"a request of {rows} rows needs {rows} values for every argument, got {got}")
        return values

    def gather(self, requests, num_rows):
        if all_single(requests):  # one row each: the common case
            columns = [list(col) for col in zip(*[r.values for r in requests])]
        else:
            columns = [[] for _ in requests[0].values]
            for r in requests:
                for col, v in zip(columns, r.values):
                    if r.rows is None:
                        col.append(v)
                    else:
                        col.extend(v)
        args, kwargs = self.argspec.split(columns)
        return args, kwargs, None, None

    def scatter(self, output, requests, num_rows, ctx):
        try:
            got = len(output)
        except TypeError:
            raise BatchOutputError(
                f"the batch function must return a sequence of {num_rows} results (one per input), "
                f"got {type(output).__name__}") from None
        if got != num_rows:
            raise BatchOutputError(
                f"the batch function returned {got} results for a batch of {num_rows} inputs; "
                "expected exactly one result per input")
        if all_single(requests):
            return list(output)
        results = []
        for r, part in zip(requests, split_rows(output, requests)):
            if r.rows is not None:
                part = list(part)
                failed = [x for x in part if isinstance(x, BaseException)]
                part = failed[0] if failed else part  # one failed row fails its whole request
            results.append(part)
        return results

    def release(self, ctx):
        pass

    @staticmethod
    def slice_rows(values, start, stop):
        return tuple(v[start:stop] for v in values)

    @staticmethod
    def join(parts):
        return [x for part in parts for x in part]


class CallCollator:
    """No batching: one request per call, with its own arguments (for `@service`)."""

    results_are_values = False
    passes_num_valid = False

    def count_rows(self, args, kwargs) -> int:
        raise InvalidRequest("an unbatched service takes one input per request; submit_rows is not available")

    def prepare(self, args, kwargs, rows):
        if rows is not None:
            raise InvalidRequest("an unbatched service takes one input per request; submit_rows is not available")
        return (args, kwargs)

    def gather(self, requests, num_rows):
        args, kwargs = requests[0].values
        return args, kwargs, None, None

    def scatter(self, output, requests, num_rows, ctx):
        return [output]

    def release(self, ctx):
        pass


def first_argument(args, kwargs):
    """The first argument of a multi-row request, whose length is its row count."""
    first = next(itertools.chain(args, kwargs.values()), None)
    if first is None:
        raise InvalidRequest("a multi-row request needs at least one argument")
    return first


def checked_rows(n: int) -> int:
    if n < 1:
        raise InvalidRequest("a multi-row request needs at least one row, got 0")
    return n


def row_selectors(requests):
    """Where each request's rows sit in its batch: an index for one row, a slice for k rows."""
    out, i = [], 0
    for r in requests:
        if r.rows is None:
            out.append(i)
            i += 1
        else:
            out.append(slice(i, i + r.rows))
            i += r.rows
    return out


def split_rows(seq, requests):
    """Each request's share of a batch output: one row (`seq[i]`), or a slice for k rows."""
    return [seq[sel] for sel in row_selectors(requests)]


def all_single(requests):
    """True when every request carries one row (no submit_rows): the fast paths apply."""
    return all(r.rows is None for r in requests)
