"""Ragged mode: variable-length items padded per feature to a (rows, length) bucket.

An item is a dict of features `{name: sequence}` (HuggingFace style: `input_ids`,
`attention_mask`, ...), each a numpy array, or a list numpy turns into one, of shape
`[T, *trailing]`: a leading length axis T, the same for every feature of one item, and trailing
dims and a dtype fixed per feature by `example` or else by the first item.

A batch of n items becomes arrays of B rows and L positions:
- B: the smallest row bucket >= n (`buckets`), or n without row buckets;
- L: the smallest length bucket >= the longest item (`length_buckets`), or that longest length.
Each feature becomes a `[B, L, *trailing]` array; an item of length T fills positions 0..T-1
(`side="right"`) or L-T..L-1 (`side="left"`), and the other positions hold the feature's pad
value. The batch function is called as

    fn(features, lengths=lengths, num_valid=n)              # pass_mask=True adds mask=mask

with `features` a dict of `[B, L, ...]` arrays (in the first item's key order), `lengths` int32
`[B]` (each row's T), `mask` bool `[B, L]` (True at a row's real positions) and `num_valid` the n
real rows; rows n..B-1 repeat row n-1 (features, length and mask) and are never returned. It
returns an array, or a pytree of arrays, with leading axis B. Row i goes back to its request as
`output[i]`, with its length axis L as it is, or cut to the item's own T positions
(`trim_outputs=True`, which needs every output of shape `[B, L, ...]`).

With both kinds of bucket a jitted function meets at most len(buckets) * len(length_buckets)
shapes, so it compiles once per (B, L) pair it meets and never again.

Requests: `svc(item)` or `svc(**features)` for one item (keywords: no feature may then be named
`timeout` or `priority`, which the service's calls take themselves); `svc.submit_rows(items)` (a
list of k items) for several, whose result is a list of k row results.
"""
from __future__ import annotations

import bisect
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from rlbatch.batching.arrays import to_host
from rlbatch.batching.collate import checked_rows
from rlbatch.errors import BatchOutputError, InvalidRequest

__all__ = ["RaggedCollator", "SIDES"]

SIDES = ("right", "left")


def _check_sizes(name: str, sizes) -> tuple | None:
    if sizes is None:
        return None
    try:
        out = tuple(sorted(set(int(s) for s in sizes)))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of positive integers, got {sizes!r}") from None
    if not out or out[0] < 1:
        raise ValueError(f"{name} must be a sequence of positive integers, got {tuple(sizes)}")
    return out


class _Feature:
    """One feature's expected trailing shape and dtype, and its pad value (a 0-d array of that dtype)."""

    __slots__ = ("name", "trailing", "dtype", "pad")

    def __init__(self, name, trailing, dtype, pad):
        self.name, self.trailing, self.dtype, self.pad = name, trailing, dtype, pad

    def describe(self) -> str:
        return f"{self.dtype}[{', '.join(['T'] + [str(d) for d in self.trailing])}]"

    def check(self, x) -> np.ndarray:
        """The feature of one item as an array of the expected dtype, or InvalidRequest."""
        if isinstance(x, np.ndarray):
            a = x  # an array's dtype is the caller's choice: it must match (as in ArrayCollator)
        else:
            try:
                a = np.asarray(x)
            except (TypeError, ValueError) as e:
                raise InvalidRequest(f"feature {self.name!r}: expected {self.describe()}, got a "
                                     f"{type(x).__name__} that does not form one array ({e})") from None
            if a.dtype != self.dtype:
                a = self._cast_list(a)
        if a.ndim != 1 + len(self.trailing) or a.shape[1:] != self.trailing or a.dtype != self.dtype:
            raise InvalidRequest(f"feature {self.name!r}: expected {self.describe()} (T: any length), "
                                 f"got {a.dtype}{list(a.shape)}")
        return a

    def _cast_list(self, a: np.ndarray) -> np.ndarray:
        """A list's numbers in the feature's dtype when that loses nothing numpy would not lose
        itself: Python ints come as int64 and floats as float64, whatever the model's dtype. Into
        a float dtype any number goes (rounded); into an integer or bool dtype only exact values."""
        if a.size == 0:
            return a.astype(self.dtype)
        if self.dtype.kind in "fc":
            return a.astype(self.dtype) if np.can_cast(a.dtype, self.dtype, "same_kind") else a
        if a.dtype.kind not in "biuf":
            return a
        with np.errstate(all="ignore"):
            b = a.astype(self.dtype)
        return b if np.array_equal(b, a) else a


