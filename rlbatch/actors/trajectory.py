"""Trajectories: fixed-length, time-major pieces of experience cut by actors.

Shapes (T = unroll length, k = environments per actor, B = trajectories in a learner batch):

- one actor with one environment: `obs` [T+1, ...], every other per-step field [T, ...];
- one actor with k environments: the env axis comes second, `obs` [T+1, k, ...], `action` [T, k, ...];
- a learner batch (`stack_trajectories`): [T+1, B, ...] and [T, B, ...], where an actor's k
  environments become k columns of B.

`obs[t]` is the observation on which `action[t]` was taken; `obs[T]` is the bootstrap observation.
When an episode ends at step t (`terminated[t]` or `truncated[t]`), `obs[t+1]` is already the first
observation of the next episode and `final_obs[t]` holds the true last observation of the one that
ended, so a learner can bootstrap a truncated episode from it (a terminated one is not bootstrapped).
`final_obs` is zero wherever no episode ended.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = ["Trajectory", "stack_trajectories"]


class Trajectory(NamedTuple):
    obs: Any  # [T+1, (k,) ...] (a pytree of arrays if the observation is one)
    action: np.ndarray  # [T, (k,) ...]
    reward: np.ndarray  # [T, (k,)] float32
    terminated: np.ndarray  # [T, (k,)] bool: the episode ended in a terminal state, no bootstrap
    truncated: np.ndarray  # [T, (k,)] bool: the episode was cut (time limit), bootstrap from final_obs
    final_obs: Any  # [T, (k,) ...] last observation of an episode that ended at t, zeros elsewhere
    extras: dict  # per-step policy outputs, e.g. {"log_prob": [T, (k,)], "value": [T, (k,)]}
    policy_version: np.ndarray  # [T, (k,)] int64: parameter version that chose action[t]
    episode_id: np.ndarray  # [T, (k,)] int64: id of the episode each step belongs to
    actor_id: Any  # int for one actor's trajectory, [B] int64 after stacking


def _tree_map(fn, *trees):
    import jax

    return jax.tree_util.tree_map(fn, *trees)


def stack_trajectories(trajectories: Sequence[Trajectory]) -> Trajectory:
    """Stacks trajectories along a new batch axis 1, time-major: [T, B, ...].

    Trajectories from actors with k environments contribute k columns each.
    """
    if not trajectories:
        raise ValueError("stack_trajectories: expected at least one trajectory, got none")
    lengths = {t.reward.shape[0] for t in trajectories}
    if len(lengths) != 1:
        raise ValueError(f"stack_trajectories: expected trajectories of one length, got lengths {sorted(lengths)}")
    multi = trajectories[0].reward.ndim == 2

    def stack(*leaves):
        if multi:
            return np.concatenate(leaves, axis=1)
        return np.stack(leaves, axis=1)

    fields = {}
    for name in Trajectory._fields:
        if name == "actor_id":
            continue
        fields[name] = _tree_map(stack, *[getattr(t, name) for t in trajectories])
    per = trajectories[0].reward.shape[1] if multi else 1
    fields["actor_id"] = np.repeat(np.asarray([t.actor_id for t in trajectories], dtype=np.int64), per)
    return Trajectory(**fields)
