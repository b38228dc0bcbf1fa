"""What an ActorPool records while it plays: faults, finished episodes, per-actor counters.

Each actor thread writes only its own `ActorCounters`, so the hot path takes no lock; the pool sums
them into an `ActorStats` snapshot when asked. `EpisodeLog` and `FaultLog` are appended to by every
actor without a lock: `deque.append` and `array.append` are atomic under the GIL.
"""
from __future__ import annotations

import array
import collections
import dataclasses
import time
import traceback

import numpy as np

__all__ = ["ActorFault", "ActorStats", "ActorCounters", "EpisodeLog", "FaultLog"]

_clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class ActorFault:
    """A record of one fault an actor met: where, what, and which actor and environment.

    `where` is one of "env_fn" (building an environment raised), "env.reset", "env.step",
    "env.observation" (the policy refused an environment's observation), "policy" (the policy
    service raised for this actor's request) or "actor" (the actor thread itself failed and exited).
    """

    actor_id: int
    where: str
    error: str  # repr of the exception
    traceback: str
    time: float  # time.time() when it happened
    env_index: int | None = None  # the pool-wide index of the environment at fault; None for "policy", "actor"


@dataclasses.dataclass(frozen=True)
class ActorStats:
    """A snapshot of an ActorPool. Times in seconds; rates per second of wall clock."""

    num_actors: int
    num_envs: int
    env_steps: int
    elapsed: float
    steps_per_sec: float
    episodes: int
    recent_return_mean: float  # mean return of the last `recent_episodes` (100) finished episodes (nan before any)
    recent_length_mean: float
    trajectories: int  # emitted into the queue
    queue_depth: int
    dropped_full: int  # trajectories dropped because the queue was full (on_full="drop_oldest")
    dropped_on_error: int  # unfinished trajectories dropped because an environment failed (columns, in EnvPool send/recv mode)
    env_errors: int  # environment faults of every kind, refused observations included
    env_rebuilds: int
    obs_refused: int  # observations the policy refused (each also counted in env_errors)
    policy_errors: int
    env_time: float  # summed over actors: stepping and resetting environments
    policy_wait_time: float  # summed over actors: waiting for actions
    queue_wait_time: float  # summed over actors: blocked on a full trajectory queue
    actors_running: int  # actor threads still playing (an actor that died shows here)
    last_step_age: tuple  # per actor: seconds since its last completed step (a stuck env shows here)
    recent_errors: tuple  # the last few ActorFaults

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["last_step_age_max"] = max(self.last_step_age) if self.last_step_age else 0.0
        d["last_step_age"] = list(self.last_step_age)
        d["recent_errors"] = [dataclasses.asdict(e) for e in self.recent_errors]
        return d


class ActorCounters:
    """One actor's counters and timers, written by that actor's thread only (but `running`,
    which the pool sets before the thread starts)."""

    __slots__ = ("steps", "episodes", "trajectories", "dropped_on_error", "env_errors", "env_rebuilds",
                 "obs_refused", "policy_errors", "env_time", "policy_wait_time", "queue_wait_time", "last_step",
                 "envs_open", "running")

    def __init__(self):
        self.steps = self.episodes = self.trajectories = self.dropped_on_error = 0
        self.env_errors = self.env_rebuilds = self.obs_refused = self.policy_errors = 0
        self.env_time = self.policy_wait_time = self.queue_wait_time = 0.0
        self.last_step = _clock()
        self.envs_open = 0  # built and not yet closed
        self.running = False


class EpisodeLog:
    """Return and length of every finished episode, in the order they finished, and a recent window."""

    def __init__(self, window: int = 100):
        self._recent_returns: collections.deque = collections.deque(maxlen=window)
        self._recent_lengths: collections.deque = collections.deque(maxlen=window)
        # Every episode, 16 bytes each: a long run keeps millions without a Python object apiece.
        self._returns = array.array("d")
        self._lengths = array.array("q")

    def add(self, episode_return: float, length: int) -> None:
        self._recent_returns.append(episode_return)
        self._recent_lengths.append(length)
        self._returns.append(episode_return)
        self._lengths.append(length)

    def all(self) -> list:
        """(return, length) of every finished episode."""
        # Another thread may have appended a return and not yet its length.
        n = min(len(self._returns), len(self._lengths))
        return list(zip(self._returns[:n], self._lengths[:n]))

    def recent_means(self) -> tuple[float, float]:
        """Mean return and mean length over the window (nan before any episode finished)."""
        returns, lengths = list(self._recent_returns), list(self._recent_lengths)
        if not returns:
            return float("nan"), float("nan")
        return float(np.mean(returns)), float(np.mean(lengths))


class FaultLog:
    """The most recent ActorFaults of a pool (at most `maxlen`), oldest first."""

    def __init__(self, maxlen: int = 32):
        self._faults: collections.deque = collections.deque(maxlen=maxlen)

    def record(self, actor_id: int, where: str, error: BaseException, env_index: int | None = None) -> ActorFault:
        fault = ActorFault(actor_id, where, repr(error),
                           "".join(traceback.format_exception(type(error), error, error.__traceback__)),
                           time.time(), env_index)
        self._faults.append(fault)
        return fault

    def recent(self, n: int | None = None) -> list:
        faults = list(self._faults)
        return faults if n is None else faults[-n:]

    @property
    def last(self) -> ActorFault | None:
        faults = list(self._faults)
        return faults[-1] if faults else None
