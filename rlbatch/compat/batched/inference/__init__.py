"""batched.inference: batching for model inference, feature rows padded per feature."""
from rlbatch.compat.batched.inference import helper
from rlbatch.compat.batched.inference.model_batch_processor import ModelBatchProcessor, dynamically

__all__ = ["ModelBatchProcessor", "dynamically", "helper"]
