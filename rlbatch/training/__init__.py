"""The trainer loop and the pieces it is made of.

- `trainer`: `Trainer`, the loop (take a batch, update, publish, report);
- `interfaces`: `TrajectorySource` and `PolicySink`, all the trainer uses of an ActorPool and a
  PolicyService;
- `lag`: `PolicyLag`, per-step policy lag and `max_policy_lag`;
- `learner`: `Learner`, the NamedTuple of pure functions an agent provides;
- `checkpoint`: `save_checkpoint` / `load_checkpoint` to plain .npz files;
- `results`: `Progress`, `TrainReport`, `StopReason` and the `solved` condition.
"""
from rlbatch.errors import CheckpointError
from rlbatch.training.checkpoint import load_checkpoint, save_checkpoint
from rlbatch.training.interfaces import PolicySink, SourceStats, TrajectorySource
from rlbatch.training.lag import PolicyLag, PolicyLagStats
from rlbatch.training.learner import Learner
from rlbatch.training.results import Progress, StopReason, TrainReport, solved
from rlbatch.training.trainer import Trainer

__all__ = ["CheckpointError", "Learner", "PolicyLag", "PolicyLagStats", "PolicySink", "Progress", "SourceStats",
           "StopReason", "TrainReport", "Trainer", "TrajectorySource", "load_checkpoint", "save_checkpoint",
           "solved"]