class RaggedCollator:
    """Pads ragged items per feature into (rows, length) buckets and splits outputs back per row.

    Args:
      pad_value: the value that fills padded positions: one value for every feature, or a dict
        `{name: value}` (features not named: 0), each value fitting its feature's dtype.
      side: "right" (default: items start at position 0) or "left" (items end at position L-1,
        as decoder-only generation wants).
      buckets: row buckets; None: B is the number of rows.
      length_buckets: length buckets; an item longer than the largest fails alone with
        InvalidRequest. None: L is the longest item of the batch.
      example: one item fixing the features, trailing shapes and dtypes (default: the first
        request's first item fixes them); give numpy arrays of the model's dtypes (a list of
        Python ints would fix int64). Its length does not matter. Later items must match: an
        array of another dtype is refused; a list is converted (into an integer or
        bool dtype only when no value changes).
      pass_lengths: call the function with `lengths=` (int32 [B]).
      pass_mask: call the function with `mask=` (bool [B, L]).
      trim_outputs: cut each row of each output to the item's own length (outputs must then be
        `[B, L, ...]`); False: rows keep all L positions.

    Buffers are preallocated per (B, L) and reused when both kinds of bucket are given (then the
    pairs are few); a buffer goes back to its pool only once the batch's results are out
    (`release`), because a pipelined device computation may still be reading it. Without buckets
    the shapes are as many as the batches' lengths, so each batch gets fresh arrays.
    """

    results_are_values = True  # a row result is never an Exception in place of a value
    passes_num_valid = True  # the worker adds num_valid=n to the call

    def __init__(self, *, pad_value: Any = 0, side: str = "right", buckets: Sequence[int] | None = None,
                 length_buckets: Sequence[int] | None = None, example: Mapping | None = None,
                 pass_lengths: bool = True, pass_mask: bool = False, trim_outputs: bool = False):
        if side not in SIDES:
            raise ValueError(f"side must be one of {SIDES}, got {side!r}")
        self.side = side
        self.buckets = _check_sizes("buckets", buckets)
        self.length_buckets = _check_sizes("length_buckets", length_buckets)
        self.pad_value = dict(pad_value) if isinstance(pad_value, Mapping) else pad_value
        self.pass_lengths = bool(pass_lengths)
        self.pass_mask = bool(pass_mask)
        self.trim_outputs = bool(trim_outputs)
        self._features: list[_Feature] | None = None
        self._features_lock = threading.Lock()
        self._pools: dict[tuple[int, int], list] | None = \
            {} if self.buckets is not None and self.length_buckets is not None else None
        if example is not None:
            self._set_features(example, ValueError, "the example")

    # ------------------------------------------------------------------ features (caller's thread)

    @property
    def features(self) -> dict | None:
        """{name: (trailing shape, dtype, pad value)} once fixed by the example or first item."""
        fs = self._features
        return None if fs is None else {f.name: (f.trailing, f.dtype, f.pad[()]) for f in fs}

    def _pad_for(self, name):
        if isinstance(self.pad_value, dict):
            return self.pad_value.get(name, 0)
        return self.pad_value

    def _set_features(self, item, error, what) -> None:
        """Fixes the features from `item`; `error` is ValueError for an example given up front,
        InvalidRequest for a first request (which then fails alone, fixing nothing)."""
        if not isinstance(item, Mapping) or not item:
            raise error(f"{what} must be a non-empty dict of features {{name: sequence}}, "
                        f"got {item if isinstance(item, Mapping) else type(item).__name__!r}")
        if isinstance(self.pad_value, dict):
            unknown = [k for k in self.pad_value if k not in item]
            if unknown:
                raise error(f"pad_value names features {unknown} that {what} does not have; "
                            f"its features are {list(item)}")
        features = []
        for name, x in item.items():
            try:
                a = np.asarray(x)
            except (TypeError, ValueError) as e:
                raise error(f"feature {name!r} of {what}: expected a sequence that forms one array, "
                            f"got a {type(x).__name__} ({e})") from None
            if a.ndim < 1:
                raise error(f"feature {name!r} of {what}: expected a sequence [T, ...], got a 0-d {a.dtype}")
            pad = np.empty((), a.dtype)
            try:
                pad[()] = self._pad_for(name)  # as gather will fill every padded position
            except (TypeError, ValueError, OverflowError) as e:
                raise error(f"pad value {self._pad_for(name)!r} cannot fill feature {name!r} of dtype "
                            f"{a.dtype} ({e}); choose a pad value of that dtype") from None
            features.append(_Feature(name, a.shape[1:], a.dtype, pad))
        self._features = features

    def _check_item(self, item) -> tuple[int, list]:
        """(T, one array per feature) for one item, or InvalidRequest saying what is wrong."""
        if not isinstance(item, Mapping):
            raise InvalidRequest(f"expected an item: a dict of features {{name: sequence}}, got {type(item).__name__}")
        features = self._features
        if len(item) != len(features) or any(f.name not in item for f in features):
            names = [f.name for f in features]
            missing = [n for n in names if n not in item]
            unexpected = [k for k in item if k not in names]
            raise InvalidRequest(f"expected features {names}, got {list(item)} "
                                 f"(missing {missing}, unexpected {unexpected})")
        arrays, length = [], None
        for f in features:
            a = f.check(item[f.name])
            if length is None:
                length = a.shape[0]
            elif a.shape[0] != length:
                raise InvalidRequest(f"feature {f.name!r}: expected length {length} (as feature "
                                     f"{features[0].name!r}; an item's features share one length), got {a.shape[0]}")
            arrays.append(a)
        if self.length_buckets is not None and length > self.length_buckets[-1]:
            raise InvalidRequest(f"expected an item of at most {self.length_buckets[-1]} positions "
                                 f"(the largest length bucket), got length {length}")
        return length, arrays

    def count_rows(self, args, kwargs) -> int:
        """Rows of a multi-row request: the items of its one list."""
        if kwargs or len(args) != 1 or not isinstance(args[0], (list, tuple)):
            got = f"{len(args)} positional and keywords {sorted(kwargs)}" if kwargs or len(args) != 1 \
                else f"a {type(args[0]).__name__}"
            raise InvalidRequest(f"a multi-row request takes one list of items (dicts of features), got {got}")
        return checked_rows(len(args[0]))

    def prepare(self, args, kwargs, rows) -> list:
        """A request as a list of (T, arrays) rows: one for `svc(item)` or `svc(**features)`, k
        for `submit_rows(items)`. InvalidRequest fails this request only."""
        if rows is not None:
            items = list(args[0])
        elif len(args) == 1 and not kwargs:
            items = [args[0]]
        elif not args and kwargs:
            items = [kwargs]
        else:
            raise InvalidRequest(f"expected one item: a dict of features, or the features as keyword "
                                 f"arguments; got {len(args)} positional and keywords {sorted(kwargs)}")
        if self._features is None:
            with self._features_lock:
                if self._features is None:
                    self._set_features(items[0], InvalidRequest, "the first item")
        if rows is None:
            return [self._check_item(items[0])]
        out = []
        for i, item in enumerate(items):
            try:
                out.append(self._check_item(item))
            except InvalidRequest as e:
                raise InvalidRequest(f"item {i} of {rows}: {e}") from None
        return out

    # ------------------------------------------------------------------ batches (worker's threads)

    def bucket_for(self, num_rows: int) -> int:
        """B for a batch of `num_rows` rows."""
        if self.buckets is None:
            return num_rows
        return self.buckets[bisect.bisect_left(self.buckets, num_rows)]

    def length_bucket_for(self, longest: int) -> int:
        """L for a batch whose longest item has `longest` positions."""
        if self.length_buckets is None:
            return longest
        return self.length_buckets[bisect.bisect_left(self.length_buckets, longest)]

    def _buffers(self, b: int, length: int) -> tuple:
        if self._pools is not None:
            try:
                return self._pools.setdefault((b, length), []).pop()
            except IndexError:
                pass
        arrays = [np.empty((b, length) + f.trailing, f.dtype) for f in self._features]
        mask = np.empty((b, length), bool) if self.pass_mask else None
        return arrays, np.empty(b, np.int32), mask

    def gather(self, requests, num_rows):
        rows = [row for r in requests for row in r.values]
        row_lengths = [t for t, _ in rows]
        b = self.bucket_for(num_rows)
        length = self.length_bucket_for(max(row_lengths))
        buffers = self._buffers(b, length)
        arrays, lengths, mask = buffers
        right = self.side == "right"
        for f, buf in zip(self._features, arrays):
            buf[...] = f.pad
        for i, (t, items) in enumerate(rows):
            at = slice(0, t) if right else slice(length - t, length)
            for buf, a in zip(arrays, items):
                buf[i, at] = a
        lengths[:num_rows] = row_lengths
        if num_rows < b:
            # Repeating a real row keeps padded rows inside the input distribution (no length 0
            # to divide by in a mean over positions); they are never returned.
            for buf in arrays:
                buf[num_rows:] = buf[num_rows - 1]
            lengths[num_rows:] = lengths[num_rows - 1]
        kwargs = {}
        if self.pass_lengths:
            kwargs["lengths"] = lengths
        if mask is not None:
            positions = np.arange(length)[None, :]
            if right:
                np.less(positions, lengths[:, None], out=mask)
            else:
                np.greater_equal(positions, (length - lengths)[:, None], out=mask)
            kwargs["mask"] = mask
        features = dict(zip([f.name for f in self._features], arrays))
        return [features], kwargs, (b, length, buffers, row_lengths), b if self.buckets is not None else None

    def scatter(self, output, requests, num_rows, ctx):
        b, length, (arrays, lengths, mask), row_lengths = ctx
        inputs = arrays + [lengths] + ([mask] if mask is not None else [])
        leaves, treedef = jax.tree_util.tree_flatten(output)
        outs = []
        for a in to_host(leaves):
            if a.ndim == 0 or a.shape[0] != b:
                raise BatchOutputError(
                    f"the batch function must return arrays whose leading dimension is the row count B={b} "
                    f"(num_valid={num_rows}), got an output of shape {list(a.shape)}")
            if self.trim_outputs and (a.ndim < 2 or a.shape[1] != length):
                raise BatchOutputError(
                    f"trim_outputs=True needs outputs of shape [B, L, ...] = [{b}, {length}, ...], "
                    f"got an output of shape {list(a.shape)}")
            if any(np.may_share_memory(a, x) for x in inputs):
                a = a.copy()  # the output aliases an input buffer that a later batch will overwrite
            outs.append(a)
        right = self.side == "right"
        row_results = []
        for i in range(num_rows):
            parts = [a[i] for a in outs]
            if self.trim_outputs:
                t = row_lengths[i]
                parts = [p[:t] if right else p[length - t:] for p in parts]
            row_results.append(treedef.unflatten(parts))
        results, i = [], 0
        for r in requests:
            if r.rows is None:
                results.append(row_results[i])
                i += 1
            else:
                results.append(row_results[i:i + r.rows])
                i += r.rows
        return results

    def release(self, ctx):
        b, length, buffers, _ = ctx
        if self._pools is not None:
            self._pools.setdefault((b, length), []).append(buffers)

    @staticmethod
    def slice_rows(values, start, stop):
        return values[start:stop]

    @staticmethod
    def join(parts):
        return [row for part in parts for row in part]
