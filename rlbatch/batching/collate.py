"""Collation: how queued requests become batch-function arguments, and outputs per-request results.

A collator has four steps, all called by the service:

- `prepare(args, kwargs, rows)` runs in the caller's thread at submit time: it checks one request
  and puts it in canonical form, raising InvalidRequest so that only that request fails;
- `gather(requests, num_rows)` runs on the worker and builds the arguments of one call;
- `scatter(output, requests, ctx)` splits the function's output into one result per request;
- `release(ctx)` gives back what `gather` borrowed (preallocated buffers) once results are out.

Three collators:
- ListCollator (no buckets): every parameter of the batch function receives a list with one entry per
  row, in request order (uBatch's `f(a_list, mode_list)`); the function returns a sequence of results.
- ArrayCollator (`buckets=`): items are numpy arrays or pytrees of arrays; rows are stacked into a
  preallocated buffer of the smallest bucket >= rows and padded; the function is called as
  `fn(*padded_args, num_valid=n)` and returns arrays (or a pytree) whose leading axis is the bucket.
- CallCollator (`@service`): one request per call, the function called with the request's own arguments.
"""
from __future__ import annotations

import bisect
import inspect
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np

from rlbatch.errors import BatchOutputError, InvalidRequest

__all__ = ["ArgSpec", "ListCollator", "ArrayCollator", "CallCollator", "PAD_MODES"]

PAD_MODES = ("repeat", "zeros")
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

    def prepare(self, args, kwargs, rows):
        values = self.argspec.canonical(args, kwargs)
        if rows is not None:
            for v in values:
                if not hasattr(v, "__len__") or len(v) != rows:
                    got = len(v) if hasattr(v, "__len__") else type(v).__name__
                    raise InvalidRequest(f"a request of {rows} rows needs {rows} values for every argument, got {got}")
        return values

    def gather(self, requests, num_rows):
        if _all_single(requests):  # one row each: the common case
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
        if _all_single(requests):
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


class _LeafSpec:
    __slots__ = ("treedef", "shapes", "dtypes", "name")

    def __init__(self, treedef, leaves, name):
        self.treedef = treedef
        self.shapes = [leaf.shape for leaf in leaves]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.name = name

    def describe(self):
        parts = [f"{dt}{list(s)}" for s, dt in zip(self.shapes, self.dtypes)]
        return parts[0] if len(parts) == 1 else f"{self.treedef} with leaves {parts}"


def to_host(leaves):
    """Device arrays -> numpy in one round trip.

    On an accelerator every copy is started before any is waited for. On the CPU the arrays are
    already in host memory and np.asarray reads each directly: starting copies there only adds
    dispatch work (measured: 60-80 us of CPU per batch of three outputs on the 2-core VM).
    """
    device_arrays = [leaf for leaf in leaves if hasattr(leaf, "copy_to_host_async")]
    if device_arrays and not _in_host_memory(device_arrays[0]):
        for a in device_arrays:
            a.copy_to_host_async()
    return [np.asarray(leaf) for leaf in leaves]


def _in_host_memory(array) -> bool:
    """True for a jax array on a CPU device (one device; a sharded array counts as not)."""
    try:
        return array.device.platform == "cpu"
    except (AttributeError, ValueError):
        return False


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


def _all_single(requests):
    """True when every request carries one row (no submit_rows): the fast paths apply."""
    return all(r.rows is None for r in requests)


def _as_array(x):
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def _first_row(x, rows):
    """Row 0 of one leaf of a multi-row request (the first request fixes the row shapes)."""
    a = _as_array(x)
    if a.ndim == 0 or len(a) != rows:
        raise InvalidRequest(f"a request of {rows} rows needs arrays with {rows} rows on the leading axis, "
                             f"got an array of shape {list(a.shape)}")
    return a[0]


