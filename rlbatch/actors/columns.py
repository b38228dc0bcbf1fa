"""ColumnStore: n trajectory columns that advance at their own pace, emitted b at a time.

An actor that plays an asynchronous vector environment (EnvPool's send/recv mode, see
rlbatch.actors.async_vector) hears from b of its n environments per step, whichever finished first,
so its n columns (column i: environment id i) do not advance together. The store keeps every field
as [T(+1), n, ...] with a step index per column, `step[i]`: the transitions column i holds.

Per column the events come in this order, each call taking the rows of one recv at once:
- `record_steps`: transitions completed by the recv, at each column's own step index (which then
  advances), and `record_final_obs` for those whose episode ended;
- `record_policy`: the observations the policy was asked about and its outputs. A column that holds
  T transitions is complete at this point: the observation is its bootstrap `obs[T]`, it moves to
  the ready group, and the same observation starts its next segment as `obs[0]`.

Ready columns fill a group of b; each full group is one `Trajectory` with b columns, [T+1, b, ...]
and [T, b, ...], in the order the columns completed (a column may appear twice in one group:
`episode_id`, with the environment index in its high 32 bits, keeps them apart). `final_obs` is
zero wherever no episode ended, as in every trajectory.

No threads here: the actor's loop drives it, and tests drive it without one.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from rlbatch.actors.trajectory import Trajectory

__all__ = ["ColumnStore"]


def _zeros(shape: tuple, example: Any) -> Any:
    """Zero arrays of `shape` + each leaf's row shape, in its dtype."""
    return jax.tree_util.tree_map(lambda x: np.zeros(shape + np.shape(x), np.asarray(x).dtype), example)


def _row(tree: Any, r: int) -> Any:
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[r], tree)


def _set(buf: Any, index, value: Any) -> None:
    if type(buf) is np.ndarray:
        buf[index] = value
    else:
        jax.tree_util.tree_map(lambda b, v: b.__setitem__(index, v), buf, value)


class ColumnStore:
    """Columns of environments first_env_index ... first_env_index + n - 1 of actor `actor_id`."""

    def __init__(self, unroll_length: int, n: int, b: int, actor_id: int, first_env_index: int):
        self.unroll_length, self.n, self.b = unroll_length, n, b
        self.actor_id, self.first_env_index = actor_id, first_env_index
        self.step = np.zeros(n, np.int64)  # transitions column i holds in its current segment
        T = unroll_length
        self.reward = np.zeros((T, n), np.float32)
        self.terminated = np.zeros((T, n), np.bool_)
        self.truncated = np.zeros((T, n), np.bool_)
        self.episode = np.zeros((T, n), np.int64)
        self.policy_version = np.zeros((T, n), np.int64)
        # Allocated at the first record_policy, from the policy's request and outputs.
        self.obs = self.final_obs = self.action = self.extras = None
        self._group: dict | None = None  # the ready columns, [T(+1), b, ...]; None until one is ready
        self._env_index = np.zeros(b, np.int64)
        self._filled = 0
        self._finished: list[Trajectory] = []

    # ------------------------------------------------------------------ recording

    def record_steps(self, ids: np.ndarray, reward, terminated, truncated, episode) -> None:
        """The transitions that environments `ids` (distinct) completed, each at its column's step
        index, which advances; `episode` is the episode each belongs to."""
        t = self.step[ids]
        self.reward[t, ids] = reward
        self.terminated[t, ids] = terminated
        self.truncated[t, ids] = truncated
        self.episode[t, ids] = episode
        self.step[ids] = t + 1

    def record_final_obs(self, i: int, obs: Any) -> None:
        """The last observation of column i's episode, which ended with its latest transition.

        ValueError if it does not have the shape of the recorded observations."""
        _set(self.final_obs, (self.step[i] - 1, i), obs)

    def record_policy(self, ids: np.ndarray, obs: Any, action: Any, extras: dict, version: int) -> None:
        """The policy's answer for environments `ids` (distinct): `obs`, `action` and `extras` have
        one row per id. Columns that hold T transitions complete first, with their row of `obs` as
        bootstrap; every row then starts or continues its column's segment."""
        if self.obs is None:
            self._allocate(_row(obs, 0), _row(action, 0), {k: _row(v, 0) for k, v in extras.items()})
        T = self.unroll_length
        complete = self.step[ids] == T
        if complete.any():
            for r in np.flatnonzero(complete):
                i = int(ids[r])
                _set(self.obs, (T, i), _row(obs, r))
                self._move_to_group(i)
        t = self.step[ids]
        _set(self.obs, (t, ids), obs)
        self.action[t, ids] = action
        for key, value in extras.items():
            self.extras[key][t, ids] = value
        self.policy_version[t, ids] = version

    def pop_finished(self) -> list[Trajectory]:
        """The trajectories completed since the last call, oldest first."""
        finished, self._finished = self._finished, []
        return finished

    def drop_unfinished(self) -> int:
        """Forgets every column's unfinished segment (its environment was rebuilt); how many held at
        least one transition. Columns already in the ready group are complete and stay."""
        dropped = int(np.count_nonzero(self.step))
        self.step[:] = 0
        if self.final_obs is not None:
            jax.tree_util.tree_map(lambda x: x.fill(0), self.final_obs)
        return dropped

    # ------------------------------------------------------------------ groups

    def _move_to_group(self, i: int) -> None:
        """Copies complete column i into the ready group (emitting it when it has b columns) and
        clears the column's final observations, the one field that is not overwritten step by step."""
        if self._group is None:
            self._group = self._new_group()
        g, group = self._filled, self._group
        for name, store in self._fields().items():
            jax.tree_util.tree_map(lambda dst, src: dst.__setitem__((slice(None), g), src[:, i]), group[name], store)
        jax.tree_util.tree_map(lambda x: x[:, i].fill(0), self.final_obs)
        self._env_index[g] = self.first_env_index + i
        self.step[i] = 0
        self._filled += 1
        if self._filled == self.b:
            episode_id = (self._env_index[None, :] << 32) | group.pop("episode")
            self._finished.append(Trajectory(episode_id=episode_id, actor_id=self.actor_id, **group))
            self._group, self._filled = None, 0

    def _fields(self) -> dict:
        return dict(obs=self.obs, action=self.action, reward=self.reward, terminated=self.terminated,
                    truncated=self.truncated, final_obs=self.final_obs, extras=self.extras,
                    policy_version=self.policy_version, episode=self.episode)

    def _new_group(self) -> dict:
        """Fresh arrays of b columns: a trajectory handed to the consumer is never written again."""
        return {name: jax.tree_util.tree_map(lambda x: np.zeros(x.shape[:1] + (self.b,) + x.shape[2:], x.dtype), f)
                for name, f in self._fields().items()}

    def _allocate(self, obs_row: Any, action_row: Any, extras_row: dict) -> None:
        T, n = self.unroll_length, self.n
        self.obs = _zeros((T + 1, n), obs_row)
        self.final_obs = _zeros((T, n), obs_row)
        self.action = _zeros((T, n), action_row)
        self.extras = {key: _zeros((T, n), v) for key, v in extras_row.items()}
