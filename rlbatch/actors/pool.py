"""ActorPool: actor threads that play environments with a shared PolicyService and cut trajectories.

Each actor thread owns `envs_per_actor` = k environments, built by `env_fn` on its own thread. Every
step it sends their k observations to the policy service as one request (a registered caller, so a
batch goes as soon as every actor is waiting), steps each environment with its action, and records
the step. Every `unroll_length` = T steps it emits a `Trajectory` (see rlbatch.actors.trajectory for the
shapes) into a bounded queue that the trainer reads.

Episodes: the actor resets an environment itself when `terminated` or `truncated` comes back, so
`obs[t+1]` is the new episode's first observation, `final_obs[t]` the old episode's last one, and no
transition crosses an episode boundary unmarked. Recurrent policy state resets at episode start.

Seeding: environment i (actor a, slot j: i = a * k + j) is reset with seed `seed + i` on its first
reset; a rebuilt environment gets `seed + i + num_envs * rebuilds`. What each environment does with
its actions is then deterministic, but which batch a request joins depends on thread timing, so with
a stochastic policy the actions (and hence trajectories) are not reproducible across runs with many
actors; with one actor and one policy caller they are.

Faults: an environment that raises in step or reset is closed and rebuilt, the actor's unfinished
trajectory is dropped (counted, never emitted half-filled) and the error, with actor id and
traceback, is kept in `stats`. A policy error (the service raised for this request) is recorded and
retried after a bounded exponential back-off. Other actors are not disturbed.
"""
from __future__ import annotations

import array
import collections
import dataclasses
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import gymnasium
import jax
import numpy as np

from rlbatch.errors import InvalidRequest, PoolStopped, RLBatchError, ServiceClosed
from rlbatch.actors.trajectory import Trajectory

__all__ = ["ActorPool", "ActorStats", "ActorError", "PoolStopped"]

_clock = time.perf_counter
_RECENT = 100  # episodes in the recent-return window


@dataclasses.dataclass(frozen=True)
class ActorError:
    actor_id: int
    where: str  # "env.step", "env.reset", "env_fn", "policy"
    error: str  # repr of the exception
    traceback: str
    time: float  # time.time() when it happened


@dataclasses.dataclass(frozen=True)
class ActorStats:
    """A snapshot of an ActorPool. Times in seconds; rates per second of wall clock."""

    num_actors: int
    num_envs: int
    env_steps: int
    elapsed: float
    steps_per_sec: float
    episodes: int
    recent_return_mean: float  # mean return of the last 100 finished episodes (nan before any)
    recent_length_mean: float
    trajectories: int  # emitted into the queue
    queue_depth: int
    dropped_full: int  # trajectories dropped because the queue was full (on_full="drop_oldest")
    dropped_on_error: int  # unfinished trajectories dropped because an environment failed
    env_errors: int
    env_rebuilds: int
    policy_errors: int
    env_time: float  # summed over actors: stepping and resetting environments
    policy_wait_time: float  # summed over actors: waiting for actions
    queue_wait_time: float  # summed over actors: blocked on a full trajectory queue
    last_step_age: tuple  # per actor: seconds since its last completed step (a stuck env shows here)
    recent_errors: tuple  # the last few ActorErrors

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["last_step_age_max"] = max(self.last_step_age) if self.last_step_age else 0.0
        d["last_step_age"] = list(self.last_step_age)
        d["recent_errors"] = [dataclasses.asdict(e) for e in self.recent_errors]
        return d


def _env_factory(env_fn) -> Callable[[], gymnasium.Env]:
    if isinstance(env_fn, (str, gymnasium.envs.registration.EnvSpec)):
        return lambda: gymnasium.make(env_fn)
    if callable(env_fn):
        return env_fn
    raise TypeError(f"env_fn must be a gymnasium id, an EnvSpec or a factory callable, got {type(env_fn).__name__}")


