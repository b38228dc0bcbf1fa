"""The policy step every comparison baseline runs: the same jitted step PolicyService runs.

A policy reaches the environment baselines (experiments.lib.env_loops) as `act_fn(obs, i) ->
actions`: obs leaves have the batch axis first ([B, ...]), actions come back as a numpy array
[B, ...], and `i` counts the calls (the batch index of PolicyService's key schedule).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

__all__ = ["jit_policy_step", "policy_act_fn"]


def jit_policy_step(apply_fn: Callable) -> Callable:
    """A fresh jax.jit of one policy step with PolicyService's key schedule (batch i: fold_in(key, i)).

    step(params, obs [B, ...], key, i) -> apply_fn(params, obs, fold_in(key, i)). Fresh on every
    call (a new function object), so its compilation cache starts empty.
    """

    def step(params, obs, key, i):
        return apply_fn(params, obs, jax.random.fold_in(key, i))

    return jax.jit(step)


def policy_act_fn(step_fn: Callable, params: Any, key) -> Callable:
    """`act_fn(obs, i) -> np.ndarray actions` for the environment baselines, from a jitted step."""

    def act(obs, i):
        return np.asarray(step_fn(params, obs, key, np.uint32(i))[0])

    return act
