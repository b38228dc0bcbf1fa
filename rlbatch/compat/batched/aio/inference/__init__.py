"""batched.aio.inference: asyncio batching for model inference, feature rows padded per feature."""
from rlbatch.compat.batched.aio.inference.model_batch_processor import AsyncModelBatchProcessor, dynamically

__all__ = ["AsyncModelBatchProcessor", "dynamically"]