class _TrajectoryQueue:
    """A bounded FIFO with a Condition, so that stop() can wake every blocked producer and consumer."""

    def __init__(self, maxsize: int, on_full: str):
        self._items: collections.deque = collections.deque()
        self._maxsize = maxsize
        self._on_full = on_full
        self._cond = threading.Condition(threading.Lock())
        self._stopped = False
        self._reason = "the actor pool was stopped and no trajectory is left"
        self.dropped = 0

    def put(self, item, caller=None) -> bool:
        """False if the pool stopped before there was room.

        While an actor waits for room its policy caller is paused, so the policy service does
        not hold batches back waiting for a request that cannot come.
        """
        with self._cond:
            paused = False
            while len(self._items) >= self._maxsize and not self._stopped:
                if self._on_full == "drop_oldest":
                    self._items.popleft()
                    self.dropped += 1
                    break
                if not paused and caller is not None and hasattr(caller, "pause"):
                    caller.pause()  # takes the service's lock, never the other way round: no cycle
                    paused = True
                self._cond.wait()
            if paused:
                caller.resume()
            if self._stopped:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float | None):
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._stopped, timeout):
                raise TimeoutError(f"no trajectory within {timeout} s")
            if not self._items:
                raise PoolStopped(self._reason)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def stop(self, reason: str | None = None):
        with self._cond:
            if reason is not None and not self._stopped:
                self._reason = reason
            self._stopped = True
            self._cond.notify_all()

    def __len__(self):
        return len(self._items)


class _Counters:
    """Per-actor counters: each actor writes its own, stats() sums them (no lock on the hot path)."""

    __slots__ = ("steps", "episodes", "trajectories", "dropped_on_error", "env_errors", "env_rebuilds",
                 "policy_errors", "env_time", "policy_time", "queue_time", "last_step")

    def __init__(self):
        self.steps = self.episodes = self.trajectories = self.dropped_on_error = 0
        self.env_errors = self.env_rebuilds = self.policy_errors = 0
        self.env_time = self.policy_time = self.queue_time = 0.0
        self.last_step = _clock()


class _EnvFailed(Exception):
    def __init__(self, slot, where, error):
        super().__init__(where)
        self.slot, self.where, self.error = slot, where, error


