"""ActorPool: actor threads that play environments with a shared PolicyService and cut trajectories.

Each of `num_actors` actor threads owns `envs_per_actor` = k environments, built by `env_fn` on its
own thread. Every step it sends their k observations to the policy service as one request (a
registered caller, so a batch goes as soon as every actor is waiting), steps each environment with
its action, and records the step. Every `unroll_length` = T steps it emits a `Trajectory` (see
rlbatch.actors.trajectory for the shapes) into a bounded queue that the trainer reads.

The pieces: `Actor` (rlbatch.actors.actor) is one thread's loop; `EnvSlot` (env_slot) one
environment, its seeding, episode bookkeeping and rebuilds; `TrajectoryBuilder` (trajectory) one
trajectory being filled; `TrajectoryQueue` (queue) the bounded queue; stats the counters and records.

Episodes: the actor resets an environment itself when `terminated` or `truncated` comes back, so
`obs[t+1]` is the new episode's first observation, `final_obs[t]` the old episode's last one, and no
transition crosses an episode boundary unmarked. Recurrent policy state resets at episode start.

Seeding: environment i (actor a, column j: i = a * k + j) is reset with seed `seed + i` on its first
reset; a rebuilt environment gets `seed + i + num_envs * rebuilds`. What each environment does with
its actions is then deterministic, but which batch a request joins depends on thread timing, so with
a stochastic policy the actions (and hence trajectories) are not reproducible across runs with many
actors; with one actor and one policy caller they are.

Vector environments: with `vector_env_fn` each actor owns one vector environment of k
sub-environments (gymnasium's SyncVectorEnv or AsyncVectorEnv, in its NEXT_STEP or SAME_STEP
autoreset mode, or an EnvPool in synchronous mode) in place of k environments; its trajectories
follow the same contract, column j being sub-environment j. A failing vector environment is
rebuilt whole. With `async_batch_size=b` each actor plays an EnvPool of n = `envs_per_actor`
environments in its send/recv mode, b per step (an `AsyncVectorActor`, rlbatch.actors.async_actor):
its trajectories have width b, not n.

Faults: an environment that raises in step or reset, or whose observation the policy refuses, is
reset or rebuilt, the actor's unfinished trajectory is dropped (counted, never emitted half-filled)
and the fault, with actor id, environment and traceback, is kept in `stats`. A policy error is
retried after a bounded exponential back-off. Other actors are not disturbed. An environment whose
first observation never fits the policy is a configuration error: the pool stops at once and
`get` raises PoolStopped saying what the policy expected and what came.
"""
from __future__ import annotations

import threading
import time
from typing import Iterator

from rlbatch.actors.actor import Actor, ActorSetup, VectorActor
from rlbatch.actors.async_actor import AsyncVectorActor
from rlbatch.actors.env_slot import env_factory
from rlbatch.actors.lifecycle import StartStopContext
from rlbatch.actors.queue import ON_FULL, TrajectoryQueue
from rlbatch.actors.stats import ActorCounters, ActorFault, ActorStats, EpisodeLog, FaultLog
from rlbatch.actors.trajectory import Trajectory
from rlbatch.errors import PoolStopped

__all__ = ["ActorPool", "ActorStats", "ActorFault", "PoolStopped"]

_clock = time.perf_counter
_KEEP_FAULTS = 32  # faults kept for `errors`
_RECENT_FAULTS = 8  # faults shown in `stats.recent_errors`


