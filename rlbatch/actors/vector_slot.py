"""VectorSlot: one gymnasium vector environment of k sub-environments, as an actor's k columns.

An actor built with a vector environment holds one VectorSlot in place of k EnvSlots. Sub-environment
j is column j of the actor's trajectories and environment `index = actor_id * k + j` of the pool, as
with single slots. Observations come batched: [k, ...] (a pytree of such arrays for a dict space).

The contract is the single environment's one (see rlbatch.actors.trajectory): when column j's
episode ends at step t, `final_obs[t, j]` is its last observation, `obs[t+1, j]` the new episode's
first one, and no step is ever recorded that only resets. Gymnasium's autoreset modes
(`env.metadata["autoreset_mode"]`) reach it thus:

- NEXT_STEP (gymnasium's default): the step that ends an episode returns its last observation, and
  the sub-environment would reset on the *next* `step`, ignoring that step's action. The slot does
  not let that happen: right after the ending step it resets the ended sub-environments with
  `reset(options={"reset_mask": ended})`, which also clears their pending autoreset, so the next
  `step` steps every column and no reset step exists to record.
- SAME_STEP: the ending step returns the new episode's first observation and the old one's last in
  `infos["final_obs"][j]`.
DISABLED is refused: nothing would reset an ended sub-environment.

EnvPool (`envpool.make(task_id, env_type="gymnasium", num_envs=k, seed=seed)`, a gymnasium VectorEnv
in NEXT_STEP mode) goes the NEXT_STEP way; its masked reset returns only the rows it reset, which
the slot writes into the step's observations. Only its synchronous mode (batch_size == num_envs):
its send/recv mode is rlbatch.actors.async_slot's.

ale-py's AtariVectorEnv (`ale_py.vector_env.AtariVectorEnv(game, k, ...)`, see
envs.atari.make_ale_vector_env) goes the NEXT_STEP way too (its masked reset returns all k rows, the
others unchanged, and clears the reset rows' pending autoreset), or SAME_STEP with its
`infos["final_obs"]`. Only with batch_size == num_envs. It asserts int32/int64 action arrays and
hangs on an action outside its action set, so the slot passes Discrete actions as one int64 array
and refuses (an EnvFault of env.step, as a single environment's IndexError) any out of range.
Its reward_clipping defaults to True: build it with reward_clipping=False for the game's own returns.

Seeding, as with EnvSlots: sub-environment j of a vector environment built after r rebuilds gets
seed `seed + index + num_envs * r`. The slot calls `make_vector_env(k, seed)` with the seed of
sub-environment 0 (`index = first_index`); the others' seeds follow it, +1 each, as EnvPool seeds
its environments. A gymnasium vector environment is then reset with the k seeds; an EnvPool, seeded
by envpool.make, without; an ale-py AtariVectorEnv with the k seeds as an int array (it takes no list).
Later resets are unseeded. The slot keeps each column's episode count,
return (the environment's own rewards) and length.

Faults: a vector environment that raises in step or reset is closed and rebuilt whole (its k
sub-environments share one process or one call, so none of them can be trusted alone); every
column starts a new episode.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import gymnasium
import numpy as np
from gymnasium.vector import AutoresetMode

from rlbatch.actors.env_slot import EnvFault, RebuildingSlot
from rlbatch.actors.stats import ActorCounters, EpisodeLog, FaultLog

__all__ = ["VectorEnvMismatch", "VectorSlot", "WHOLE_VECTOR"]

_clock = time.perf_counter
WHOLE_VECTOR = -1  # the column of an EnvFault that concerns the whole vector environment
_NONE = np.zeros(0, np.int64)


class VectorEnvMismatch(ValueError):
    """vector_env_fn built a vector environment the actor cannot play (size, autoreset mode)."""


def _seeded_when_made(env) -> bool:
    """An EnvPool: seeded by envpool.make (sub-environment j with seed + j), not by reset."""
    return any(c.__module__.startswith("envpool.") for c in type(env).__mro__)


def _is_ale(env) -> bool:
    """ale-py's AtariVectorEnv (seeded with an int array; int actions only)."""
    return any(c.__module__.startswith("ale_py.") for c in type(env).__mro__)