class ActorPool:
    """Actor threads stepping environments with actions from a shared PolicyService.

    Args:
      env_fn: a gymnasium id, an EnvSpec, or a factory returning a new environment.
      policy_service: the PolicyService (or anything with `register()` returning a caller that
        maps observations to `(action, extras)` with `.version`).
      num_actors: actor threads.
      unroll_length: T, steps per trajectory.
      envs_per_actor: k environments per actor, sent as one k-row request.
      seed: environment i is first reset with seed + i.
      max_queue: most finished trajectories waiting for the trainer.
      on_full: "block" (actors wait for room) or "drop_oldest" (counted in stats).
      max_backoff: longest pause, in seconds, between retries after a policy error.
    """

    def __init__(self, env_fn, policy_service, num_actors: int, unroll_length: int, *, envs_per_actor: int = 1,
                 seed: int = 0, max_queue: int = 64, on_full: str = "block", max_backoff: float = 1.0,
                 name: str = "actor"):
        for key, value in (("num_actors", num_actors), ("unroll_length", unroll_length),
                           ("envs_per_actor", envs_per_actor), ("max_queue", max_queue)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ActorPool: {key} must be a positive int, got {value!r}")
        if on_full not in ("block", "drop_oldest"):
            raise ValueError(f'ActorPool: on_full must be "block" or "drop_oldest", got {on_full!r}')
        self._make_env = _env_factory(env_fn)
        self.policy = policy_service
        self.num_actors = num_actors
        self.unroll_length = unroll_length
        self.envs_per_actor = envs_per_actor
        self.num_envs = num_actors * envs_per_actor
        self.seed = seed
        self.max_backoff = max_backoff
        self.name = name
        self._queue = _TrajectoryQueue(max_queue, on_full)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._counters = [_Counters() for _ in range(num_actors)]
        self._returns: collections.deque = collections.deque(maxlen=_RECENT)
        self._lengths: collections.deque = collections.deque(maxlen=_RECENT)
        # Return and length of every finished episode, 16 bytes each (appends are atomic under the GIL).
        self._episode_returns = array.array("d")
        self._episode_lengths = array.array("q")
        self._errors: collections.deque = collections.deque(maxlen=32)
        self._start_time = None
        self._stop_time = None
        self._envs_open = 0
        self._envs_lock = threading.Lock()
        self._alive = 0
        example = getattr(policy_service, "example_obs", None)
        self._obs_dtype = [np.asarray(x).dtype for x in jax.tree_util.tree_leaves(example)] if example is not None else None
        self._initial_state = getattr(policy_service, "example_state", None)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "ActorPool":
        if self._threads:
            raise RuntimeError("ActorPool.start: already started")
        self._start_time = _clock()
        self._alive = self.num_actors
        self._threads = [threading.Thread(target=self._actor, args=(a,), name=f"{self.name}-{a}", daemon=True)
                         for a in range(self.num_actors)]
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

    def __enter__(self):
        if not self._threads:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

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

    # ------------------------------------------------------------------ the actor

    def _record_error(self, actor_id, where, error):
        self._errors.append(ActorError(actor_id, where, repr(error),
                                       "".join(traceback.format_exception(type(error), error, error.__traceback__)),
                                       time.time()))

    def _open_env(self, index, rebuilds):
        env = self._make_env()
        with self._envs_lock:
            self._envs_open += 1
        return env

    def _close_env(self, env):
        try:
            env.close()
        except Exception:  # noqa: BLE001 - a failing close must not stop the actor
            pass
        with self._envs_lock:
            self._envs_open -= 1

    def _actor(self, actor_id: int):
        k = self.envs_per_actor
        T = self.unroll_length
        c = self._counters[actor_id]
        first_index = actor_id * k
        envs = [None] * k
        rebuilds = [0] * k
        caller = None
        try:
            caller = self.policy.register()
            obs = [None] * k
            for j in range(k):
                envs[j], obs[j] = self._build(actor_id, first_index + j, rebuilds[j], c)
                if envs[j] is None:
                    return
            space = envs[0].action_space
            bounds = (space.low, space.high) if isinstance(space, gymnasium.spaces.Box) else None
            episode = [0] * k
            ep_return = [0.0] * k
            ep_length = [0] * k
            state = self._initial_rows(k)
            backoff = 0.01
            traj = None
            discrete = None  # integer actions, known from the first policy output
            t = 0
            while not self._stop.is_set():
                if traj is None:
                    traj = _Buffer(T, k, obs)
                    t = 0
                request = obs[0] if k == 1 else _stack(obs)
                if self._obs_dtype is not None and type(request) is np.ndarray:
                    # Environments often return float64 for a float32 policy: convert, never refuse.
                    request = np.asarray(request, dtype=self._obs_dtype[0])
                t0 = _clock()
                try:
                    out = caller(request) if state is None else caller(request, state)
                except ServiceClosed:
                    return  # the policy service is gone: nothing more to play with
                except InvalidRequest:  # the environment's observation does not fit the policy:
                    c.policy_errors += 1  # a configuration error no retry can mend; the actor stops
                    raise  # and the outer handler records it with its traceback
                except Exception as e:  # noqa: BLE001 - a policy fault: record, back off, retry
                    c.policy_time += _clock() - t0
                    self._record_error(actor_id, "policy", e)
                    c.policy_errors += 1
                    if self._stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                t1 = _clock()
                c.policy_time += t1 - t0
                backoff = 0.01
                action, extras = out[0], out[1]
                if discrete is None:
                    discrete = isinstance(action, (np.integer, np.ndarray)) and np.asarray(action).dtype.kind in "iu"
                if state is not None:
                    state = out[2]
                traj.record_policy(t, request, action, extras, out.version)
                # Plain Python scalars for discrete actions: gymnasium's Discrete.contains checks a
                # numpy integer through np.issubdtype, several times slower than an int.
                if discrete:
                    actions = action.tolist() if k > 1 else [action.item()]
                else:
                    actions = action if k > 1 else [action]
                    if bounds is not None:
                        # The env gets the action clipped to its Box; the trajectory keeps the
                        # policy's own sample, whose log-prob the learner needs.
                        actions = np.clip(actions, bounds[0], bounds[1])
                rewards, terms, truncs = [0.0] * k, [False] * k, [False] * k
                step_episode = list(episode)  # the episode each step belongs to, before any reset
                try:
                    for j in range(k):
                        try:
                            next_obs, reward, terminated, truncated, _ = envs[j].step(actions[j])
                        except Exception as e:  # noqa: BLE001
                            raise _EnvFailed(j, "env.step", e) from e
                        rewards[j], terms[j], truncs[j] = reward, terminated, truncated
                        ep_return[j] += float(reward)
                        ep_length[j] += 1
                        if terminated or truncated:
                            traj.final_obs_at(t, j, next_obs)
                            self._returns.append(ep_return[j])
                            self._lengths.append(ep_length[j])
                            self._episode_returns.append(ep_return[j])
                            self._episode_lengths.append(ep_length[j])
                            c.episodes += 1
                            ep_return[j], ep_length[j] = 0.0, 0
                            episode[j] += 1
                            try:
                                next_obs, _ = envs[j].reset()
                            except Exception as e:  # noqa: BLE001
                                raise _EnvFailed(j, "env.reset", e) from e
                            if state is not None:
                                state = _reset_row(state, self._initial_rows(1), j, k)
                        obs[j] = next_obs
                    traj.record_steps(t, rewards, terms, truncs, step_episode)
                except _EnvFailed as failure:
                    j = failure.slot
                    c.env_errors += 1
                    self._record_error(actor_id, failure.where, failure.error)
                    c.dropped_on_error += 1
                    traj = None  # never emitted half-filled
                    self._close_env(envs[j])
                    envs[j] = None
                    rebuilds[j] += 1
                    c.env_rebuilds += 1
                    envs[j], obs[j] = self._build(actor_id, first_index + j, rebuilds[j], c)
                    if envs[j] is None:
                        return
                    ep_return[j], ep_length[j] = 0.0, 0
                    episode[j] += 1
                    if state is not None:
                        state = _reset_row(state, self._initial_rows(1), j, k)
                    c.env_time += _clock() - t1
                    continue
                now = _clock()
                c.env_time += now - t1
                c.steps += k
                c.last_step = now
                t += 1
                if t == T:
                    trajectory = traj.finish(obs, actor_id, first_index, k == 1)
                    traj = None
                    q0 = _clock()
                    if not self._queue.put(trajectory, caller):
                        return
                    c.queue_time += _clock() - q0
                    c.trajectories += 1
        except BaseException as e:  # noqa: BLE001 - an actor never dies silently
            self._record_error(actor_id, "actor", e)
        finally:
            if caller is not None:
                caller.close()
            for env in envs:
                if env is not None:
                    self._close_env(env)
            with self._envs_lock:
                self._alive -= 1
                last = self._alive == 0
            if last and not self._stop.is_set():
                # Nobody is left to fill the queue: a consumer must not wait forever.
                errors = list(self._errors)
                self._queue.stop(f"every actor has exited; last error: {errors[-1].error if errors else None}")

    def _build(self, actor_id, index, rebuilds, c):
        """Builds and resets environment `index`, retrying with back-off; (None, None) if stopped."""
        backoff = 0.01
        while not self._stop.is_set():
            env = None
            try:
                env = self._open_env(index, rebuilds)
                t0 = _clock()
                obs, _ = env.reset(seed=self.seed + index + self.num_envs * rebuilds)
                c.env_time += _clock() - t0
                return env, obs
            except Exception as e:  # noqa: BLE001
                self._record_error(actor_id, "env.reset" if env is not None else "env_fn", e)
                c.env_errors += 1
                if env is not None:
                    self._close_env(env)
                rebuilds += 1
                c.env_rebuilds += 1
                if self._stop.wait(backoff):
                    break
                backoff = min(backoff * 2, self.max_backoff)
        return None, None

    def _initial_rows(self, k):
        if self._initial_state is None:
            return None
        return jax.tree_util.tree_map(lambda x: np.repeat(np.asarray(x)[None], k, axis=0) if k > 1 else np.asarray(x),
                                      self._initial_state)

    # ------------------------------------------------------------------ stats

    @property
    def envs_open(self) -> int:
        return self._envs_open

    @property
    def episodes(self) -> list:
        """(return, length) of every episode finished so far, in the order they finished."""
        n = min(len(self._episode_returns), len(self._episode_lengths))
        return list(zip(self._episode_returns[:n], self._episode_lengths[:n]))

    @property
    def errors(self) -> list:
        return list(self._errors)

    @property
    def stats(self) -> ActorStats:
        cs = self._counters
        now = _clock() if self._stop_time is None else self._stop_time
        elapsed = 0.0 if self._start_time is None else now - self._start_time
        steps = sum(c.steps for c in cs)
        returns, lengths = list(self._returns), list(self._lengths)
        wall = _clock()
        return ActorStats(
            num_actors=self.num_actors,
            num_envs=self.num_envs,
            env_steps=steps,
            elapsed=elapsed,
            steps_per_sec=steps / elapsed if elapsed > 0 else 0.0,
            episodes=sum(c.episodes for c in cs),
            recent_return_mean=float(np.mean(returns)) if returns else float("nan"),
            recent_length_mean=float(np.mean(lengths)) if lengths else float("nan"),
            trajectories=sum(c.trajectories for c in cs),
            queue_depth=len(self._queue),
            dropped_full=self._queue.dropped,
            dropped_on_error=sum(c.dropped_on_error for c in cs),
            env_errors=sum(c.env_errors for c in cs),
            env_rebuilds=sum(c.env_rebuilds for c in cs),
            policy_errors=sum(c.policy_errors for c in cs),
            env_time=sum(c.env_time for c in cs),
            policy_wait_time=sum(c.policy_time for c in cs),
            queue_wait_time=sum(c.queue_time for c in cs),
            last_step_age=tuple(wall - c.last_step for c in cs),
            recent_errors=tuple(self._errors)[-8:],
        )


def _stack(obs_list):
    if type(obs_list[0]) is np.ndarray:
        return np.stack(obs_list)
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *obs_list)


