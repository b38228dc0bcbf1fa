"""Actor threads that play environments through a PolicyService and cut trajectories."""
from rlbatch.actors.pool import ActorPool
from rlbatch.actors.stats import ActorFault, ActorStats
from rlbatch.actors.trajectory import Trajectory, stack_trajectories
from rlbatch.errors import PoolStopped

ActorError = ActorFault  # kept for existing callers

__all__ = ["ActorError", "ActorFault", "ActorPool", "ActorStats", "PoolStopped", "Trajectory", "stack_trajectories"]