def _ale_actions(actions, n: int) -> np.ndarray:
    """Discrete actions as AtariVectorEnv takes them: one int64 array; ValueError for any outside
    [0, n), on which the ALE would hang."""
    a = np.asarray(actions)
    if a.dtype.kind not in "iu":
        raise ValueError(f"expected integer actions for an AtariVectorEnv, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"AtariVectorEnv: actions {a.tolist()} outside its action set [0, {n})")
    return a


def _autoreset_mode(env) -> AutoresetMode:
    """The vector environment's autoreset mode (gymnasium 1.x's default, NEXT_STEP, if it names none)."""
    mode = getattr(env, "metadata", {}).get("autoreset_mode", AutoresetMode.NEXT_STEP)
    mode = AutoresetMode(mode)  # a string works too
    if mode == AutoresetMode.DISABLED:
        raise VectorEnvMismatch(f"VectorSlot: expected a vector environment with autoreset mode NEXT_STEP or "
                                f"SAME_STEP, got {mode}: nothing would reset a sub-environment whose episode ended")
    if (mode == AutoresetMode.NEXT_STEP and isinstance(env, gymnasium.vector.AsyncVectorEnv)
            and not env.shared_memory):
        # gymnasium's worker clears its pending autoreset on a masked reset only with shared
        # memory: without it the next step would reset the new episode again.
        raise VectorEnvMismatch("VectorSlot: expected an AsyncVectorEnv with shared_memory=True in NEXT_STEP mode, "
                                "got shared_memory=False (its masked resets leave the autoreset pending)")
    return mode


class VectorSlot(RebuildingSlot):
    """A vector environment of k sub-environments: environments first_index ... first_index + k - 1."""

    def __init__(self, make_vector_env: Callable[[int, int], Any], first_index: int, k: int, actor_id: int, *,
                 seed: int, num_envs: int, max_backoff: float, stop: threading.Event, counters: ActorCounters,
                 faults: FaultLog, episodes: EpisodeLog):
        self.first_index, self.k, self.actor_id = first_index, k, actor_id
        self.envs_per_build = k
        self.env = None
        self.autoreset_mode = None
        self.rebuilds = 0
        # Per column, overwritten in place every step: nothing per step to allocate.
        self.episode = np.zeros(k, np.int64)  # episodes each column has started (as EnvSlot.episode)
        self.episode_return = np.zeros(k, np.float64)
        self.episode_length = np.zeros(k, np.int64)
        self._built_episode = np.zeros(k, np.int64)  # `episode` when the environment was built
        self._done = np.zeros(k, np.bool_)
        self._envpool = False
        self._ale_n = 0  # an AtariVectorEnv with Discrete actions: their number, else 0
        self.ended = _NONE  # the columns whose episode ended in the last step
        self._make_vector_env = make_vector_env
        self._seed, self._num_envs, self._max_backoff = seed, num_envs, max_backoff
        self._stop = stop
        self._counters, self._faults, self._episodes = counters, faults, episodes

    @property
    def single_action_space(self) -> gymnasium.Space:
        return self.env.single_action_space

    @property
    def fresh(self) -> bool:
        """The current observations are the first ones of a newly built vector environment."""
        return not self.episode_length.any() and bool((self.episode == self._built_episode).all())

    # ------------------------------------------------------------------ the hot path

    def step(self, t: int, actions, builder) -> np.ndarray:
        """Steps the k sub-environments with `actions` [k, ...] and records step t in `builder`
        (rewards, flags, the episode of each step, final observations); the next observations
        [k, ...], with the new episode's first one in every column whose episode ended. Those
        columns are then in `self.ended` (an int array, usually empty).

        EnvFault (column WHOLE_VECTOR) if the vector environment raised."""
        try:
            if self._ale_n:
                actions = _ale_actions(actions, self._ale_n)
            obs, reward, terminated, truncated, info = self.env.step(actions)
        except Exception as e:  # noqa: BLE001 - any environment error is this slot's fault to recover
            raise EnvFault(WHOLE_VECTOR, "env.step", e) from e
        # The episode of each step is the one before any reset below.
        builder.record_step(t, reward, terminated, truncated, self.episode)
        self.episode_return += reward
        self.episode_length += 1
        done = np.logical_or(terminated, truncated, out=self._done)
        if not done.any():
            self.ended = _NONE
            return obs
        ended = self.ended = np.flatnonzero(done)
        final = obs if self.autoreset_mode == AutoresetMode.NEXT_STEP else info["final_obs"]
        for j in ended:
            try:
                builder.record_final_obs(t, j, final[j])
            except ValueError as e:  # a last observation of another shape than the others
                raise EnvFault(WHOLE_VECTOR, "env.observation", e) from e
            self._episodes.add(float(self.episode_return[j]), int(self.episode_length[j]))
        self._counters.episodes += len(ended)
        self.episode_return[ended] = 0.0
        self.episode_length[ended] = 0
        self.episode[ended] += 1
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            try:
                first, _ = self.env.reset(options={"reset_mask": done})
            except Exception as e:  # noqa: BLE001
                raise EnvFault(WHOLE_VECTOR, "env.reset", e) from e
            if not self._envpool:  # gymnasium: all k rows, the others unchanged
                return first
            # EnvPool: one row per sub-environment that was reset. Its step returned a new writable
            # array that the reset does not share, so the rows go into it without a copy.
            obs[ended] = first
        return obs

    # ------------------------------------------------------------------ building and recovering

    def open(self) -> np.ndarray:
        """Builds the vector environment and resets it with its seeds, retrying with back-off; its
        first observations [k, ...]. Raises StopRequested if the pool stops first."""
        return self._build_until_stopped(self._attempt_open, self.first_index, fatal=(VectorEnvMismatch,))

    def _attempt_open(self, made: list) -> np.ndarray:
        first_seed = self._seed + self.first_index + self._num_envs * self.rebuilds
        env = self._make_vector_env(self.k, first_seed)
        made.append(env)
        self._counters.envs_open += self.k
        mode = self._check(env)
        t0 = _clock()
        self._envpool = _seeded_when_made(env)
        space = env.single_action_space
        discrete = isinstance(space, gymnasium.spaces.Discrete)
        self._ale_n = int(space.n) if _is_ale(env) and discrete else 0
        if self._envpool:
            obs, _ = env.reset()
        elif _is_ale(env):
            obs, _ = env.reset(seed=np.arange(first_seed, first_seed + self.k, dtype=np.int64))
        else:
            obs, _ = env.reset(seed=[first_seed + j for j in range(self.k)])
        self._counters.env_time += _clock() - t0
        self.env, self.autoreset_mode = env, mode
        self._built_episode[:] = self.episode
        self.ended = _NONE
        return obs

    def _check(self, env) -> AutoresetMode:
        """The autoreset mode of a newly built vector environment. A vector environment that no
        rebuild can mend (wrong size or mode) closes it and raises VectorEnvMismatch, which the
        build loop does not retry: the actor stops with it."""
        try:
            num = getattr(env, "num_envs", None)
            if num != self.k:
                raise VectorEnvMismatch(f"vector_env_fn({self.k}, seed): expected a vector environment of {self.k} "
                                        f"sub-environments, got num_envs={num!r}")
            if _seeded_when_made(env) and env.config["batch_size"] != num:
                raise VectorEnvMismatch(f"vector_env_fn({self.k}, seed): expected an EnvPool in synchronous mode "
                                        f"(batch_size == num_envs == {self.k}), got batch_size="
                                        f"{env.config['batch_size']} (for its send/recv mode, pass ActorPool "
                                        f"async_batch_size=batch_size)")
            if _is_ale(env) and getattr(env, "batch_size", num) != num:
                raise VectorEnvMismatch(f"vector_env_fn({self.k}, seed): expected an AtariVectorEnv in synchronous "
                                        f"mode (batch_size == num_envs == {self.k}), got batch_size={env.batch_size}")
            return _autoreset_mode(env)
        except VectorEnvMismatch:
            self._close(env)
            raise

    def recover(self, fault: EnvFault) -> np.ndarray:
        """Records `fault` and rebuilds the vector environment; the new one's first observations."""
        self._faults.record(self.actor_id, fault.where, fault.error, self.first_index)
        self._counters.env_errors += 1
        return self.rebuild()

    def refused(self, error: BaseException, columns: list[int]) -> np.ndarray:
        """Records that the policy refused the observations of `columns` (the fault names the first
        one's environment) and rebuilds the vector environment (a sub-environment cannot be rebuilt
        alone); its first observations. A newly built one (`fresh`) is the actor's to judge, as with
        EnvSlot."""
        self._faults.record(self.actor_id, "env.observation", error, self.first_index + columns[0])
        self._counters.env_errors += 1
        self._counters.obs_refused += len(columns)
        return self.rebuild()

    def _restart_episodes(self) -> None:
        self.episode_return[:] = 0.0
        self.episode_length[:] = 0
        self.episode += 1