class ActorPool(StartStopContext):
    """Actor threads stepping environments with actions from a shared PolicyService.

    Args:
      env_fn: a gymnasium id, an EnvSpec, or a factory returning a new environment; None with
        `vector_env_fn`.
      policy_service: the PolicyService (or anything with `register()` returning a caller that
        maps observations to `(action, extras)` with `.version`).
      num_actors: actor threads.
      unroll_length: T, steps per trajectory.
      envs_per_actor: k environments per actor, sent as one k-row request.
      seed: environment i is first reset with seed + i.
      max_queue: most finished trajectories waiting for the trainer.
      on_full: "block" (actors wait for room) or "drop_oldest" (counted in stats).
      max_backoff: longest pause, in seconds, between retries after a policy error or a failed
        environment build.
      name: prefix of the actor threads' names.
      vector_env_fn: instead of `env_fn`, a factory `(k, seed)` -> a new gymnasium vector
        environment of k sub-environments: each actor owns one, built on its own thread, as its k
        columns (see rlbatch.actors.vector_slot for autoreset modes, seeding and faults). `seed` is
        sub-environment 0's seed (j's is seed + j); a gymnasium vector environment may ignore it
        (the actor resets it with its seeds), an EnvPool takes it. For example
        `lambda k, seed: gymnasium.vector.AsyncVectorEnv([make_env] * k)` steps GIL-holding Python
        environments in k subprocesses, and `lambda k, seed: envpool.make("CartPole-v1",
        env_type="gymnasium", num_envs=k, seed=seed)` uses EnvPool's threads. Observations must be
        plain arrays.
      async_batch_size: with `vector_env_fn`, b: each actor's vector environment is an EnvPool of
        n = `envs_per_actor` environments in its asynchronous send/recv mode (`envpool.make(task_id,
        env_type="gymnasium", num_envs=n, batch_size=b, seed=seed)`): every step the b environments
        that finished first go to the policy as one request, and trajectories have width b
        (obs [T+1, b, ...]), each column one environment's T consecutive steps (see
        rlbatch.actors.async_actor). Without it, an EnvPool with batch_size < num_envs is refused.
      recent_episodes: episodes in the window of `stats.recent_return_mean` (a solve rule's window).
      inline_policy: each actor runs its own requests through the policy in its own thread
        (`policy_service.register(inline=True)`, see PolicyService.register) instead of queueing
        them for the service's worker: Sebulba's actor threads. For actors whose request fills a
        batch by itself (vector environments); actors of one environment each are better served
        batched together.
    """

    def __init__(self, env_fn, policy_service, num_actors: int, unroll_length: int, *, envs_per_actor: int = 1,
                 seed: int = 0, max_queue: int = 64, on_full: str = "block", max_backoff: float = 1.0,
                 name: str = "actor", vector_env_fn=None, async_batch_size: int | None = None,
                 recent_episodes: int = 100, inline_policy: bool = False):
        for key, value in (("num_actors", num_actors), ("unroll_length", unroll_length),
                           ("envs_per_actor", envs_per_actor), ("max_queue", max_queue),
                           ("recent_episodes", recent_episodes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ActorPool: {key} must be a positive int, got {value!r}")
        if on_full not in ON_FULL:
            raise ValueError(f'ActorPool: on_full must be "block" or "drop_oldest", got {on_full!r}')
        if (env_fn is None) == (vector_env_fn is None):
            raise ValueError("ActorPool: expected exactly one of env_fn and vector_env_fn, got "
                             + ("both" if env_fn is not None else "neither"))
        if vector_env_fn is not None and not callable(vector_env_fn):
            raise TypeError(f"ActorPool: vector_env_fn must be a callable (k, seed) -> vector environment, got "
                            f"{type(vector_env_fn).__name__}")
        if async_batch_size is not None:
            if vector_env_fn is None:
                raise ValueError("ActorPool: async_batch_size needs vector_env_fn (an EnvPool factory), got env_fn")
            if not isinstance(async_batch_size, int) or not 1 <= async_batch_size <= envs_per_actor:
                raise ValueError(f"ActorPool: async_batch_size must be an int in [1, envs_per_actor={envs_per_actor}], "
                                 f"got {async_batch_size!r}")
        self.async_batch_size = async_batch_size
        self.inline_policy = bool(inline_policy)
        self._make_env = None if env_fn is None else env_factory(env_fn)
        self._make_vector_env = vector_env_fn
        self.policy = policy_service
        self.num_actors = num_actors
        self.unroll_length = unroll_length
        self.envs_per_actor = envs_per_actor
        self.num_envs = num_actors * envs_per_actor
        self.seed = seed
        self.max_backoff = max_backoff
        self.name = name
        self._queue = TrajectoryQueue(max_queue, on_full)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._counters = [ActorCounters() for _ in range(num_actors)]
        self._episodes = EpisodeLog(recent_episodes)
        self._faults = FaultLog(_KEEP_FAULTS)
        self._start_time = None
        self._stop_time = None
        self._exit_lock = threading.Lock()
        self._actors_left = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "ActorPool":
        if self._threads:
            raise RuntimeError("ActorPool.start: already started")
        setup = ActorSetup(make_env=self._make_env, policy=self.policy, unroll_length=self.unroll_length,
                           envs_per_actor=self.envs_per_actor, seed=self.seed, num_envs=self.num_envs,
                           max_backoff=self.max_backoff, queue=self._queue, episodes=self._episodes,
                           faults=self._faults, stop=self._stop, halt=self._halt, exited=self._actor_exited,
                           make_vector_env=self._make_vector_env, async_batch_size=self.async_batch_size,
                           inline_policy=self.inline_policy)
        if self.async_batch_size is not None:
            actor_type = AsyncVectorActor
        else:
            actor_type = Actor if self._make_vector_env is None else VectorActor
        actors = [actor_type(a, setup, self._counters[a]) for a in range(self.num_actors)]
        self._start_time = _clock()
        self._actors_left = self.num_actors
        for counters in self._counters:
            counters.running = True  # before the threads start, so that stats never shows them dead
        self._threads = [threading.Thread(target=actor.run, name=f"{self.name}-{actor.actor_id}", daemon=True)
                         for actor in actors]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Stops every actor, closes every environment, joins every thread.

        Actors finish the step in progress (their pending policy requests are answered by the
        service) and exit. Returns True if every thread ended within `timeout`.
        """
        self._stop.set()
        self._queue.stop()
        end = None if timeout is None else _clock() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - _clock()))
        if self._stop_time is None:
            self._stop_time = _clock()
        return not any(t.is_alive() for t in self._threads)

    def _halt(self, reason: str) -> None:
        """Stops every actor at once (a configuration error): the consumer gets PoolStopped(reason)."""
        self._stop.set()
        self._queue.stop(reason)

    def _actor_exited(self, why: str) -> None:
        with self._exit_lock:
            self._actors_left -= 1
            last = self._actors_left == 0
        if last and not self._stop.is_set():
            # Nobody is left to fill the queue: a consumer must not wait forever.
            fault = self._faults.last
            self._queue.stop(f"every actor has exited (the last one because {why}); "
                             f"last error: {fault.error if fault is not None else None}")

    @property
    def started(self) -> bool:
        """start() has been called (the pool may have stopped since)."""
        return bool(self._threads)

    @property
    def running(self) -> bool:
        return bool(self._threads) and not self._stop.is_set()

    # ------------------------------------------------------------------ consuming

    def get(self, timeout: float | None = None) -> Trajectory:
        """The next finished trajectory; raises PoolStopped once stopped and drained."""
        return self._queue.get(timeout)

    def __iter__(self) -> Iterator[Trajectory]:
        while True:
            try:
                yield self._queue.get(None)
            except PoolStopped:
                return

    # ------------------------------------------------------------------ stats

    @property
    def envs_open(self) -> int:
        return sum(c.envs_open for c in self._counters)

    @property
    def episodes(self) -> list:
        """(return, length) of every episode finished so far, in the order they finished."""
        return self._episodes.all()

    @property
    def errors(self) -> list:
        """The most recent ActorFaults (up to 32), oldest first."""
        return self._faults.recent()

    @property
    def stats(self) -> ActorStats:
        cs = self._counters
        now = _clock() if self._stop_time is None else self._stop_time
        elapsed = 0.0 if self._start_time is None else now - self._start_time
        steps = sum(c.steps for c in cs)
        return_mean, length_mean = self._episodes.recent_means()
        wall = _clock()
        return ActorStats(
            num_actors=self.num_actors,
            num_envs=self.num_envs,
            env_steps=steps,
            elapsed=elapsed,
            steps_per_sec=steps / elapsed if elapsed > 0 else 0.0,
            episodes=sum(c.episodes for c in cs),
            recent_return_mean=return_mean,
            recent_length_mean=length_mean,
            trajectories=sum(c.trajectories for c in cs),
            queue_depth=len(self._queue),
            dropped_full=self._queue.dropped,
            dropped_on_error=sum(c.dropped_on_error for c in cs),
            env_errors=sum(c.env_errors for c in cs),
            env_rebuilds=sum(c.env_rebuilds for c in cs),
            obs_refused=sum(c.obs_refused for c in cs),
            policy_errors=sum(c.policy_errors for c in cs),
            env_time=sum(c.env_time for c in cs),
            policy_wait_time=sum(c.policy_wait_time for c in cs),
            queue_wait_time=sum(c.queue_wait_time for c in cs),
            actors_running=sum(c.running for c in cs),
            last_step_age=tuple(wall - c.last_step for c in cs),
            recent_errors=tuple(self._faults.recent(_RECENT_FAULTS)),
        )
