"""Compiling the learner's update while the rest of a run starts, off the critical path.

A jitted update compiles at its first call, which is the trainer's first update: the actors have
started and fill the queue meanwhile, and the whole run waits for the compilation (2.7-2.9 s for
CartPole's PPO update on the 2-core machine, about 0.5 s from JAX's persistent cache, tracing
included). `UpdateWarmUp` makes that first call in a thread of its own on a batch of the shape and
dtypes the actors will send, while the main thread builds the policy service and the actor pool;
the trainer's first update then finds the program compiled. The update is a pure function: its
result is thrown away and the learner state is untouched.

    warm = UpdateWarmUp(learner, state, example_obs, unroll_length=T, columns=B * k).start()
    ... build the service and the pool ...
    warm.join()   # before Trainer.run; re-raises what the warm-up raised
"""
from __future__ import annotations

import threading
from typing import Any

import jax
import numpy as np

from rlbatch import Learner, Trajectory

__all__ = ["UpdateWarmUp", "example_batch"]


def example_batch(learner: Learner, params: Any, example_obs: Any, unroll_length: int, columns: int) -> Trajectory:
    """A learner batch of zeros, [T(+1), columns, ...], with the dtypes the actors' trajectories will
    have: observations of the policy's example, actions and extras of the policy's outputs."""
    T, B = unroll_length, columns
    obs = jax.tree_util.tree_map(lambda x: np.zeros((T + 1, B) + np.shape(x), np.asarray(x).dtype), example_obs)
    one = jax.tree_util.tree_map(lambda x: np.zeros((1,) + np.shape(x), np.asarray(x).dtype), example_obs)
    action, extras = jax.eval_shape(learner.policy.apply, params, one, jax.random.PRNGKey(0))[:2]

    def steps(spec):
        return np.zeros((T, B) + tuple(spec.shape[1:]), spec.dtype)

    return Trajectory(obs=obs, action=steps(action), reward=np.zeros((T, B), np.float32),
                      terminated=np.zeros((T, B), np.bool_), truncated=np.zeros((T, B), np.bool_),
                      final_obs=jax.tree_util.tree_map(lambda x: x[:T], obs),
                      extras=jax.tree_util.tree_map(steps, extras), policy_version=np.zeros((T, B), np.int64),
                      episode_id=np.zeros((T, B), np.int64), actor_id=np.zeros(B, np.int64))


class UpdateWarmUp:
    """One throw-away `learner.update` on `example_batch`, in a thread of its own."""

    def __init__(self, learner: Learner, state: Any, example_obs: Any, *, unroll_length: int, columns: int):
        self._learner, self._state = learner, state
        self._batch = example_batch(learner, learner.params(state), example_obs, unroll_length, columns)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="update-warm-up")

    def start(self) -> "UpdateWarmUp":
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            jax.block_until_ready(self._learner.update(self._state, self._batch))
        except BaseException as e:  # noqa: BLE001 - raised again by join, in the main thread
            self._error = e

    def join(self) -> None:
        """Waits for the warm-up; raises what it raised (a batch the learner refuses would fail the
        trainer's first update the same way)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
