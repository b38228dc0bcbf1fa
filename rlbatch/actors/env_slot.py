"""EnvSlot: one environment of an actor, built, seeded, stepped, and rebuilt when it fails.

An actor with k environments holds k slots. Slot j is column j of the actor's trajectories and
environment `index = actor_id * k + j` of the pool. The slot is the only owner of its environment:
it builds it (retrying with back-off), resets it, steps it, keeps the return and length of the
episode in progress, and closes it; the actor only sees observations, rewards and flags.

Seeding: a slot's first environment is reset with `seed + index`; after r rebuilds (counting failed
builds) the new one is reset with `seed + index + num_envs * r`, so no two environments of a pool
ever share a seed. Later resets (a new episode) are unseeded: the environment's own generator goes on.

Episodes: `episode` counts the episodes this slot has started (a rebuild or an abandoned episode
starts a new one too); the actor writes it into `Trajectory.episode_id`.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import gymnasium

from rlbatch.actors.stats import ActorCounters, EpisodeLog, FaultLog

__all__ = ["EnvSlot", "EnvFault", "StopRequested", "env_factory"]

_clock = time.perf_counter
_FIRST_BACKOFF = 0.01  # seconds before the first retry of a failed build


class StopRequested(Exception):
    """The pool was stopped while an actor waited to retry: the actor exits without a fault."""


class EnvFault(Exception):
    """An environment call raised, or gave an observation that cannot be recorded."""

    def __init__(self, column: int, where: str, error: BaseException):
        super().__init__(f"{where} of the environment in column {column}: {error!r}")
        self.column, self.where, self.error = column, where, error


def env_factory(env_fn) -> Callable[[], gymnasium.Env]:
    """A function that builds one new environment, from a gymnasium id, an EnvSpec or a factory."""
    if isinstance(env_fn, (str, gymnasium.envs.registration.EnvSpec)):
        return lambda: gymnasium.make(env_fn)
    if callable(env_fn):
        return env_fn
    raise TypeError(f"env_fn: expected a gymnasium id, an EnvSpec or a factory callable, got {type(env_fn).__name__}")


class RebuildingSlot:
    """What a single-env slot and a vector-env slot share: building with back-off until it works.

    Subclasses set `env`, `actor_id`, `rebuilds`, `_faults`, `_counters`, `_stop`, `_max_backoff` and
    `envs_per_build` (the environments one build opens: 1, or a vector environment's sub-environments),
    and define `open()` and `_restart_episodes()`.
    """

    envs_per_build = 1

    def rebuild(self):
        """Closes the environment and builds a new one (see `open`), every episode starting over;
        what `open` returns."""
        self.close()
        self.rebuilds += 1
        self._counters.env_rebuilds += 1
        self._restart_episodes()
        return self.open()

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            self._close(env)

    def _close(self, env) -> None:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - a failing close must not stop the actor
            pass
        self._counters.envs_open -= self.envs_per_build

    def _build_until_stopped(self, attempt, index: int, fatal: tuple = ()):
        """Calls `attempt(made)` until it returns; `attempt` appends the environment to `made` as
        soon as it exists, so a failure after that is recorded as a reset fault and the environment
        closed. Each failure is recorded, counted as a rebuild and followed by a back-off. An
        exception in `fatal` is not retried. Raises StopRequested if the pool stops first."""
        delay = _FIRST_BACKOFF
        while not self._stop.is_set():
            made = []
            try:
                return attempt(made)
            except fatal:
                raise
            except Exception as e:  # noqa: BLE001 - record, back off, build again
                self._faults.record(self.actor_id, "env.reset" if made else "env_fn", e, index)
                self._counters.env_errors += 1
                if made:
                    self._close(made[0])
                self.rebuilds += 1
                self._counters.env_rebuilds += 1
                if self._stop.wait(delay):
                    break
                delay = min(delay * 2, self._max_backoff)
        raise StopRequested


class EnvSlot(RebuildingSlot):
    """Environment `index` of the pool, column `column` of its actor's trajectories."""

    __slots__ = ("index", "column", "actor_id", "env", "episode", "episode_return", "episode_length", "rebuilds",
                 "_built_episode", "_make_env", "_seed", "_num_envs", "_max_backoff", "_stop", "_counters",
                 "_faults", "_episodes")

    def __init__(self, make_env: Callable[[], Any], index: int, column: int, actor_id: int, *, seed: int,
                 num_envs: int, max_backoff: float, stop: threading.Event, counters: ActorCounters,
                 faults: FaultLog, episodes: EpisodeLog):
        self.index, self.column, self.actor_id = index, column, actor_id
        self.env = None
        self.episode = 0
        self.episode_return = 0.0
        self.episode_length = 0
        self.rebuilds = 0
        self._built_episode = 0
        self._make_env = make_env
        self._seed, self._num_envs, self._max_backoff = seed, num_envs, max_backoff
        self._stop = stop
        self._counters, self._faults, self._episodes = counters, faults, episodes

    # ------------------------------------------------------------------ the hot path

    def step(self, action):
        """The environment's `(obs, reward, terminated, truncated, info)`; EnvFault if it raised."""
        try:
            result = self.env.step(action)
        except Exception as e:  # noqa: BLE001 - any environment error is this slot's fault to recover
            raise EnvFault(self.column, "env.step", e) from e
        self.episode_return += float(result[1])
        self.episode_length += 1
        return result

    def next_episode(self):
        """Logs the episode that just ended and resets the environment; its first observation."""
        self._episodes.add(self.episode_return, self.episode_length)
        self._counters.episodes += 1
        return self._reset()

    # ------------------------------------------------------------------ building and recovering

    @property
    def fresh(self) -> bool:
        """The current observation is the first one of a newly built environment."""
        return self.episode_length == 0 and self.episode == self._built_episode

    def open(self):
        """Builds the environment and resets it with its seed, retrying with back-off; its first
        observation. Raises StopRequested if the pool stops first."""
        return self._build_until_stopped(self._attempt_open, self.index)

    def _attempt_open(self, made: list):
        env = self._make_env()
        made.append(env)
        self._counters.envs_open += 1
        t0 = _clock()
        obs, _ = env.reset(seed=self._seed + self.index + self._num_envs * self.rebuilds)
        self._counters.env_time += _clock() - t0
        self.env = env
        self._built_episode = self.episode
        return obs

    def recover(self, fault: EnvFault):
        """Records `fault` and rebuilds the environment; the new one's first observation."""
        self._faults.record(self.actor_id, fault.where, fault.error, self.index)
        self._counters.env_errors += 1
        return self.rebuild()

    def refused(self, error: BaseException):
        """Records that the policy refused this slot's observation and moves on; the next observation.

        A refused observation in mid-episode abandons the episode and resets the environment; one
        that a reset gave (the environment may be broken beyond its episode) rebuilds it. The first
        observation of a newly built environment (`fresh`) is the actor's to judge: no reset can mend
        an environment that never fits the policy.
        """
        self._faults.record(self.actor_id, "env.observation", error, self.index)
        self._counters.env_errors += 1
        self._counters.obs_refused += 1
        if self.episode_length == 0:
            return self.rebuild()
        try:
            return self._reset()
        except EnvFault as fault:
            return self.recover(fault)

    def _restart_episodes(self) -> None:
        self.episode_return, self.episode_length = 0.0, 0
        self.episode += 1

    def _reset(self):
        self.episode_return, self.episode_length = 0.0, 0
        self.episode += 1
        try:
            obs, _ = self.env.reset()
        except Exception as e:  # noqa: BLE001
            raise EnvFault(self.column, "env.reset", e) from e
        return obs
