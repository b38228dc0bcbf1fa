"""Actor threads that play environments through a PolicyService and cut trajectories."""
from rlbatch.actors.pool import ActorError, ActorPool, ActorStats, PoolStopped
from rlbatch.actors.trajectory import Trajectory, stack_trajectories

__all__ = ["ActorError", "ActorPool", "ActorStats", "PoolStopped", "Trajectory", "stack_trajectories"]
