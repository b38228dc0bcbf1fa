"""Plugging in your own model: a hand-written linear softmax policy with a linear value.

A learner needs three pure functions; any JAX code (plain jax, flax, equinox, haiku) can supply them:

    policy.init(key, example_obs) -> params            # example_obs: ONE observation
    policy.apply(params, obs, key) -> (action, extras) # obs [B, D]; extras: log_prob [B], value [B]
    evaluate(params, obs, action) -> (log_prob, entropy, value)   # any leading dims, e.g. [T, B]
    value(params, obs) -> value

Wrap them in `ActorCritic` and hand it to `make_ppo` or `make_impala`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from agents.impala import make_impala
from agents.networks import ActorCritic
from rlbatch import Learner, Policy

__all__ = ["make_linear_actor_critic", "make_linear_impala"]


def make_linear_actor_critic(num_actions: int) -> ActorCritic:
    """logits = obs @ w_pi, value = obs @ w_v, for flat vector observations [..., D]."""

    def init(key, example_obs):
        obs_dim = example_obs.shape[-1]
        return {"w_pi": 0.01 * jax.random.normal(key, (obs_dim, num_actions)), "w_v": jnp.zeros((obs_dim,))}

    def heads(params, obs):
        return obs @ params["w_pi"], obs @ params["w_v"]

    def evaluate(params, obs, action):
        logits, value = heads(params, obs)
        log_probs = jax.nn.log_softmax(logits)
        log_prob = jnp.take_along_axis(log_probs, action[..., None].astype(jnp.int32), axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
        return log_prob, entropy, value

    def apply(params, obs, key):
        logits, value = heads(params, obs)
        action = jax.random.categorical(key, logits).astype(jnp.int32)
        log_prob, _, _ = evaluate(params, obs, action)
        return action, {"log_prob": log_prob, "value": value}

    return ActorCritic(policy=Policy(init=init, apply=apply), evaluate=evaluate, value=lambda p, o: heads(p, o)[1])


def make_linear_impala(num_actions: int, **impala_kwargs) -> Learner:
    """An IMPALA learner for the linear model: the same Learner interface as the built-in networks."""
    return make_impala(make_linear_actor_critic(num_actions), **impala_kwargs)
