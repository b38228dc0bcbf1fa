"""batched's inference processor: calls are batches of feature rows, padded per feature.

    @batched.inference.dynamically(pad_tokens={"input_ids": 0}, padding_side="left")
    def embed(features: dict[str, np.ndarray]) -> np.ndarray: ...

    embed(input_ids=np.array([[1, 2, 3]]))               # one row -> an array of 1 row
    embed({"input_ids": [np.array([1, 2]), np.array([3])]})  # two rows of different lengths

Each row of a call is queued as one item (the rows of a call may go in different batches, and
`small_batch_threshold` counts rows); a batch is padded by rlbatch.RaggedCollator and passed as
`func(features)` (or `func(**features)` with `spread_kwargs=True`); the call gets its rows'
results stacked on axis 0, with the batch's padded length (an identity function returns the
padding). Rows keep their dtype, which the first call fixes per feature (batched cast everything
to int64); torch tensors in give torch tensors to the function and back. A wrong number of output
rows fails the batch's callers (batched left some of them waiting forever).
"""
from __future__ import annotations

import asyncio
import sys
from typing import Callable, Mapping

import jax
import numpy as np

from rlbatch.batching.ragged import RaggedCollator
from rlbatch.batching.service import BatchedService
from rlbatch.compat.batched._core import ServiceSlot, check_settings, dynamic_batch
from rlbatch.compat.batched.batch_processor import BatchProcessor
from rlbatch.compat.batched.inference.helper import is_torch, stack_outputs, to_numpy, unstack_features

__all__ = ["ModelBatchProcessor", "dynamically", "RowBatching"]


class RowBatching:
    """What the thread and aio inference processors share: settings, the service, rows."""

    def __init__(self, func: Callable, batch_size, timeout_ms, small_batch_threshold, pad_tokens,
                 padding_side, spread_kwargs, threshold_used: bool = True):
        if not callable(func):
            raise TypeError(f"the batch function must be callable, got {type(func).__name__}")
        check_settings(batch_size, timeout_ms, small_batch_threshold)
        if pad_tokens is not None and not isinstance(pad_tokens, Mapping):
            raise TypeError(f"pad_tokens must be a dict {{feature: pad value}}, got {type(pad_tokens).__name__}")
        self.func = func
        self.batch_size, self.timeout_ms = batch_size, timeout_ms
        self.pad_tokens = dict(pad_tokens or {})
        self.padding_side = padding_side
        self.spread_kwargs = spread_kwargs
        self._threshold = small_batch_threshold if threshold_used else None
        self._keys: tuple = ()
        self._torch = False  # once a call passed torch tensors, the function gets torch tensors
        self.slot = ServiceSlot(self._make_service)

    def _make_service(self) -> BatchedService:
        # Pad tokens of features the first call does not have are ignored, as batched did.
        pads = {k: v for k, v in self.pad_tokens.items() if k in self._keys}
        collator = RaggedCollator(pad_value=pads, side="left" if self.padding_side == "left" else "right",
                                  pass_lengths=False)
        return BatchedService(self._run_batch, self.batch_size, self.timeout_ms / 1000.0, collator=collator,
                              implicit_callers=False, small_batch_threshold=self._threshold,
                              name=getattr(self.func, "__name__", None))

    def _run_batch(self, features: dict, num_valid: int):
        if self._torch:
            torch = sys.modules["torch"]
            features = {k: torch.from_numpy(v) for k, v in features.items()}
        output = self.func(**features) if self.spread_kwargs else self.func(features)
        if asyncio.iscoroutine(output):  # an async def: the worker runs it on its own loop
            return self._to_numpy_later(output)
        return jax.tree_util.tree_map(to_numpy, output)

    async def _to_numpy_later(self, output):
        return jax.tree_util.tree_map(to_numpy, await output)

    def rows(self, args: tuple, kwargs: dict) -> tuple[list[dict], bool]:
        """A call's rows as numpy feature dicts, and whether it passed torch tensors."""
        if args and kwargs or len(args) > 1:
            raise TypeError(f"expected the features as one dict or as keyword arguments, got "
                            f"{len(args)} positional arguments and keywords {sorted(kwargs)}")
        features = args[0] if args else kwargs
        rows = unstack_features(features)
        if not rows:
            raise ValueError("expected at least one row of features, got 0 rows")
        torch_in = any(is_torch(v) or (isinstance(v, list) and v and is_torch(v[0])) for v in features.values())
        if torch_in:
            self._torch = True
        if not self._keys:
            self._keys = tuple(features)
        return [{k: to_numpy(v) for k, v in row.items()} for row in rows], torch_in

    @staticmethod
    def join(results: list, torch_in: bool):
        return stack_outputs(results, sys.modules["torch"] if torch_in else np)


class ModelBatchProcessor(BatchProcessor):
    """Thread processor for model inference: `processor(features)` or `processor(**features)`.

    Args as BatchProcessor, plus:
      pad_tokens: {feature: pad value} (features not named pad with 0).
      padding_side: "left" pads before a row; anything else after it (as batched).
      spread_kwargs: call `func(**features)` instead of `func(features)`.
    """

    def __init__(self, _func: Callable, *, batch_size: int = 32, timeout_ms: float = 5.0,
                 small_batch_threshold: int = 8, pad_tokens: dict | None = None, padding_side: str = "right",
                 spread_kwargs: bool = False):
        self._rows = RowBatching(_func, batch_size, timeout_ms, small_batch_threshold, pad_tokens,
                                 padding_side, spread_kwargs)
        self.batch_func = _func
        self.batch_size, self.timeout_ms = batch_size, timeout_ms
        self.small_batch_threshold = small_batch_threshold
        self.pad_tokens = self._rows.pad_tokens
        self.padding_side = padding_side
        self.spread_kwargs = spread_kwargs
        self._slot = self._rows.slot

    def __call__(self, *args, **kwargs):
        rows, torch_in = self._rows.rows(args, kwargs)
        futures = self._slot.get().submit_many(rows)
        return self._rows.join([f.result() for f in futures], torch_in)

    async def acall(self, *args, **kwargs):
        rows, torch_in = self._rows.rows(args, kwargs)
        futures = self._slot.get().submit_many(rows)
        results = await asyncio.gather(*[asyncio.wrap_future(f) for f in futures])
        return self._rows.join(list(results), torch_in)


def dynamically(func: Callable | None = None, /, *, batch_size: int = 32, timeout_ms: float = 5.0,
                small_batch_threshold: int = 8, pad_tokens: dict | None = None, padding_side: str = "right",
                spread_kwargs: bool = False, pad_token: dict | None = None):
    """`@inference.dynamically(...)` on a model function or method: a ModelBatchProcessor.

    `pad_token` is accepted as another name for `pad_tokens` (batched's README spells it so,
    its code does not)."""
    if pad_token is not None:
        if pad_tokens is not None:
            raise TypeError("give pad_tokens or pad_token (the same setting), not both")
        pad_tokens = pad_token
    check_settings(batch_size, timeout_ms, small_batch_threshold)

    def make(f):
        return ModelBatchProcessor(f, batch_size=batch_size, timeout_ms=timeout_ms,
                                   small_batch_threshold=small_batch_threshold, pad_tokens=pad_tokens,
                                   padding_side=padding_side, spread_kwargs=spread_kwargs)

    return dynamic_batch(make, func)
