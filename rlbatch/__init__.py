"""rlbatch: an actor-inference harness for reinforcement learning in Python."""
from rlbatch.actors import ActorError, ActorFault, ActorPool, ActorStats, Trajectory, stack_trajectories
from rlbatch.affinity import pin_threads
from rlbatch.cpu_runtime import configure_cpu_jax
from rlbatch.batching import BatchedFunction, BatchedService, Caller, RaggedCollator, ServiceStats, batched, service
from rlbatch.errors import (
    BatchOutputError,
    DeadlineExceeded,
    InvalidRequest,
    ParamsMismatch,
    PoolStopped,
    QueueFull,
    RLBatchError,
    ServiceClosed,
    TrajectoryRefused,
)
from rlbatch.policy import DEFAULT_BUCKETS, Policy, PolicyCaller, PolicyOutput, PolicyService, PolicyStats
from rlbatch.training import (
    CheckpointError,
    Learner,
    PolicySink,
    Progress,
    StopReason,
    TrainReport,
    Trainer,
    TrajectorySource,
    load_checkpoint,
    save_checkpoint,
    solved,
)

__all__ = [
    # batching
    "BatchedFunction",
    "BatchedService",
    "Caller",
    "RaggedCollator",
    "ServiceStats",
    "batched",
    "service",
    # policy
    "DEFAULT_BUCKETS",
    "Policy",
    "PolicyCaller",
    "PolicyOutput",
    "PolicyService",
    "PolicyStats",
    # actors
    "ActorError",
    "ActorFault",
    "ActorPool",
    "ActorStats",
    "Trajectory",
    "stack_trajectories",
    # training
    "Learner",
    "PolicySink",
    "Progress",
    "StopReason",
    "TrainReport",
    "Trainer",
    "TrajectorySource",
    "load_checkpoint",
    "save_checkpoint",
    "solved",
    # errors
    "BatchOutputError",
    "CheckpointError",
    "DeadlineExceeded",
    "InvalidRequest",
    "ParamsMismatch",
    "PoolStopped",
    "QueueFull",
    "RLBatchError",
    "ServiceClosed",
    "TrajectoryRefused",
    # threads and the CPU runtime
    "configure_cpu_jax",
    "pin_threads",
]
