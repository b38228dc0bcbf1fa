"""The policy service: a jit-compiled JAX policy behind a BatchedService, one program per bucket."""
from rlbatch.policy.service import (
    DEFAULT_BUCKETS,
    InlinePolicyCaller,
    PolicyCaller,
    PolicyOutput,
    PolicyService,
    PolicyStats,
)
from rlbatch.policy.types import Policy

__all__ = ["DEFAULT_BUCKETS", "InlinePolicyCaller", "Policy", "PolicyCaller", "PolicyOutput", "PolicyService", "PolicyStats"]
