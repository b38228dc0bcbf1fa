"""Observation normalisation and reward scaling as learner state, shared by every actor.

The statistics live in the learner's state and travel with the published parameters: the learner
updates them from the trajectories it consumes and the jitted policy applies them, so every actor
normalises with the same numbers (per-actor wrappers such as gymnasium's NormalizeObservation each
keep their own statistics, which drift apart).

- `RunningMeanStd`: mean and variance of rows of shape `mean.shape`, merged batch by batch with
  Chan et al.'s parallel update, in float32 with a float32 count (no float64 on the device; the
  count stays exact up to 2**24 rows, and past that its rounding only shifts the merge weights by
  a relative 1e-7). `update_stats(stats, x, mask)` counts the rows of x where mask is True, so
  padded rows never enter the statistics.
- `normalize`: (x - mean) / sqrt(var + 1e-8), clipped to [-10, 10] as SB3's VecNormalize and
  CleanRL do.
- `normalized_policy`: a `rlbatch.Policy` whose params are {"params": network params,
  "obs_norm": RunningMeanStd} and which normalises observations before the network sees them.
- Reward scaling as CleanRL's NormalizeReward: rewards divided by the running standard deviation
  of the discounted return, accumulated per environment and reset after each episode end
  (`ReturnScaleState`, `scale_rewards`).

Shapes: learner batches are time-major, x [T, B, *shape]; masks [T, B].
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlbatch import Policy

__all__ = [
    "ReturnScaleState",
    "RunningMeanStd",
    "init_return_scale",
    "init_stats",
    "normalize",
    "normalized_policy",
    "scale_rewards",
    "update_stats",
]

OBS_CLIP = 10.0
EPSILON = 1e-8


class RunningMeanStd(NamedTuple):
    mean: jax.Array  # [*shape] float32
    var: jax.Array  # [*shape] float32, population variance (ddof 0)
    count: jax.Array  # [] float32: rows seen


def init_stats(example: Any) -> RunningMeanStd:
    """Statistics of rows shaped like `example` (one row, no batch axis): none seen yet."""
    shape = np.shape(example)
    return RunningMeanStd(jnp.zeros(shape, jnp.float32), jnp.ones(shape, jnp.float32), jnp.zeros((), jnp.float32))


def update_stats(stats: RunningMeanStd, x, mask=None) -> RunningMeanStd:
    """Merges the rows of x [*lead, *shape] where mask [*lead] is True (all rows if mask is None)."""
    shape = stats.mean.shape
    rows = jnp.asarray(x, jnp.float32).reshape((-1, *shape))
    weight = jnp.ones(rows.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32).reshape(-1)
    weight = weight.reshape((-1,) + (1,) * len(shape))
    n = jnp.sum(weight[(slice(None),) + (0,) * len(shape)])
    # A batch of padding only (n = 0) must leave the statistics as they were, without dividing by 0.
    safe_n = jnp.maximum(n, 1.0)
    batch_mean = jnp.sum(weight * rows, axis=0) / safe_n
    batch_var = jnp.sum(weight * (rows - batch_mean) ** 2, axis=0) / safe_n
    total = stats.count + n
    safe_total = jnp.maximum(total, 1.0)
    delta = batch_mean - stats.mean
    mean = stats.mean + delta * (n / safe_total)
    m2 = stats.var * stats.count + batch_var * n + delta**2 * (stats.count * n / safe_total)
    var = m2 / safe_total
    seen = n > 0
    return RunningMeanStd(jnp.where(seen, mean, stats.mean), jnp.where(seen, var, stats.var), total)


def normalize(stats: RunningMeanStd, x, clip: float = OBS_CLIP):
    """(x - mean) / sqrt(var + 1e-8), clipped to [-clip, clip]; float32, any leading dims."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.clip((x - stats.mean) / jnp.sqrt(stats.var + EPSILON), -clip, clip)


def normalized_policy(policy: Policy, clip: float = OBS_CLIP) -> Policy:
    """`policy` behind observation normalisation; params are {"params": ..., "obs_norm": RunningMeanStd}."""

    def init(key, example_obs):
        return {"params": policy.init(key, example_obs), "obs_norm": init_stats(example_obs)}

    def apply(params, obs, key):
        return policy.apply(params["params"], normalize(params["obs_norm"], obs, clip), key)

    return Policy(init=init, apply=apply)


# ------------------------------------------------------------------------------- reward scaling


class ReturnScaleState(NamedTuple):
    stats: RunningMeanStd  # of the discounted return, shape ()
    returns: jax.Array  # [max_envs] float32: each environment's discounted return after its last step seen
    episode: jax.Array  # [max_envs] int32: the episode the next step of that environment must belong to


def init_return_scale(max_envs: int) -> ReturnScaleState:
    return ReturnScaleState(init_stats(0.0), jnp.zeros((max_envs,), jnp.float32), jnp.full((max_envs,), -1, jnp.int32))


def scale_rewards(
    state: ReturnScaleState,
    reward,
    ended,
    env_index,
    first_episode,
    last_episode,
    gamma: float,
    mask=None,
) -> tuple[ReturnScaleState, jax.Array]:
    """CleanRL's NormalizeReward over a [T, B] batch; returns (state, reward / sqrt(var(G) + 1e-8)).

    G[t] = gamma * G[t-1] * (1 - ended[t-1]) + reward[t] per environment, carried across batches.
    ended [T, B]: an episode ended at t (terminated or truncated). env_index [B]: the environment of
    each column (index into the state's tables); first_episode, last_episode [B]: the episode of its
    step 0 and step T-1. A column continues the carried return only if it starts the episode the
    table expects (a dropped or rebuilt environment's trajectory restarts the return at 0). Columns
    are taken in order, so two trajectories of one environment in one batch chain correctly.
    The variance is updated with every G of the batch (where mask is True) before the rewards are
    divided, as the wrapper does step by step.
    """
    reward = jnp.asarray(reward, jnp.float32)
    ended = jnp.asarray(ended, jnp.float32)
    keep = gamma * jnp.concatenate([jnp.ones_like(ended[:1]), 1.0 - ended[:-1]])

    def time_step(carry, inputs):
        g, decay = carry
        r, k = inputs
        g, decay = g * k + r, decay * k
        return (g, decay), (g, decay)

    # Each column's return from its own step 0 (g0), and the factor the carried-in return has at t.
    zeros = jnp.zeros_like(reward[0])
    _, (g0, decay) = jax.lax.scan(time_step, (zeros, jnp.ones_like(zeros)), (reward, keep))

    def column(tables, inputs):
        returns, episode = tables
        env, first, last, g0_last, decay_last, ended_last = inputs
        carry = jnp.where(episode[env] == first, returns[env], 0.0)
        g_last = g0_last + carry * decay_last
        returns = returns.at[env].set(g_last * (1.0 - ended_last))
        episode = episode.at[env].set(last + ended_last.astype(jnp.int32))
        return (returns, episode), carry

    (returns, episode), carry = jax.lax.scan(
        column,
        (state.returns, state.episode),
        (jnp.asarray(env_index, jnp.int32), jnp.asarray(first_episode, jnp.int32),
         jnp.asarray(last_episode, jnp.int32), g0[-1], decay[-1], ended[-1]),
    )
    discounted_return = g0 + carry * decay
    stats = update_stats(state.stats, discounted_return, mask)
    return ReturnScaleState(stats, returns, episode), reward / jnp.sqrt(stats.var + EPSILON)
