"""The peers' own loops over vector environments, and the floors under any loop, for bench_envs.

Each loop steps N environments with the same jitted policy as the pool's service, as the peer's
users write it (CleanRL's `ppo_atari_envpool` and `ppo_continuous_action` loops):

- `run_vector_loop`: one vector environment of N (gymnasium SyncVectorEnv or AsyncVectorEnv,
  EnvPool in synchronous mode, ale-py's AtariVectorEnv): obs [N, ...] -> policy -> `step`, one
  policy call per step. The vector environment's own autoreset applies (a NEXT_STEP reset step is
  counted as a step, as the peer's loop counts it);
- `run_envpool_async_loop`: EnvPool's asynchronous mode, num_envs N, batch_size B:
  `recv` (the B environments that finished first) -> policy on those B -> `send(actions, env_id)`;
- `run_env_alone`: the same vector environment with given actions and no policy at all: the
  environment floor, what no loop that steps these environments this way on this machine can beat;
  `run_envs_alone_threads` the same for t threads each stepping its own vector environment of N / t
  at once, and `run_envpool_async_alone` for EnvPool's asynchronous mode (recv -> send);
- `run_policy_threads`: t threads each stepping its own vector environment of N / t and calling the
  policy directly: an ActorPool's layout with no library code (no service, nothing recorded);
- `run_policy_alone`: the policy on batches of N observations and no environment: the policy floor.

Every loop also measures the CPU time the process spent over the measurement (`StepRate.cpu_s`,
`time.process_time`: all its threads, EnvPool's and XLA's included; not subprocesses'). On a machine
of C cores, a step that needs c_env CPU-seconds of environment and c_policy of policy can be done at
most C / (c_env + c_policy) times a second however the two overlap: `cpu_ceiling`.

A loop counts N (or B) env steps per `step` (or `recv`), over `duration` seconds after `warmup`.
A policy is `act_fn(obs, i) -> np.ndarray actions` (experiments.lib.policy_step.policy_act_fn).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import numpy as np

from experiments.lib.env_loops import StepRate

__all__ = ["cpu_ceiling", "run_env_alone", "run_envpool_async_alone", "run_envpool_async_loop", "run_envs_alone_threads",
           "run_policy_alone", "run_policy_threads", "run_vector_loop"]

_clock = time.perf_counter


class _Clock:
    """Counts steps; `running` is False once `duration` seconds have passed after `warmup`."""

    def __init__(self, warmup: float, duration: float):
        self.warm_until = _clock() + warmup
        self.duration = duration
        self.steps = 0
        self.t0 = self.s0 = self.cpu0 = None
        self.t1 = self.cpu1 = None

    def running(self) -> bool:
        now = _clock()
        if self.t0 is None:
            if now >= self.warm_until:
                self.t0, self.s0, self.cpu0 = now, self.steps, time.process_time()
            return True
        if now >= self.t0 + self.duration:
            self.t1, self.cpu1 = now, time.process_time()
            return False
        return True

    def rate(self, num_actors: int, envs_per_actor: int, mean_batch: float) -> StepRate:
        steps = self.steps - self.s0
        elapsed = self.t1 - self.t0
        return StepRate(steps_per_s=steps / elapsed, num_actors=num_actors, envs_per_actor=envs_per_actor,
                        mean_batch=mean_batch, env_steps=steps, elapsed_s=elapsed, cpu_s=self.cpu1 - self.cpu0)


def _seeded_reset(vec, seed: int, n: int):
    """Resets a vector environment of n with seeds seed ... seed + n - 1 (an EnvPool is seeded when
    made; an AtariVectorEnv takes an int array)."""
    modules = [c.__module__ for c in type(vec).__mro__]  # EnvPool's classes are made in module "abc"
    if any(m.startswith("envpool.") for m in modules):
        return vec.reset()[0]
    if any(m.startswith("ale_py.") for m in modules):
        return vec.reset(seed=np.arange(seed, seed + n, dtype=np.int64))[0]
    return vec.reset(seed=[seed + j for j in range(n)])[0]


def run_vector_loop(make_vector_env: Callable[[int, int], Any], act_fn: Callable, num_envs: int, *,
                    warmup: float, duration: float, seed: int = 0) -> StepRate:
    """obs [N, ...] -> act_fn -> vec.step, one policy call per step, on `make_vector_env(N, seed)`.
    The [N, ...] shape is compiled before the clock starts."""
    vec = make_vector_env(num_envs, seed)
    try:
        obs = _seeded_reset(vec, seed, num_envs)
        act_fn(obs, 0)
        clock, i = _Clock(warmup, duration), 0
        while clock.running():
            obs = vec.step(act_fn(obs, i))[0]
            i += 1
            clock.steps += num_envs
    finally:
        vec.close()
    return clock.rate(1, num_envs, float(num_envs))


def run_envpool_async_loop(make_envpool: Callable[[int, int, int], Any], act_fn: Callable, num_envs: int,
                           batch_size: int, *, warmup: float, duration: float, seed: int = 0) -> StepRate:
    """EnvPool's asynchronous loop: recv -> act_fn on the B observations -> send(actions, env_id), with
    `make_envpool(num_envs, batch_size, seed)`. The [B, ...] shape is compiled before the clock starts."""
    pool = make_envpool(num_envs, batch_size, seed)
    try:
        pool.async_reset()
        obs, _, _, _, info = pool.recv()
        pool.send(act_fn(obs, 0), info["env_id"])
        clock, i = _Clock(warmup, duration), 1
        while clock.running():
            obs, _, _, _, info = pool.recv()
            pool.send(act_fn(obs, i), info["env_id"])
            i += 1
            clock.steps += batch_size
    finally:
        pool.close()
    return clock.rate(1, num_envs, float(batch_size))


def run_env_alone(make_vector_env: Callable[[int, int], Any], actions: np.ndarray, num_envs: int, *,
                  warmup: float, duration: float, seed: int = 0) -> StepRate:
    """The vector environment stepped with the given `actions` [S, N, ...] (step i takes actions[i % S])
    and no policy: the floor."""
    vec = make_vector_env(num_envs, seed)
    try:
        _seeded_reset(vec, seed, num_envs)
        clock, i = _Clock(warmup, duration), 0
        while clock.running():
            vec.step(actions[i % len(actions)])
            i += 1
            clock.steps += num_envs
    finally:
        vec.close()
    return clock.rate(1, num_envs, 0.0)


def run_envpool_async_alone(make_envpool: Callable[[int, int, int], Any], actions: np.ndarray, num_envs: int,
                            batch_size: int, *, warmup: float, duration: float, seed: int = 0) -> StepRate:
    """EnvPool's asynchronous mode with no policy: recv -> send(actions for the env ids that came), with
    `make_envpool(num_envs, batch_size, seed)` and `actions` [S, N, ...] (recv i sends actions[i % S][:B])."""
    pool = make_envpool(num_envs, batch_size, seed)
    try:
        pool.async_reset()
        clock, i = _Clock(warmup, duration), 0
        while clock.running():
            info = pool.recv()[4]
            pool.send(actions[i % len(actions)][:batch_size], info["env_id"])
            i += 1
            clock.steps += batch_size
    finally:
        pool.close()
    return clock.rate(1, num_envs, 0.0)


def run_envs_alone_threads(make_vector_env: Callable[[int, int], Any], actions: np.ndarray, num_envs: int,
                           threads: int, *, warmup: float, duration: float, seed: int = 0) -> StepRate:
    """`threads` threads at once, each stepping its own vector environment of num_envs / threads with
    its columns of `actions` [S, N, ...] and no policy: the floor of an ActorPool of that many actors
    (environments that release the GIL step on several cores at once)."""
    k = num_envs // threads
    columns = [actions[:, t * k:(t + 1) * k] for t in range(threads)]
    return _run_threads(make_vector_env, lambda t, obs, i: columns[t][i % len(actions)], num_envs, threads,
                        warmup=warmup, duration=duration, seed=seed)


def run_policy_threads(make_vector_env: Callable[[int, int], Any], act_fn: Callable, num_envs: int, threads: int, *,
                       warmup: float, duration: float, seed: int = 0) -> StepRate:
    """`threads` threads at once, each stepping its own vector environment of num_envs / threads with
    actions from `act_fn(obs, i)` called directly, and nothing else: no service, no trajectories. What
    the policy and the environments do in an ActorPool's layout with no library code at all (the
    Sebulba actor threads, written by hand); its [N / threads, ...] shape is compiled before the clock."""
    return _run_threads(make_vector_env, lambda t, obs, i: act_fn(obs, i), num_envs, threads,
                        warmup=warmup, duration=duration, seed=seed)


def _run_threads(make_vector_env, act: Callable, num_envs: int, threads: int, *, warmup: float, duration: float,
                 seed: int) -> StepRate:
    """Thread t steps its own vector environment of num_envs / threads with `act(t, obs, i)`."""
    k = num_envs // threads
    counts = [0] * threads
    errors: list[BaseException] = []
    stop = threading.Event()
    ready = threading.Barrier(threads + 1)

    def play(t: int) -> None:
        vec = None
        try:
            vec = make_vector_env(k, seed + t * k)
            obs = _seeded_reset(vec, seed + t * k, k)
            act(t, obs, 0)  # compiles the policy's shape, if there is one, before the clock
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            errors.append(e)
            ready.abort()
            if vec is not None:
                vec.close()
            return
        try:
            ready.wait()
            i = 0
            while not stop.is_set():
                obs = vec.step(act(t, obs, i))[0]
                i += 1
                counts[t] += k
        except threading.BrokenBarrierError:
            pass
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            vec.close()

    workers = [threading.Thread(target=play, args=(t,), name=f"vector-thread-{t}") for t in range(threads)]
    for w in workers:
        w.start()
    try:
        ready.wait()
        time.sleep(warmup)
        s0, t0, cpu0 = sum(counts), _clock(), time.process_time()
        time.sleep(duration)
        s1, t1, cpu1 = sum(counts), _clock(), time.process_time()
    except threading.BrokenBarrierError:
        s0 = s1 = 0
        t0, t1, cpu0, cpu1 = 0.0, 1.0, 0.0, 0.0
    finally:
        stop.set()
        for w in workers:
            w.join()
    if errors:
        raise errors[0]
    return StepRate(steps_per_s=(s1 - s0) / (t1 - t0), num_actors=threads, envs_per_actor=k, mean_batch=0.0,
                    env_steps=s1 - s0, elapsed_s=t1 - t0, cpu_s=cpu1 - cpu0)


def run_policy_alone(act_fn: Callable, obs: Any, *, warmup: float, duration: float) -> StepRate:
    """act_fn on the same batch of N observations over and over, no environment: rows per second."""
    n = len(obs)
    act_fn(obs, 0)
    clock, i = _Clock(warmup, duration), 1
    while clock.running():
        act_fn(obs, i)
        i += 1
        clock.steps += n
    return clock.rate(1, n, float(n))


def cpu_ceiling(env_alone: StepRate, policy_alone: StepRate, cores: int) -> float:
    """Steps/s no design can exceed on `cores` CPUs when every step needs the CPU time of one
    environment step (measured by `run_env_alone`) and of one policy row (`run_policy_alone`)."""
    per_step = env_alone.cpu_s / env_alone.env_steps + policy_alone.cpu_s / policy_alone.env_steps
    return cores / per_step
