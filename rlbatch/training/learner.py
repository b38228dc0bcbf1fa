"""The learner interface that agents implement, in the style of optax's GradientTransformation.

A learner is a NamedTuple of pure functions; the trainer calls them, agents provide them:

    state = learner.init(key, example_obs, action_space)
    state, metrics = learner.update(state, batch)    # batch: Trajectory, time-major [T, B, ...]
    params = learner.params(state)                     # what the policy service runs
    action, extras = learner.policy.apply(params, obs, key)

`update` is jit-compiled by the learner itself (once: the batch shape is fixed by the trainer).
`metrics` is a flat dict of scalars (losses, entropy, grad norm, ...).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Protocol

from rlbatch.actors.trajectory import Trajectory
from rlbatch.policy.types import Policy

__all__ = ["Learner", "LearnerInitFn", "LearnerUpdateFn"]


class LearnerInitFn(Protocol):
    def __call__(self, key: Any, example_obs: Any, action_space: Any) -> Any:
        """A fresh learner state for observations like `example_obs` (one, no batch axis)."""


class LearnerUpdateFn(Protocol):
    def __call__(self, state: Any, batch: Trajectory) -> tuple[Any, Mapping[str, Any]]:
        """One update on a time-major batch [T, B, ...]; returns the new state and scalar metrics."""


class Learner(NamedTuple):
    """The functions a trainer needs from an agent; all pure (state in, state out)."""

    init: LearnerInitFn
    update: LearnerUpdateFn
    params: Callable[[Any], Any]  # learner state -> the parameters the policy service runs
    policy: Policy  # the policy those parameters are applied with
