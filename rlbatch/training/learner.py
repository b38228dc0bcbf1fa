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

from typing import Any, Callable, NamedTuple, Protocol

from rlbatch.policy.types import Policy

__all__ = ["Learner", "LearnerInitFn", "LearnerUpdateFn"]


class LearnerInitFn(Protocol):
    def __call__(self, key: Any, example_obs: Any, action_space: Any) -> Any: ...


class LearnerUpdateFn(Protocol):
    def __call__(self, state: Any, batch: Any) -> tuple[Any, dict]: ...


class Learner(NamedTuple):
    init: LearnerInitFn
    update: LearnerUpdateFn
    params: Callable[[Any], Any]
    policy: Policy
