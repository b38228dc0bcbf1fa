"""Policy lag: how many learner updates separate the parameters that chose an action from the
update that trains on it.

Shapes: a trajectory's `policy_version` is [T] (one environment) or [T, k] (k environments per
actor); each entry is the PolicyService parameter version that chose `action[t]`.

The trainer tells the tracker which version carries the parameters of how many updates
(`published(version, updates)`); the lag of one step trained after `updates` updates is then

    lag = updates - updates_at[policy_version]

With `max_policy_lag`, a trajectory holding any step with a larger lag is refused whole: a
trajectory is the unit a learner consumes, and cutting single steps out of it would break its
time axis. Refused trajectories count in `stale_trajectories_dropped` and all their steps in
`stale_steps_dropped`; the lag statistics cover the steps the learner was given (`trained`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from rlbatch.actors.trajectory import Trajectory

__all__ = ["PolicyLag", "PolicyLagStats"]


@dataclasses.dataclass(frozen=True)
class PolicyLagStats:
    """Lag over every step trained on so far, in learner updates.

    Attributes:
      samples: steps counted by `trained` (every step of every trajectory a learner update got).
      min, mean, max: lag of those steps; nan before any.
      stale_trajectories_dropped: trajectories refused for a step staler than `max_policy_lag`.
      stale_steps_dropped: steps in those trajectories (all of them, not only the stale ones).
    """

    samples: int
    min: float
    mean: float
    max: float
    stale_trajectories_dropped: int
    stale_steps_dropped: int


class PolicyLag:
    """Per-step policy lag of trajectories against the learner's update count.

    Args:
      version: the service's parameter version when training starts (its parameters carry
        `updates` updates).
      updates: learner updates behind `version` (0 for a fresh learner, more after a restore).
      max_policy_lag: refuse trajectories with any step staler than this (None: admit all).
    """

    def __init__(self, version: int, *, updates: int = 0, max_policy_lag: int | None = None):
        if max_policy_lag is not None and (not isinstance(max_policy_lag, int) or max_policy_lag < 0):
            raise ValueError(f"PolicyLag: max_policy_lag must be an int >= 0 or None, got {max_policy_lag!r}")
        self.max_policy_lag = max_policy_lag
        self._updates_at_version = {int(version): int(updates)}
        self._samples = 0
        self._lag_sum = 0
        self._lag_min = math.inf
        self._lag_max = -math.inf
        self._dropped_trajectories = 0
        self._dropped_steps = 0

    def published(self, version: int, updates: int) -> None:
        """Records that parameter `version` holds the learner's state after `updates` updates."""
        self._updates_at_version[int(version)] = int(updates)

    def lags(self, trajectory: Trajectory, updates: int) -> np.ndarray:
        """The lag of each step of `trajectory` if trained after `updates` updates; shape of its
        `policy_version`. Raises ValueError for a version this tracker was never told of."""
        versions, inverse = np.unique(np.asarray(trajectory.policy_version), return_inverse=True)
        behind = np.empty(len(versions), np.int64)
        for i, v in enumerate(versions):
            known = self._updates_at_version.get(int(v))
            if known is None:
                raise ValueError(
                    f"PolicyLag: trajectory of actor {trajectory.actor_id} has policy_version {int(v)}, "
                    f"expected one of the published versions {sorted(self._updates_at_version)}")
            behind[i] = known
        return (updates - behind)[inverse].reshape(np.shape(trajectory.policy_version))

    def admit(self, trajectory: Trajectory, updates: int) -> np.ndarray | None:
        """The lags of `trajectory`'s steps if trained after `updates` updates (as `lags`), or None
        if one of them exceeds `max_policy_lag`: the trajectory is then counted as dropped."""
        lag = self.lags(trajectory, updates)
        if self.max_policy_lag is not None and lag.max() > self.max_policy_lag:
            self._dropped_trajectories += 1
            self._dropped_steps += int(np.size(trajectory.reward))
            return None
        return lag

    def trained(self, lags: Sequence[np.ndarray]) -> None:
        """Counts the steps a learner update was given, from what `admit` returned for each of its
        trajectories. Admitted trajectories that never reach an update (a batch left unfinished
        when the source stops) are not counted."""
        for lag in lags:
            self._samples += int(lag.size)
            self._lag_sum += int(lag.sum())
            self._lag_min = min(self._lag_min, int(lag.min()))
            self._lag_max = max(self._lag_max, int(lag.max()))

    @property
    def stats(self) -> PolicyLagStats:
        if not self._samples:
            lo = mean = hi = math.nan
        else:
            lo, mean, hi = float(self._lag_min), self._lag_sum / self._samples, float(self._lag_max)
        return PolicyLagStats(samples=self._samples, min=lo, mean=mean, max=hi,
                              stale_trajectories_dropped=self._dropped_trajectories,
                              stale_steps_dropped=self._dropped_steps)
