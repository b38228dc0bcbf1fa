"""batched's asyncio inference processor: `await fn(features)` or `await fn(**features)`.

As rlbatch.compat.batched.inference (rows queued one by one, padded per feature by
rlbatch.RaggedCollator, results stacked per call), awaited, and bound to no event loop.
`priority_strategy` NONE (default) ignores `small_batch_threshold`, as batched did; PRIORITY and
LENGTH serve calls of at most that many rows first (LENGTH does not order rows by length here).
"""
from __future__ import annotations

import asyncio
from typing import Callable

from rlbatch.compat.batched._core import dynamic_batch
from rlbatch.compat.batched.aio.batch_processor import AsyncBatchProcessor, check_aio_extras
from rlbatch.compat.batched.inference.model_batch_processor import RowBatching
from rlbatch.compat.batched.types import AsyncCache, PriorityStrategy
from rlbatch.compat.batched.utils import ensure_async

__all__ = ["AsyncModelBatchProcessor", "dynamically"]


class AsyncModelBatchProcessor(AsyncBatchProcessor):
    """Args as inference.ModelBatchProcessor, plus priority_strategy; `cache` and
    `max_batch_length` are not supported for feature rows (they raise)."""

    def __init__(self, _func: Callable, *, batch_size: int = 32, timeout_ms: float = 5.0,
                 small_batch_threshold: int = 8, cache: AsyncCache | None = None,
                 max_batch_length: int | None = None, pad_tokens: dict | None = None, padding_side: str = "right",
                 priority_strategy: PriorityStrategy = PriorityStrategy.NONE, batch_item_cls: type | None = None,
                 spread_kwargs: bool = False):
        self.priority_strategy = check_aio_extras(max_batch_length, priority_strategy, cache)
        if cache is not None:
            raise NotImplementedError("cache is not supported for inference processors by "
                                      f"rlbatch.compat.batched: expected None, got {type(cache).__name__}")
        self._rows = RowBatching(_func, batch_size, timeout_ms, small_batch_threshold, pad_tokens, padding_side,
                                 spread_kwargs, threshold_used=self.priority_strategy != PriorityStrategy.NONE)
        self.batch_func = ensure_async(_func)
        self.batch_size, self.timeout_ms = batch_size, timeout_ms
        self.small_batch_threshold = small_batch_threshold
        self.batch_item_cls = batch_item_cls
        self.cache = None
        self.pad_tokens = self._rows.pad_tokens
        self.padding_side = padding_side
        self.spread_kwargs = spread_kwargs
        self._slot = self._rows.slot

    async def __call__(self, *args, **kwargs):
        rows, torch_in = self._rows.rows(args, kwargs)
        futures = self._slot.get().submit_many(rows)
        results = await asyncio.gather(*[asyncio.wrap_future(f) for f in futures])
        return self._rows.join(list(results), torch_in)


def dynamically(func: Callable | None = None, /, *, batch_size: int = 32, timeout_ms: float = 5.0,
                small_batch_threshold: int = 8, max_batch_length: int | None = None,
                pad_tokens: dict | None = None, padding_side: str = "right",
                priority_strategy: PriorityStrategy = PriorityStrategy.NONE, cache: AsyncCache | None = None,
                batch_item_cls: type | None = None, spread_kwargs: bool = False, pad_token: dict | None = None):
    """`@aio.inference.dynamically(...)` on a model function or method (sync or async)."""
    if pad_token is not None:
        if pad_tokens is not None:
            raise TypeError("give pad_tokens or pad_token (the same setting), not both")
        pad_tokens = pad_token

    def make(f):
        return AsyncModelBatchProcessor(f, batch_size=batch_size, timeout_ms=timeout_ms,
                                        small_batch_threshold=small_batch_threshold, cache=cache,
                                        max_batch_length=max_batch_length, pad_tokens=pad_tokens,
                                        padding_side=padding_side, priority_strategy=priority_strategy,
                                        batch_item_cls=batch_item_cls, spread_kwargs=spread_kwargs)

    return dynamic_batch(make, func)
