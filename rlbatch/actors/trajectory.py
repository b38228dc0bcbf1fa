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

`TrajectoryBuilder` fills one actor's trajectory step by step. It keeps every field as [T(+1), k, ...]
and addresses environments by column j, so that whatever produces the k columns (k single
environments, or one vector environment of k) writes its own columns.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import numpy as np

__all__ = ["Trajectory", "TrajectoryBuilder", "stack_trajectories"]


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
        fields[name] = jax.tree_util.tree_map(stack, *[getattr(t, name) for t in trajectories])
    per = trajectories[0].reward.shape[1] if multi else 1
    fields["actor_id"] = np.repeat(np.asarray([t.actor_id for t in trajectories], dtype=np.int64), per)
    return Trajectory(**fields)


class TrajectoryBuilder:
    """One trajectory being filled: T steps of k environment columns.

    Arrays are [T(+1), k, ...], allocated once per trajectory and handed to the consumer with it
    (never reused, so a trajectory in the queue cannot change). Column j is environment
    `first_env_index + j` of the pool. With k = 1, `finish` drops the column axis.

    Per step t: `record_policy` (the request the policy answered and its outputs), then, for each
    column whose episode ended, `record_final_obs`, then `record_step` (all k columns at once).
    After T steps, `finish` with the next request as the bootstrap observation.
    """

    def __init__(self, unroll_length: int, k: int, obs_example: Any, actor_id: int, first_env_index: int):
        T = unroll_length
        self.unroll_length, self.k = T, k
        self.actor_id, self.first_env_index = actor_id, first_env_index
        self.obs = jax.tree_util.tree_map(lambda x: np.zeros((T + 1, k) + np.shape(x), np.asarray(x).dtype),
                                          obs_example)
        self.final_obs = jax.tree_util.tree_map(lambda x: np.zeros((T,) + x.shape[1:], x.dtype), self.obs)
        # A plain-array observation (the common case) is written with one assignment, no tree walk.
        self._plain = type(self.obs) is np.ndarray
        self.reward = np.zeros((T, k), np.float32)
        self.terminated = np.zeros((T, k), np.bool_)
        self.truncated = np.zeros((T, k), np.bool_)
        self.policy_version = np.zeros((T, k), np.int64)
        self.episode = np.zeros((T, k), np.int64)
        self.action = None  # allocated at the first step, from the policy's output
        self.extras = None

    def record_policy(self, t: int, obs: Any, action: Any, extras: dict, version: int) -> None:
        """The request answered at step t (one observation when k = 1, else [k, ...]) and its outputs."""
        if self.action is None:
            self._allocate_outputs(action, extras)
        if self._plain:
            self.obs[t] = obs
        else:
            jax.tree_util.tree_map(lambda buf, x: buf.__setitem__(t, x), self.obs, obs)
        self.action[t] = action
        for key, value in extras.items():
            self.extras[key][t] = value
        self.policy_version[t] = version

    def record_final_obs(self, t: int, column: int, obs: Any) -> None:
        """The last observation of the episode that ended at step t in `column`.

        ValueError if it does not have the shape of the trajectory's observations."""
        if self._plain:
            self.final_obs[t, column] = obs
        else:
            jax.tree_util.tree_map(lambda buf, x: buf.__setitem__((t, column), x), self.final_obs, obs)

    def record_step(self, t: int, reward: Sequence[float], terminated: Sequence[bool], truncated: Sequence[bool],
                    episode: Sequence[int]) -> None:
        """What the k environments returned at step t (item j: column j), and the episode each step
        belongs to (before any reset)."""
        # One assignment per field for all k columns, not k of them.
        self.reward[t] = reward
        self.terminated[t] = terminated
        self.truncated[t] = truncated
        self.episode[t] = episode

    def finish(self, bootstrap_obs: Any) -> Trajectory:
        """The trajectory, with `bootstrap_obs` (a request, as in `record_policy`) as obs[T]."""
        T = self.unroll_length
        if self._plain:
            self.obs[T] = bootstrap_obs
        else:
            jax.tree_util.tree_map(lambda buf, x: buf.__setitem__(T, x), self.obs, bootstrap_obs)
        # Episode ids are unique across the pool: the environment index in the high 32 bits.
        env_index = self.first_env_index + np.arange(self.k, dtype=np.int64)
        episode_id = (env_index[None, :] << 32) | self.episode
        fields = dict(obs=self.obs, action=self.action, reward=self.reward, terminated=self.terminated,
                      truncated=self.truncated, final_obs=self.final_obs, extras=self.extras,
                      policy_version=self.policy_version, episode_id=episode_id)
        if self.k == 1:  # one environment: no column axis
            fields = jax.tree_util.tree_map(lambda x: x[:, 0], fields)
        return Trajectory(actor_id=self.actor_id, **fields)

    def _allocate_outputs(self, action, extras) -> None:
        T, k = self.unroll_length, self.k

        def row_shape(x):  # the request holds one row when k = 1, else k rows
            return np.shape(x) if k == 1 else np.shape(x)[1:]

        a = np.asarray(action)
        self.action = np.zeros((T, k) + row_shape(a), a.dtype)
        self.extras = {key: np.zeros((T, k) + row_shape(v), np.asarray(v).dtype) for key, v in extras.items()}
