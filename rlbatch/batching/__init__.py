"""Dynamic batching: many callers, one input each; one worker, one batch function call per batch."""
from rlbatch.batching.decorators import BatchedFunction, batched, service
from rlbatch.batching.ragged import RaggedCollator
from rlbatch.batching.service import BatchedService, Caller
from rlbatch.batching.stats import ServiceStats

__all__ = ["BatchedFunction", "BatchedService", "Caller", "RaggedCollator", "ServiceStats", "batched", "service"]
