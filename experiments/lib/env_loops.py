"""Environment-stepping baselines: N environments stepped with the same jitted policy as the pool's
service, in each of the ways the benchmarks compare ActorPool against, and the pool measurement.

- `run_sync_vector`: gymnasium's SyncVectorEnv and ONE policy call per step on all [N, ...]
  observations, the ideal synchronous loop;
- `run_unbatched`: N threads, each stepping its own environment and calling the policy itself
  on a batch of one;
- `run_service_threads`: N threads, each stepping its own environment with a PolicyService's
  actions and nothing else (an ActorPool without trajectories);
- `run_thread_floor`: N threads, each stepping its own environment and waiting once per step until
  all N wait (no policy, no data): the floor of any design with one thread per environment;
- `measure_pool`: steps/s of a running ActorPool while the calling thread drains its
  trajectories, as a trainer would (`drain_until`), optionally sampling the pool for a time series.

A policy is passed as `act_fn(obs, i) -> actions` (experiments.lib.policy_step.policy_act_fn).
This module plugs into environments only through gymnasium's API: it imports no `envs` or `agents`.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Callable

import gymnasium
import jax
import numpy as np

from experiments.lib.relay_gate import RelayGate
from rlbatch.errors import PoolStopped

__all__ = [
    "StepRate",
    "drain_until",
    "grouping",
    "measure_pool",
    "run_service_threads",
    "run_sync_vector",
    "run_thread_floor",
    "run_unbatched",
]

_clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class StepRate:
    """Environment steps per second of one way to step `num_actors * envs_per_actor` environments.

    `mean_batch` is the mean number of observations per policy call; `series` holds
    (seconds since start, env steps) samples where the measurement took them.
    """

    steps_per_s: float
    num_actors: int
    envs_per_actor: int
    mean_batch: float
    env_steps: int  # counted between the end of the warm-up and the end of the measurement
    elapsed_s: float
    series: tuple = ()
    cpu_s: float = float("nan")  # CPU seconds of this process (all its threads) over the measurement


def grouping(num_envs: int, envs_per_actor: int | None = None) -> tuple[int, int]:
    """(actors, environments per actor) for num_envs environments.

    With `envs_per_actor`, groups of that many (fewer when num_envs is smaller, and the largest
    divisor of num_envs below it otherwise); without, about sqrt(num_envs) x sqrt(num_envs).
    """
    if envs_per_actor is not None:
        if envs_per_actor < 1:
            raise ValueError(f"grouping: envs_per_actor must be >= 1, got {envs_per_actor!r}")
        per = min(envs_per_actor, num_envs)
        while num_envs % per:
            per -= 1
        return num_envs // per, per
    actors = math.isqrt(num_envs)
    while num_envs % actors:
        actors -= 1
    return actors, num_envs // actors


def run_sync_vector(make_env: Callable[[], gymnasium.Env], act_fn: Callable, num_envs: int, *,
                    warmup: float, duration: float, seed: int = 0) -> StepRate:
    """The ideal synchronous loop: obs [N, ...] -> act_fn -> SyncVectorEnv.step, one call per step.

    Same-step autoreset, so every environment step is a real step. The [N, ...] shape is compiled
    before the clock starts.
    """
    vec = gymnasium.vector.SyncVectorEnv([make_env] * num_envs,
                                         autoreset_mode=gymnasium.vector.AutoresetMode.SAME_STEP)
    try:
        obs, _ = vec.reset(seed=seed)
        act_fn(obs, 0)
        i, steps = 0, 0
        t_warm = _clock() + warmup
        t0 = s0 = None
        while True:
            now = _clock()
            if t0 is None and now >= t_warm:
                t0, s0 = now, steps
            elif t0 is not None and now >= t0 + duration:
                break
            obs, _, _, _, _ = vec.step(act_fn(obs, i))
            i += 1
            steps += num_envs
    finally:
        vec.close()
    return StepRate(steps_per_s=(steps - s0) / (now - t0), num_actors=1, envs_per_actor=num_envs,
                    mean_batch=float(num_envs), env_steps=steps - s0, elapsed_s=now - t0)


def run_unbatched(make_env: Callable[[], gymnasium.Env], act_fn: Callable, num_envs: int, *,
                  warmup: float, duration: float, seed: int = 0) -> StepRate:
    """N threads, each stepping its own environment and calling act_fn itself on a batch of one.

    Environment a is first reset with seed + a. The [1, ...] shape is compiled before the threads
    start; an exception in any thread is raised here.
    """
    probe = make_env()
    try:
        obs, _ = probe.reset(seed=seed)
        act_fn(_one(obs), 0)
    finally:
        probe.close()

    def choose(obs, i):
        action = act_fn(_one(obs), i)[0]
        # Plain Python ints for discrete actions, as ActorPool sends them.
        return action.item() if action.dtype.kind in "iu" else action

    rate = _run_env_threads("run_unbatched", make_env, num_envs, choose, warmup=warmup, duration=duration, seed=seed)
    return dataclasses.replace(rate, mean_batch=1.0)

def run_thread_floor(make_env: Callable[[], gymnasium.Env], num_envs: int, *,
                     warmup: float, duration: float, seed: int = 0) -> StepRate:
    """N threads stepping their environments, each waiting once per step until all N wait.

    The floor under any design with one thread per environment and a shared batched policy: the
    per-step thread hand-off (`RelayGate`) without a policy, without data and without
    trajectories. Actions alternate 0, 1 (a Discrete(2) action space such as CartPole's).
    """
    gate = RelayGate(num_envs)

    def choose(obs, i):
        gate.wait()
        return i & 1

    try:
        rate = _run_env_threads("run_thread_floor", make_env, num_envs, choose, warmup=warmup, duration=duration,
                                seed=seed, on_stop=gate.close, on_exit=gate.leave)
    finally:
        gate.close()
    return dataclasses.replace(rate, mean_batch=float(num_envs))


def run_service_threads(make_env: Callable[[], gymnasium.Env], policy_service, num_envs: int, *,
                        warmup: float, duration: float, seed: int = 0) -> StepRate:
    """N threads, each stepping its own environment with actions from `policy_service` (a
    PolicyService; each thread a registered caller), and nothing else: an ActorPool without its
    trajectories, episode statistics and fault handling, to show what those cost. `mean_batch`
    counts the service's batches over the whole run, warm-up included."""
    local = threading.local()

    def choose(obs, i):
        caller = getattr(local, "caller", None)
        if caller is None:
            caller = local.caller = policy_service.register()
        action = caller(obs)[0]
        return action.item() if action.dtype.kind in "iu" else action

    def leave():
        caller = getattr(local, "caller", None)
        if caller is not None:
            caller.close()

    b0 = policy_service.stats
    rate = _run_env_threads("run_service_threads", make_env, num_envs, choose, warmup=warmup, duration=duration,
                            seed=seed, on_exit=leave)
    return dataclasses.replace(rate, mean_batch=_mean_rows(b0, policy_service.stats))


def _run_env_threads(what, make_env, num_envs, choose, *, warmup, duration, seed, on_stop=None, on_exit=None):
    """N threads, thread a stepping its own environment (first reset with seed + a) with
    `choose(obs, i)`'s actions; steps/s over `duration` after `warmup`. `on_stop` runs once the
    threads are told to stop (to release a thread blocked in `choose`), `on_exit` in each thread
    as it ends. An exception in any thread is raised here."""
    counts = [0] * num_envs
    stop = threading.Event()
    ready = threading.Barrier(num_envs + 1)
    failures: list = []

    def actor(a):
        env = None
        try:
            env = make_env()
            obs, _ = env.reset(seed=seed + a)
            ready.wait()
            i = 0
            while not stop.is_set():
                obs, _, terminated, truncated, _ = env.step(choose(obs, i))
                if terminated or truncated:
                    obs, _ = env.reset()
                i += 1
                counts[a] = i
        except threading.BrokenBarrierError:
            pass  # another actor failed before the start: it is the one reported
        except BaseException as e:  # noqa: BLE001 - reported by the main thread, not lost
            failures.append(e)
            ready.abort()
        finally:
            if on_exit is not None:
                on_exit()
            if env is not None:
                env.close()

    threads = [threading.Thread(target=actor, args=(a,), name=f"{what}-{a}") for a in range(num_envs)]
    for t in threads:
        t.start()
    try:
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            pass
        else:
            stop.wait(warmup)
            s0, t0 = sum(counts), _clock()
            stop.wait(duration)
            s1, t1 = sum(counts), _clock()
    finally:
        stop.set()
        if on_stop is not None:
            on_stop()
        for t in threads:
            t.join()
    if failures:
        raise RuntimeError(f"{what} with {num_envs} envs: an actor thread failed: {failures[0]!r}") from failures[0]
    return StepRate(steps_per_s=(s1 - s0) / (t1 - t0), num_actors=num_envs, envs_per_actor=1, mean_batch=1.0,
                    env_steps=s1 - s0, elapsed_s=t1 - t0)


def _one(obs):
    """One observation as a batch of one (leaves [1, ...])."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[None], obs)


def drain_until(pool, end: float, sample: Callable[[], None] | None = None, every: float = 0.1) -> int:
    """Consumes the pool's trajectories until `end` (time.perf_counter seconds), as a trainer would.

    With `sample`, calls it about every `every` seconds (between trajectories: the wait for the
    next one never outlasts the next sample time). Returns the trajectories consumed; returns
    early if the pool stopped and is drained.
    """
    consumed = 0
    next_sample = _clock() + every
    while True:
        now = _clock()
        if sample is not None and now >= next_sample:
            sample()
            next_sample = now + every
        left = end - now
        if left <= 0:
            return consumed
        wait = left if sample is None else min(left, max(next_sample - now, 0.0))
        try:
            pool.get(timeout=wait)
            consumed += 1
        except TimeoutError:
            continue
        except PoolStopped:
            return consumed


def measure_pool(pool, policy=None, *, warmup: float, duration: float,
                 sample: Callable[[], None] | None = None, sample_every: float = 0.1) -> StepRate:
    """Steps/s of a started ActorPool over `duration` s after `warmup` s, draining its trajectories.

    `policy` (its PolicyService or BatchedService) gives `mean_batch`: mean valid rows per batch
    over the measured span. `sample` (e.g. `report.Recorder.sample`) is called about every
    `sample_every` s during warm-up and measurement; the `series` of the result holds the pool's
    (elapsed, env steps) at the start and end of the measured span. Raises RuntimeError naming the
    actor if any actor recorded an error. The caller stops the pool.
    """
    drain_until(pool, _clock() + warmup, sample, sample_every)
    a0, t0, cpu0 = pool.stats, _clock(), time.process_time()
    b0 = policy.stats if policy is not None else None
    drain_until(pool, t0 + duration, sample, sample_every)
    a1, t1, cpu1 = pool.stats, _clock(), time.process_time()
    b1 = policy.stats if policy is not None else None
    errors = pool.errors
    if errors:
        e = errors[-1]
        raise RuntimeError(f"measure_pool: actor {e.actor_id} of {pool.num_actors} ({pool.num_actors} x "
                           f"{pool.envs_per_actor} envs) failed in {e.where}: {e.error}")
    steps = a1.env_steps - a0.env_steps
    return StepRate(steps_per_s=steps / (t1 - t0), num_actors=pool.num_actors, envs_per_actor=pool.envs_per_actor,
                    mean_batch=_mean_rows(b0, b1) if policy is not None else float("nan"), env_steps=steps,
                    elapsed_s=t1 - t0, series=((a0.elapsed, a0.env_steps), (a1.elapsed, a1.env_steps)),
                    cpu_s=cpu1 - cpu0)


def _mean_rows(before, after) -> float:
    """Mean valid rows per batch between two service stats snapshots."""
    batches = after.batches - before.batches
    rows = (sum(k * c for k, c in after.batch_size_hist.items())
            - sum(k * c for k, c in before.batch_size_hist.items()))
    return rows / batches if batches else 0.0