def _reset_row(state, initial_row, j, k):
    if k == 1:
        return initial_row

    def reset(s, init):
        s = np.array(s, copy=True)
        s[j] = init
        return s

    return jax.tree_util.tree_map(reset, state, initial_row)


class _Buffer:
    """One trajectory being filled: arrays [T(+1), k, ...], allocated once per trajectory."""

    def __init__(self, T, k, obs):
        self.T, self.k = T, k
        self.obs = jax.tree_util.tree_map(lambda x: np.zeros((T + 1, k) + np.shape(x), np.asarray(x).dtype), obs[0])
        self.final_obs = jax.tree_util.tree_map(np.zeros_like, jax.tree_util.tree_map(lambda x: x[:T], self.obs))
        self.reward = np.zeros((T, k), np.float32)
        self.terminated = np.zeros((T, k), np.bool_)
        self.truncated = np.zeros((T, k), np.bool_)
        self.version = np.zeros((T, k), np.int64)
        self.episode = np.zeros((T, k), np.int64)
        self.action = None
        self.extras = None
        self._single_obs = type(obs[0]) is np.ndarray

    def record_policy(self, t, obs, action, extras, version):
        if self.action is None:
            a = np.asarray(action)
            self.action = np.zeros((self.T, self.k) + (a.shape if self.k == 1 else a.shape[1:]), a.dtype)
            self.extras = {key: np.zeros((self.T, self.k) + (np.shape(v) if self.k == 1 else np.shape(v)[1:]),
                                         np.asarray(v).dtype) for key, v in extras.items()}
        if self._single_obs:
            self.obs[t] = obs
        else:
            jax.tree_util.tree_map(lambda buf, x: buf.__setitem__(t, x), self.obs, obs)
        self.action[t] = action
        for key, v in extras.items():
            self.extras[key][t] = v
        self.version[t] = version

    def record_steps(self, t, rewards, terminated, truncated, episode):
        # One assignment per field for all k environments (not k assignments).
        self.reward[t] = rewards
        self.terminated[t] = terminated
        self.truncated[t] = truncated
        self.episode[t] = episode

    def final_obs_at(self, t, j, obs):
        if self._single_obs:
            self.final_obs[t, j] = obs
        else:
            jax.tree_util.tree_map(lambda buf, x: buf.__setitem__((t, j), x), self.final_obs, obs)

    def finish(self, obs, actor_id, first_index, squeeze) -> Trajectory:
        last = obs[0] if self.k == 1 else _stack(obs)
        if self._single_obs:
            self.obs[self.T] = last
        else:
            jax.tree_util.tree_map(lambda buf, x: buf.__setitem__(self.T, x), self.obs, last)
        # Episode ids are unique across the pool: environment index in the high bits.
        env_index = first_index + np.arange(self.k, dtype=np.int64)
        episode_id = (env_index[None, :] << 32) | self.episode
        fields = dict(obs=self.obs, action=self.action, reward=self.reward, terminated=self.terminated,
                      truncated=self.truncated, final_obs=self.final_obs, extras=self.extras,
                      policy_version=self.version, episode_id=episode_id)
        if squeeze:  # one environment: no env axis
            fields = jax.tree_util.tree_map(lambda x: x[:, 0], fields)
        return Trajectory(actor_id=actor_id, **fields)
