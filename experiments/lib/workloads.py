"""The real-environment workloads of experiments.bench_envs: how each kind of environment is made.

A `Workload` names one task and everything needed to step N of its environments every way the
benchmark compares: one gymnasium environment (for one environment per actor thread), and the
vector environments of k by kind:

- "gym-sync": gymnasium's SyncVectorEnv of k environments (one process);
- "gym-async": gymnasium's AsyncVectorEnv of k subprocess environments (shared memory; processes
  forked from a forkserver that has the environment modules loaded, so a worker starts in
  milliseconds and no process is forked from the multithreaded JAX process);
- "envpool-sync": EnvPool with batch_size == num_envs;
- "envpool-async": EnvPool with batch_size < num_envs (`recv`/`send`), for the peer loop;
- "ale-vector": ale-py's AtariVectorEnv (Atari workloads only).

Every maker takes `(k, seed)` (ActorPool's `vector_env_fn` signature; an EnvPool is seeded when
made, the others at reset). The Atari preprocessing is envs.atari's, the same on every path.
"""
from __future__ import annotations

import dataclasses
import functools
import multiprocessing
from typing import Any, Callable

import gymnasium
import numpy as np

from envs import atari

__all__ = ["KINDS", "WORKLOADS", "Workload", "preload_forkserver"]

KINDS = ("gym-sync", "gym-async", "envpool-sync", "envpool-async", "ale-vector")
_FORKSERVER_MODULES = ["gymnasium", "numpy", "envs.atari", "ale_py", "mujoco"]


def preload_forkserver() -> None:
    """Loads the environment modules into the forkserver that AsyncVectorEnv workers fork from.
    Call once before the first AsyncVectorEnv is made."""
    multiprocessing.set_forkserver_preload(_FORKSERVER_MODULES)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One task, made every way the benchmark steps it."""

    name: str
    env_id: str  # gymnasium id of one environment
    envpool_id: str
    network: str  # the policy's torso, agents.make_actor_critic's `torso`
    make_env: Callable[[], gymnasium.Env]
    make_envpool: Callable[..., Any]  # (num_envs, seed, **envpool kwargs) -> an EnvPool
    ale: bool = False  # ale-py's AtariVectorEnv can play it

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k in KINDS if k != "ale-vector" or self.ale)

    def vector_env_fn(self, kind: str, num_threads: int = 0) -> Callable[[int, int], Any]:
        """`(k, seed) -> vector environment` of `kind` (see the module docstring); for
        "envpool-async" see `envpool_async_fn`. `num_threads`: the worker threads of each EnvPool or
        AtariVectorEnv (0: theirs by default, min(k, cores))."""
        threads = {"num_threads": num_threads} if num_threads else {}
        if kind == "gym-sync":
            return lambda k, seed: gymnasium.vector.SyncVectorEnv([self.make_env] * k)
        if kind == "gym-async":
            return lambda k, seed: gymnasium.vector.AsyncVectorEnv([self.make_env] * k, shared_memory=True,
                                                                   context="forkserver")
        if kind == "envpool-sync":
            return lambda k, seed: self.make_envpool(k, seed, **threads)
        if kind == "ale-vector" and self.ale:
            return lambda k, seed: atari.make_ale_vector_env(self.env_id, k, seed, **threads)
        raise ValueError(f"Workload {self.name}: expected a vector kind of {self.kinds} (envpool-async through "
                         f"envpool_async_fn), got {kind!r}")

    def envpool_async_fn(self, batch_size: Callable[[int], int], num_threads: int = 0) -> Callable[..., Any]:
        """`(k, seed) -> EnvPool` of k environments in asynchronous mode, batch_size(k) per recv."""
        threads = {"num_threads": num_threads} if num_threads else {}
        return lambda k, seed: self.make_envpool(k, seed, batch_size=batch_size(k), **threads)

    def floor_actions(self, n: int, steps: int = 64, seed: int = 0) -> np.ndarray:
        """Actions [steps, n, ...] for the environment floor, drawn from the action space (seeded): the
        environments move as under a fresh policy (zero torques would leave a MuJoCo body lying still,
        whose steps cost less than a moving one's)."""
        env = self.make_env()
        try:
            space = env.action_space
        finally:
            env.close()
        space.seed(seed)
        return np.stack([np.stack([space.sample() for _ in range(n)]) for _ in range(steps)])


def _envpool_mujoco(task_id: str, num_envs: int, seed: int, **kwargs):
    import envpool

    return envpool.make(task_id, env_type="gymnasium", num_envs=num_envs, seed=seed, **kwargs)


WORKLOADS = {
    "breakout": Workload(
        name="breakout", env_id="ALE/Breakout-v5", envpool_id="Breakout-v5", network="cnn",
        make_env=functools.partial(atari.make_atari_env, "ALE/Breakout-v5"),
        make_envpool=lambda n, seed, **kw: atari.make_envpool_atari("Breakout-v5", n, seed=seed, **kw), ale=True),
    "halfcheetah": Workload(
        name="halfcheetah", env_id="HalfCheetah-v5", envpool_id="HalfCheetah-v5", network="mlp",
        make_env=functools.partial(gymnasium.make, "HalfCheetah-v5"),
        make_envpool=functools.partial(_envpool_mujoco, "HalfCheetah-v5")),
}