class ArrayCollator:
    """Stacks array rows into preallocated per-bucket buffers, pads, and slices outputs back.

    The expected structure, shapes and dtypes of each argument come from `example` (one row per
    argument, as a tuple) or else from the first request; a request that differs fails alone.
    Buffers are preallocated per bucket and reused, so that a batch costs no allocation; a buffer
    goes back to its pool only once the batch's results are out (`release`), because a pipelined
    device computation may still be reading it.
    """

    results_are_values = True  # rows of arrays, never an Exception in place of one
    passes_num_valid = True  # the function is called as fn(*padded_args, num_valid=n)

    def __init__(self, argspec: ArgSpec, buckets: Sequence[int], pad: Any = "repeat", example: tuple | None = None):
        if argspec.free:
            raise ValueError("a bucketed service needs a batch function with named parameters (no *args/**kwargs)")
        self.argspec = argspec
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"buckets must be positive integers, got {tuple(buckets)}")
        if isinstance(pad, str) and pad not in PAD_MODES:
            raise ValueError(f"pad must be one of {PAD_MODES} or a fill value, got {pad!r}")
        self.pad = pad
        self._specs: list[_LeafSpec] | None = None
        self._spec_lock = threading.Lock()
        self._pools: dict[int, list] = {b: [] for b in self.buckets}
        # (shape, dtype) when the function takes one plain array: such a request is kept as the bare
        # array (no lists per request, none to walk per row in gather).
        self.fast_spec = None
        if example is not None:
            self._set_specs(tuple(example), example_given=True)

    def _set_specs(self, values, example_given=False):
        specs = []
        for name, v in zip(self.argspec.names, values):
            leaves, treedef = jax.tree_util.tree_flatten(v)
            specs.append(_LeafSpec(treedef, [_as_array(x) for x in leaves], name))
        if not isinstance(self.pad, str):
            for spec in specs:
                for dtype in spec.dtypes:
                    try:
                        np.empty((), dtype)[()] = self.pad  # as gather will pad every short batch
                    except (TypeError, ValueError, OverflowError) as e:
                        why = f"pad={self.pad!r} cannot fill argument {spec.name!r} of dtype {dtype} ({e})"
                        if example_given:
                            raise ValueError(why) from None
                        raise InvalidRequest(why + "; choose a pad value of that dtype") from None
        self._specs = specs
        if len(specs) == 1 and len(specs[0].shapes) == 1 and specs[0].treedef.num_nodes == 1:
            self.fast_spec = (specs[0].shapes[0], specs[0].dtypes[0])

    def bucket_for(self, num_rows: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, num_rows)]

    def prepare(self, args, kwargs, rows):
        """A request's rows in canonical form: one list of leaves per argument, or, when the
        function takes one plain array (`fast_spec`), that array itself (no lists to build per
        request, and none to walk per row in `gather`)."""
        fast = self.fast_spec
        if fast is not None and len(args) == 1 and not kwargs:
            x = args[0]
            if type(x) is np.ndarray and x.dtype == fast[1] and x.shape == (fast[0] if rows is None else (rows,) + fast[0]):
                return x
        values = self.argspec.canonical(args, kwargs)
        if self._specs is None:
            with self._spec_lock:
                if self._specs is None:
                    first = values
                    if rows is not None:
                        first = tuple(jax.tree_util.tree_map(lambda x: _first_row(x, rows), v) for v in values)
                    self._set_specs(first)
        prepared = []
        for spec, v in zip(self._specs, values):
            leaves, treedef = jax.tree_util.tree_flatten(v)
            if treedef != spec.treedef:
                raise InvalidRequest(f"argument {spec.name!r}: expected structure {spec.treedef}, got {treedef}")
            out = []
            for leaf, shape, dtype in zip(leaves, spec.shapes, spec.dtypes):
                leaf = _as_array(leaf)
                want = shape if rows is None else (rows,) + shape
                if leaf.shape != want or leaf.dtype != dtype:
                    expected = f"{dtype}{list(want)}"
                    raise InvalidRequest(
                        f"argument {spec.name!r}: expected an array of dtype and shape {expected}, "
                        f"got {leaf.dtype}{list(leaf.shape)}")
                out.append(leaf)
            prepared.append(out)
        return prepared[0][0] if self.fast_spec is not None else prepared

    def _buffers(self, bucket):
        pool = self._pools[bucket]
        try:
            return pool.pop()
        except IndexError:
            return [[np.empty((bucket,) + s, d) for s, d in zip(spec.shapes, spec.dtypes)] for spec in self._specs]

    def gather(self, requests, num_rows):
        bucket = self.bucket_for(num_rows)
        buffers = self._buffers(bucket)
        single = _all_single(requests)
        if self.fast_spec is not None:  # one plain array per request (see prepare)
            buf = buffers[0][0]
            self._fill(buf, [r.values for r in requests], requests, single, num_rows, bucket)
            args, kwargs = self.argspec.split([buf])
            return args, kwargs, (bucket, buffers), bucket
        columns = []
        for j, (spec, bufs) in enumerate(zip(self._specs, buffers)):
            for li, buf in enumerate(bufs):
                self._fill(buf, [r.values[j][li] for r in requests], requests, single, num_rows, bucket)
            columns.append(jax.tree_util.tree_unflatten(spec.treedef, bufs))
        args, kwargs = self.argspec.split(columns)
        return args, kwargs, (bucket, buffers), bucket

    def _fill(self, buf, rows, requests, single, num_rows, bucket):
        """Writes each request's rows of one leaf into `buf`, in order, then pads it."""
        if single and buf.ndim > 1:
            # Concatenating into a flat view of the buffer is several times faster than
            # np.stack(..., out=buf) (no per-row expand_dims).
            np.concatenate(rows, axis=0, out=buf[:num_rows].reshape((num_rows * buf.shape[1],) + buf.shape[2:]))
        elif single:
            buf[:num_rows] = rows
        else:
            i = 0
            for r, x in zip(requests, rows):
                k = 1 if r.rows is None else r.rows
                buf[i:i + k] = x
                i += k
        if num_rows < bucket:
            # Repeating a real row keeps padded rows inside the input distribution (no NaN
            # or overflow from zeros through a normaliser); they are never returned.
            if self.pad == "repeat":
                buf[num_rows:] = buf[num_rows - 1]
            elif self.pad == "zeros":
                buf[num_rows:] = 0
            else:
                buf[num_rows:] = self.pad

    def scatter(self, output, requests, num_rows, ctx):
        bucket, buffers = ctx
        leaves, treedef = jax.tree_util.tree_flatten(output)
        arrays = []
        for leaf in to_host(leaves):
            a = leaf
            if a.ndim == 0 or a.shape[0] != bucket:
                raise BatchOutputError(
                    f"the batch function must return arrays whose leading dimension is the bucket size "
                    f"{bucket} (num_valid={num_rows}), got an output of shape {list(a.shape)}")
            if any(np.may_share_memory(a, b) for bufs in buffers for b in bufs):
                a = a.copy()  # the output aliases an input buffer that the next batch will overwrite
            arrays.append(a)
        single = _all_single(requests)
        if len(arrays) == 1 and treedef.num_leaves == 1 and treedef.num_nodes == 1:
            a = arrays[0]
            if single:
                return list(a[:num_rows])
            return split_rows(a, requests)
        if single:
            return [treedef.unflatten(row) for row in zip(*[a[:num_rows] for a in arrays])]
        columns = [split_rows(a, requests) for a in arrays]
        return [treedef.unflatten(parts) for parts in zip(*columns)]

    def release(self, ctx):
        bucket, buffers = ctx
        self._pools[bucket].append(buffers)

    def slice_rows(self, values, start, stop):
        if self.fast_spec is not None:
            return values[start:stop]
        return [[leaf[start:stop] for leaf in leaves] for leaves in values]

    @staticmethod
    def join(parts):
        return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)
