"""rlbatch: an actor-inference harness for reinforcement learning in Python."""
from rlbatch.errors import (
    BatchOutputError,
    DeadlineExceeded,
    InvalidRequest,
    ParamsMismatch,
    QueueFull,
    RLBatchError,
    ServiceClosed,
)
from rlbatch.learner import Learner
from rlbatch.policy_types import Policy
from rlbatch.trajectory import Trajectory, stack_trajectories

__all__ = [
    "BatchOutputError",
    "DeadlineExceeded",
    "InvalidRequest",
    "Learner",
    "ParamsMismatch",
    "Policy",
    "QueueFull",
    "RLBatchError",
    "ServiceClosed",
    "Trajectory",
    "stack_trajectories",
]
