"""What the Trainer needs of its trajectory source and of the policy service it publishes to.

The trainer touches the two only through these protocols, so anything with the same public
surface can take their place: `ActorPool` and `PolicyService` satisfy them, a fleet of actor
processes or a remote policy server can too, and tests pass small fakes.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from rlbatch.actors.trajectory import Trajectory

__all__ = ["PolicySink", "SourceStats", "TrajectorySource"]


@runtime_checkable
class SourceStats(Protocol):
    """The counters of a trajectory source that the trainer reports (`ActorStats` has them)."""

    @property
    def env_steps(self) -> int:
        """Environment steps taken so far (every environment, every actor)."""

    @property
    def episodes(self) -> int:
        """Episodes finished so far."""

    @property
    def recent_return_mean(self) -> float:
        """Mean return of the most recent finished episodes; nan before any."""


@runtime_checkable
class TrajectorySource(Protocol):
    """Something that produces trajectories until it is stopped, as `ActorPool` does.

    Trajectories are time-major: per-step fields [T] or [T, k], `obs` [T+1] or [T+1, k].
    """

    def start(self) -> Any:
        """Starts producing trajectories; called once, by the trainer when `started` is False."""

    @property
    def started(self) -> bool:
        """`start()` has been called (the source may have stopped since)."""

    def get(self, timeout: float | None = None) -> Trajectory:
        """The next trajectory, blocking up to `timeout` seconds (None: until one comes).

        Raises `rlbatch.errors.PoolStopped` once the source is stopped and drained.
        """

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stops producing and releases every resource; True if that finished within `timeout`.
        Safe to call more than once."""

    @property
    def stats(self) -> SourceStats:
        """A snapshot of the source's counters."""


@runtime_checkable
class PolicySink(Protocol):
    """The service whose parameters the trainer replaces, as `PolicyService` does."""

    def update_params(self, params: Any) -> int:
        """Publishes `params`; returns their version, which later trajectories carry."""

    @property
    def version(self) -> int:
        """The version of the parameters in use."""

    @property
    def params(self) -> Any:
        """The parameters in use."""

    def close(self) -> None:
        """Stops serving; safe to call more than once."""
