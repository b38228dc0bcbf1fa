"""AsyncVectorSlot: an EnvPool in its asynchronous send/recv mode, as an actor's n columns.

The environment: `envpool.make(task_id, env_type="gymnasium", num_envs=n, batch_size=b, seed=s)`
with b < n (b == n works too). After `env.async_reset()`, each `env.recv()` returns the b
environments that finished first, `info["env_id"]` naming them (row r is environment id
`info["env_id"][r]`), and `env.send(actions, env_id)` steps those b. Column i of the actor is
environment id i, environment `first_index + i` of the pool.

EnvPool's autoreset in this mode, found with CartPole-v1 (num_envs=4 and 3, batch_size=2, a
printed trace of env_id, elapsed_step, terminated, truncated and reward per recv):
- the first recv of each environment after `async_reset` gives its first observation, reward 0,
  elapsed_step 0, both flags False;
- the step that ends an episode (terminated, or truncated at max_episode_steps) returns the
  episode's last observation with its reward;
- the next `send` for that env id resets it, its action ignored; the following recv of that id
  returns the new episode's first observation, reward 0, elapsed_step 0, both flags False. That
  result is a reset, not a transition.
- an environment is in at most one recv between two sends of its id, so the ids of one recv are
  distinct; EnvPool seeds environment j with `s + j` (the first observations equal a synchronous
  EnvPool's with the same seed).

Onto the Trajectory contract: the ending step is recorded (reward, terminated/truncated kept
apart) with `final_obs[t, i]` = its last observation; the reset result is recorded as no
transition, and its first observation becomes `obs[t+1, i]`. Episode returns and lengths are the
environment's own rewards and steps, the reset result counting for neither.

Seeding, as every slot: the EnvPool built after r rebuilds is made with `seed + first_index +
num_envs * r`, so environment id i gets `seed + first_index + i + num_envs * r`.

Faults: a raising recv or send (or a recv naming ids outside [0, n) or not b of them) closes and
rebuilds the EnvPool whole. Every environment is in flight (sent an action, or reset) whenever the
actor calls recv, so recv returns as soon as b of them are done and never waits on an environment
that was never sent anything; a rebuilt EnvPool starts with `async_reset`, all n in flight.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import gymnasium
import numpy as np

from rlbatch.actors.columns import ColumnStore
from rlbatch.actors.env_slot import EnvFault, RebuildingSlot
from rlbatch.actors.stats import ActorCounters, EpisodeLog, FaultLog
from rlbatch.actors.vector_slot import WHOLE_VECTOR, VectorEnvMismatch

__all__ = ["AsyncVectorSlot"]

_clock = time.perf_counter


class AsyncVectorSlot(RebuildingSlot):
    """An EnvPool of n environments (first_index ... first_index + n - 1), b per recv."""

    def __init__(self, make_vector_env: Callable[[int, int], Any], first_index: int, n: int, b: int,
                 actor_id: int, *, seed: int, num_envs: int, max_backoff: float, stop: threading.Event,
                 counters: ActorCounters, faults: FaultLog, episodes: EpisodeLog):
        self.first_index, self.n, self.b, self.actor_id = first_index, n, b, actor_id
        self.envs_per_build = n
        self.env = None
        self.rebuilds = 0
        self.episode = np.zeros(n, np.int64)  # episodes each column has started
        self.episode_return = np.zeros(n, np.float64)
        self.episode_length = np.zeros(n, np.int64)
        self.transitions = 0  # transitions the last recv completed
        self._built_episode = np.zeros(n, np.int64)
        # True for an environment whose next recv is a first observation (after async_reset, or
        # the reset EnvPool does on the send after an ending step): not a transition.
        self._starting = np.ones(n, np.bool_)
        self._make_vector_env = make_vector_env
        self._seed, self._num_envs, self._max_backoff = seed, num_envs, max_backoff
        self._stop = stop
        self._counters, self._faults, self._episodes = counters, faults, episodes

    @property
    def single_action_space(self) -> gymnasium.Space:
        return self.env.single_action_space

    def fresh(self, ids) -> bool:
        """Every environment of `ids` is at the first observation of a newly built EnvPool."""
        ids = np.asarray(ids)
        return bool((self.episode_length[ids] == 0).all() and (self.episode[ids] == self._built_episode[ids]).all())

    # ------------------------------------------------------------------ the hot path

    def recv(self, store: ColumnStore):
        """The next b environments: `(ids, obs, ended)`, ids [b] int, obs [b, ...] (row r: id
        ids[r]), ended [b] bool: rows whose episode ended with this transition (obs is its last
        observation; the env ignores the next action). Completed transitions and final
        observations go to `store`. EnvFault (column WHOLE_VECTOR) if the EnvPool raised."""
        try:
            obs, reward, terminated, truncated, info = self.env.recv()
            ids = np.asarray(info["env_id"], np.int64)
            if ids.shape != (self.b,) or ids.min() < 0 or ids.max() >= self.n:
                raise ValueError(f"expected env_id: {self.b} ids in [0, {self.n}), got {ids.tolist()}")
        except Exception as e:  # noqa: BLE001 - any environment error is this slot's fault to recover
            raise EnvFault(WHOLE_VECTOR, "env.recv", e) from e
        starting = self._starting[ids]
        ended = np.logical_or(terminated, truncated)
        if starting.any():
            moved = ~starting
            ended &= moved
            self._starting[ids] = False
            m_ids, reward, terminated, truncated = ids[moved], reward[moved], terminated[moved], truncated[moved]
        else:
            m_ids = ids
        store.record_steps(m_ids, reward, terminated, truncated, self.episode[m_ids])
        self.episode_return[m_ids] += reward
        self.episode_length[m_ids] += 1
        self.transitions = len(m_ids)
        if ended.any():
            for r in np.flatnonzero(ended):
                i = int(ids[r])
                try:
                    store.record_final_obs(i, obs[r])
                except ValueError as e:  # a last observation of another shape than the others
                    raise EnvFault(WHOLE_VECTOR, "env.observation", e) from e
                self._episodes.add(float(self.episode_return[i]), int(self.episode_length[i]))
            e_ids = ids[ended]
            self._counters.episodes += len(e_ids)
            self.episode_return[e_ids] = 0.0
            self.episode_length[e_ids] = 0
            self.episode[e_ids] += 1
            self._starting[e_ids] = True
        return ids, obs, ended

    def send(self, actions, ids: np.ndarray) -> None:
        """Steps environments `ids` (a recv's) with `actions` [b, ...]; EnvFault if the EnvPool raised."""
        try:
            self.env.send(actions, ids)
        except Exception as e:  # noqa: BLE001
            raise EnvFault(WHOLE_VECTOR, "env.send", e) from e

    # ------------------------------------------------------------------ building and recovering

    def open(self) -> None:
        """Builds the EnvPool and resets all n environments (async_reset), retrying with back-off.
        Raises StopRequested if the pool stops first, VectorEnvMismatch if it is not one to play."""
        self._build_until_stopped(self._attempt_open, self.first_index, fatal=(VectorEnvMismatch,))

    def _attempt_open(self, made: list) -> None:
        env = self._make_vector_env(self.n, self._seed + self.first_index + self._num_envs * self.rebuilds)
        made.append(env)
        self._counters.envs_open += self.n
        self._check(env)
        t0 = _clock()
        env.async_reset()
        self._counters.env_time += _clock() - t0
        self.env = env
        self._built_episode[:] = self.episode
        self._starting[:] = True

    def _check(self, env) -> None:
        """Closes `env` and raises VectorEnvMismatch unless it is an EnvPool of n environments, b per recv."""
        where = f"vector_env_fn({self.n}, seed)"
        try:
            if not all(callable(getattr(env, name, None)) for name in ("async_reset", "recv", "send")):
                raise VectorEnvMismatch(f"{where}: expected an EnvPool (async_reset, send, recv) for async_batch_size="
                                        f"{self.b}, got {type(env).__name__}")
            config = env.config
            got = (config.get("num_envs"), config.get("batch_size"))
            if got != (self.n, self.b):
                raise VectorEnvMismatch(f"{where}: expected an EnvPool with num_envs={self.n}, batch_size={self.b} "
                                        f"(envs_per_actor, async_batch_size), got num_envs={got[0]}, "
                                        f"batch_size={got[1]}")
        except VectorEnvMismatch:
            self._close(env)
            raise

    def recover(self, fault: EnvFault) -> None:
        """Records `fault` and rebuilds the EnvPool."""
        self._faults.record(self.actor_id, fault.where, fault.error, self.first_index)
        self._counters.env_errors += 1
        self.rebuild()

    def refused(self, error: BaseException, ids) -> None:
        """Records that the policy refused the observations of environments `ids` (the fault names
        the first one) and rebuilds the EnvPool: they were not sent actions, so recv could never
        return them again. A newly built one (`fresh`) is the actor's to judge."""
        self._faults.record(self.actor_id, "env.observation", error, self.first_index + int(ids[0]))
        self._counters.env_errors += 1
        self._counters.obs_refused += len(ids)
        self.rebuild()

    def _restart_episodes(self) -> None:
        self.episode_return[:] = 0.0
        self.episode_length[:] = 0
        self.episode += 1
