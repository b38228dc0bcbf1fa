"""rlbatch: an actor-inference harness for reinforcement learning in Python."""
from rlbatch.affinity import pin_threads
from rlbatch.actors import ActorError, ActorPool, ActorStats, PoolStopped
from rlbatch.batcher import BatchedService, Caller
from rlbatch.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rlbatch.decorators import BatchedFunction, batched, service
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
from rlbatch import cli, report
from rlbatch.policy import DEFAULT_BUCKETS, PolicyCaller, PolicyOutput, PolicyService, PolicyStats
from rlbatch.policy_types import Policy
from rlbatch.stats import ServiceStats
from rlbatch.trainer import Progress, TrainReport, Trainer, solved
from rlbatch.trajectory import Trajectory, stack_trajectories
from rlbatch.tuning import Suggestion, suggest_settings

__all__ = [
    "pin_threads",
    "CheckpointError",
    "Progress",
    "TrainReport",
    "Trainer",
    "load_checkpoint",
    "save_checkpoint",
    "solved",
    "ActorError",
    "ActorPool",
    "ActorStats",
    "PoolStopped",
    "BatchedFunction",
    "BatchedService",
    "Caller",
    "ServiceStats",
    "batched",
    "service",
    "BatchOutputError",
    "DeadlineExceeded",
    "InvalidRequest",
    "Learner",
    "ParamsMismatch",
    "DEFAULT_BUCKETS",
    "Policy",
    "PolicyCaller",
    "PolicyOutput",
    "PolicyService",
    "PolicyStats",
    "QueueFull",
    "RLBatchError",
    "ServiceClosed",
    "Suggestion",
    "Trajectory",
    "stack_trajectories",
    "suggest_settings",
]
