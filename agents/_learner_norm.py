"""What a learner does with `agents.normalize`: its state, its batch preprocessing, what it publishes.

Both learners take `normalize_obs` and `normalize_reward` options; this module keeps the two uses
identical. Inside the jitted update, `apply` first merges the batch's observations obs[:-1] [T, B]
into the running statistics (obs[T] is the next trajectory's obs[0], counted there; final_obs rows
are counted as the environment wrapper never counts them either), then normalises obs and final_obs
with the merged statistics, then scales the rewards. The published parameters carry the statistics
so that the actors' policy normalises as the learner does.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from agents import normalize
from agents._batch import LearnerBatch
from rlbatch import Policy


class NormState(NamedTuple):
    obs: Optional[normalize.RunningMeanStd] = None  # None when observations are not normalised
    returns: Optional[normalize.ReturnScaleState] = None  # None when rewards are not scaled


class BatchNormalizer(NamedTuple):
    init: Callable[[Any], NormState]  # example_obs -> NormState
    apply: Callable[[NormState, LearnerBatch], tuple]  # jitted: -> (NormState, LearnerBatch)
    check: Callable[[LearnerBatch], None]  # on the host, before the jitted update
    published: Callable[[Any, NormState], Any]  # (network params, NormState) -> the policy's params
    policy: Policy  # the policy those published params are applied with


def make_batch_normalizer(
    policy: Policy, *, normalize_obs: bool, normalize_reward: bool, gamma: float, max_envs: int, who: str
) -> BatchNormalizer:
    def init(example_obs) -> NormState:
        obs = normalize.init_stats(example_obs) if normalize_obs else None
        returns = normalize.init_return_scale(max_envs) if normalize_reward else None
        return NormState(obs, returns)

    def apply(state: NormState, batch: LearnerBatch):
        obs_stats, returns = state
        if normalize_obs:
            obs_stats = normalize.update_stats(obs_stats, batch.obs[:-1])
            batch = batch._replace(obs=normalize.normalize(obs_stats, batch.obs),
                                   final_obs=normalize.normalize(obs_stats, batch.final_obs))
        if normalize_reward:
            returns, reward = normalize.scale_rewards(
                returns, batch.reward, batch.terminated | batch.truncated, batch.env_index,
                batch.first_episode, batch.last_episode, gamma,
            )
            batch = batch._replace(reward=reward)
        return NormState(obs_stats, returns), batch

    def check(batch: LearnerBatch) -> None:
        if normalize_obs and not isinstance(batch.obs, np.ndarray):
            raise ValueError(f"{who}: normalize_obs expects array observations, got {type(batch.obs).__name__}")
        if normalize_reward and batch.env_index.size and int(batch.env_index.max()) >= max_envs:
            raise ValueError(
                f"{who}: normalize_reward keeps returns for max_envs={max_envs} environments, "
                f"got a trajectory of environment {int(batch.env_index.max())} (from its episode_id)"
            )

    def published(params, state: NormState):
        return {"params": params, "obs_norm": state.obs} if normalize_obs else params

    served = normalize.normalized_policy(policy) if normalize_obs else policy
    return BatchNormalizer(init=init, apply=apply, check=check, published=published, policy=served)
