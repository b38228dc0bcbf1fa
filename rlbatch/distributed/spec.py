"""The shape every group of trajectories from every process must have, and groups cut back into
trajectories.

A process ships g trajectories at a time as one `Trajectory` stacked with
`rlbatch.stack_trajectories`: per-step fields [T, g * w, ...], `obs` [T+1, g * w, ...] and
`actor_id` [g * w], where w is the width of one of its trajectories (`envs_per_actor`, or
`async_batch_size` in EnvPool's send/recv mode). `GroupSpec` knows, from the policy alone (its
example observation and the shapes `jax.eval_shape` gives for its outputs), the structure, shape
and dtype of every leaf, and refuses a group that differs, naming the process, before anything of
it reaches a learner. `split_group` gives the g trajectories back as the ActorPool made them
([T] fields for w = 1, [T, w] otherwise): views of the group's arrays, not copies.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from rlbatch.actors.trajectory import Trajectory
from rlbatch.distributed.records import ProcessReport
from rlbatch.errors import TrajectoryRefused

__all__ = ["GroupSpec", "TrajectoryRefused", "split_group"]


def _describe(shape, dtype) -> str:
    return f"{np.dtype(dtype)}{list(shape)}"


class GroupSpec:
    """The expected structure of a group of `group_size` trajectories of width `width`."""

    def __init__(self, apply_fn, params, example_obs: Any, *, unroll_length: int, width: int, group_size: int,
                 example_state: Any = None):
        T, n = unroll_length, width * group_size
        self.unroll_length, self.width, self.group_size = T, width, group_size
        one = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1,) + np.shape(x), np.asarray(x).dtype),
                                     example_obs)
        key = jax.ShapeDtypeStruct((2,), np.uint32)
        if example_state is None:
            action, extras = jax.eval_shape(apply_fn, params, one, key)
        else:
            state = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1,) + np.shape(x), np.asarray(x).dtype),
                                           example_state)
            action, extras, _ = jax.eval_shape(apply_fn, params, one, state, key)

        def per_step(lead):
            return lambda s: jax.ShapeDtypeStruct(lead + tuple(s.shape[1:]), s.dtype)

        def scalar(dtype):
            return jax.ShapeDtypeStruct((T, n), dtype)

        obs_leaf = lambda lead: lambda x: jax.ShapeDtypeStruct(lead + np.shape(x), np.asarray(x).dtype)  # noqa: E731
        self.expected = Trajectory(
            obs=jax.tree_util.tree_map(obs_leaf((T + 1, n)), example_obs),
            action=per_step((T, n))(action),
            reward=scalar(np.float32), terminated=scalar(np.bool_), truncated=scalar(np.bool_),
            final_obs=jax.tree_util.tree_map(obs_leaf((T, n)), example_obs),
            extras={k: per_step((T, n))(v) for k, v in dict(extras).items()},
            policy_version=scalar(np.int64), episode_id=scalar(np.int64),
            actor_id=jax.ShapeDtypeStruct((n,), np.int64))
        self._leaves, self._treedef = jax.tree_util.tree_flatten_with_path(self.expected)

    @staticmethod
    def unpack(payload: Any, who: str):
        """(group, report) from what a process's `next_group` returned, or TrajectoryRefused."""
        if (type(payload) is not tuple or len(payload) != 2 or type(payload[1]) is not ProcessReport
                or type(payload[1].token) is not tuple or len(payload[1].token) != 2):
            raise TrajectoryRefused(f"{who} sent a {type(payload).__name__}, expected a (Trajectory, ProcessReport) "
                                    f"pair")
        return payload

    def check(self, group: Any, who: str, versions: tuple[int, int]) -> None:
        """TrajectoryRefused naming `who` (a process) unless `group` is a Trajectory with the
        expected structure and every leaf's shape and dtype, and policy versions in
        [versions[0], versions[1]] (the fleet's first and newest)."""
        if type(group) is not Trajectory:
            raise TrajectoryRefused(f"{who} sent a {type(group).__name__}, expected a Trajectory "
                                    f"(a stacked group of {self.group_size})")
        leaves, treedef = jax.tree_util.tree_flatten_with_path(group)
        if treedef != self._treedef:
            raise TrajectoryRefused(f"{who} sent trajectories of structure {treedef}, expected {self._treedef}")
        for (path, want), (_, got) in zip(self._leaves, leaves):
            if type(got) is not np.ndarray or got.shape != want.shape or got.dtype != want.dtype:
                got_desc = (_describe(got.shape, got.dtype) if type(got) is np.ndarray
                            else f"a {type(got).__name__}")
                raise TrajectoryRefused(f"{who} sent a trajectory whose {jax.tree_util.keystr(path).lstrip('.')} is "
                                        f"{got_desc}, expected {_describe(want.shape, want.dtype)}")
        lo, hi = int(group.policy_version.min()), int(group.policy_version.max())
        if lo < versions[0] or hi > versions[1]:
            raise TrajectoryRefused(f"{who} sent a trajectory with policy versions {lo}..{hi}, expected versions "
                                    f"in {versions[0]}..{versions[1]} (the ones the fleet published)")


def split_group(group: Trajectory, group_size: int, width: int) -> list[Trajectory]:
    """The `group_size` trajectories stacked in `group` (see the module docstring), as views."""
    out = []
    for j in range(group_size):
        if width == 1:
            take = lambda x, j=j: x[:, j]  # noqa: E731 - one environment: no column axis
        else:
            sl = slice(j * width, (j + 1) * width)
            take = lambda x, sl=sl: x[:, sl]  # noqa: E731
        fields = {name: jax.tree_util.tree_map(take, getattr(group, name)) for name in Trajectory._fields
                  if name != "actor_id"}
        out.append(Trajectory(actor_id=int(group.actor_id[j * width]), **fields))
    return out
