"""The part of a `rlbatch.Trajectory` that learners use, with fixed dtypes.

Learners jit-compile on these arrays only, so extra fields (policy_version, episode_id, actor_id,
other extras) and dtype drift (int vs bool flags) never cause a retrace.
Shapes are time-major: obs [T+1, B, ...], final_obs [T, B, ...], every other field [T, B, ...],
except the per-column env_index, first_episode and last_episode [B], split out of `episode_id`
((env_index << 32) | episode) here on the host, where int64 exists.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from rlbatch import Trajectory


# The low 32 bits of an episode_id count one environment's episodes (rlbatch.TrajectoryBuilder); 31 of
# them keep the count a non-negative int32, and a count that wraps does so alike at both ends of a batch.
_EPISODE_MASK = (1 << 31) - 1


class LearnerBatch(NamedTuple):
    obs: Any
    action: Any
    reward: Any
    terminated: Any
    truncated: Any
    final_obs: Any
    behaviour_log_prob: Any
    env_index: Any  # [B] int32: the pool-wide environment of each column
    first_episode: Any  # [B] int32: that environment's episode count at step 0
    last_episode: Any  # [B] int32: ... and at step T-1


def _canonical(x) -> np.ndarray:
    """int64 -> int32 and float64 -> float32 (what numpy and gymnasium hand out varies); uint8 stays."""
    x = np.asarray(x)
    if x.dtype == np.int64:
        return x.astype(np.int32)
    if x.dtype == np.float64:
        return x.astype(np.float32)
    return x


def learner_batch(batch: Trajectory) -> LearnerBatch:
    if "log_prob" not in batch.extras:
        raise ValueError(
            f"learner.update: expected batch.extras['log_prob'] (behaviour log-probs), got extras {sorted(batch.extras)}"
        )
    if np.ndim(batch.reward) != 2:
        raise ValueError(
            f"learner.update: expected a time-major batch with reward [T, B], got reward shape {np.shape(batch.reward)}"
        )
    episode_id = np.asarray(batch.episode_id, np.int64)
    return LearnerBatch(
        obs=jax.tree_util.tree_map(_canonical, batch.obs),
        action=_canonical(batch.action),
        reward=np.asarray(batch.reward, np.float32),
        terminated=np.asarray(batch.terminated, bool),
        truncated=np.asarray(batch.truncated, bool),
        final_obs=jax.tree_util.tree_map(_canonical, batch.final_obs),
        behaviour_log_prob=np.asarray(batch.extras["log_prob"], np.float32),
        env_index=(episode_id[0] >> 32).astype(np.int32),
        first_episode=(episode_id[0] & _EPISODE_MASK).astype(np.int32),
        last_episode=(episode_id[-1] & _EPISODE_MASK).astype(np.int32),
    )


def check_action_space(network, action_space, who: str) -> None:
    if network.action_space is not None and action_space is not None and network.action_space != action_space:
        raise ValueError(
            f"{who}.init: the network was built for action space {network.action_space!r}, got {action_space!r}"
        )
