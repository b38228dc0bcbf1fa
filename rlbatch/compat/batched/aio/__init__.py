"""batched.aio: the asyncio processors (`await fn(x)`; sync or async batch functions)."""
from rlbatch.compat.batched.aio.batch_processor import AsyncBatchProcessor, dynamically
from rlbatch.compat.batched.aio import inference

__all__ = ["AsyncBatchProcessor", "dynamically", "inference"]
