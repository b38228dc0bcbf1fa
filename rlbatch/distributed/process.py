"""One actor process of a fleet: an ActorPool and its inference, run as a Ray actor.

`ActorProcess` is a plain class; the fleet runs it with `ray.remote` (the class and its
`ProcessConfig`, environment factories and policy function included, reach the process by Ray's
pickling: that is the user's own code on the user's cluster). Process i plays
`num_actors * envs_per_actor` environments; its actors and environments are numbered after those
of processes 0..i-1, so actor ids, environment seeds and episode ids are unique across the fleet.

Inference runs either here (placement "local": a PolicyService of its own) or on the node's
`InferenceServer` (placement "server": the pool's requests go out as one remote call per local
batch, see rlbatch.distributed.server).

Versions: the process's PolicyService counts its own versions from 0 and gets only some of the
fleet's (the newest when it asks, the constructor's after a restart), so `VersionMap` turns its
versions into the fleet's before a trajectory leaves the process: the Trainer's lag tracking sees
fleet versions only.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from rlbatch.actors.pool import ActorPool
from rlbatch.affinity import pin_threads, thread_cpus
from rlbatch.cpu_runtime import configure_cpu_jax
from rlbatch.actors.trajectory import Trajectory, stack_trajectories
from rlbatch.distributed.records import ProcessReport
from rlbatch.errors import PoolStopped
from rlbatch.policy.service import PolicyService

__all__ = ["ActorProcess", "ProcessConfig", "VersionMap"]

_RECENT_ERRORS = 4


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
    """Everything a process needs to build its pool and its policy (see ActorFleet for each)."""

    env_fn: Any
    vector_env_fn: Callable | None
    apply_fn: Callable
    example_obs: Any
    example_state: Any
    num_actors: int
    unroll_length: int
    envs_per_actor: int
    async_batch_size: int | None
    seed: int
    group_size: int
    placement: str
    buckets: tuple
    max_delay: float
    recent_episodes: int  # the window of each pool's recent return
    pin_python: bool  # process i confines its Python threads to one CPU (see confine_process)
    sync_cpu_dispatch: bool  # a CPU-only JAX runs the policy in the calling thread
    policy_options: tuple  # (name, value) pairs for PolicyService
    pool_options: tuple  # (name, value) pairs for ActorPool
    jax_options: tuple = ()  # (name, value) pairs for jax.config.update, before anything compiles

    @property
    def envs_per_process(self) -> int:
        return self.num_actors * self.envs_per_actor

    @property
    def width(self) -> int:
        """Columns of one trajectory of the pool."""
        return self.async_batch_size or self.envs_per_actor


class VersionMap:
    """A PolicyService's own parameter versions mapped to the fleet's.

    `update` publishes fleet version v to the service only if v is newer than every version it has
    had, and records the service version it became, under one lock that `to_fleet` also takes: a
    trajectory cannot carry a service version whose fleet version is not recorded yet.
    """

    def __init__(self, service: PolicyService, fleet_version: int):
        self._service = service
        self._lock = threading.Lock()
        self._fleet = np.full(16, -1, np.int64)  # index: the service's version
        self._fleet[service.version] = fleet_version
        self.latest = fleet_version

    def update(self, fleet_version: int, params: Any) -> bool:
        """True if the service now runs `params` as `fleet_version`; False for a version not newer
        than the one it has (ParamsMismatch if the parameters do not fit)."""
        with self._lock:
            if fleet_version <= self.latest:
                return False
            local = self._service.update_params(params)
            if local >= len(self._fleet):
                self._fleet = np.concatenate([self._fleet, np.full(len(self._fleet), -1, np.int64)])
            self._fleet[local] = fleet_version
            self.latest = fleet_version
            return True

    def to_fleet(self, versions: np.ndarray) -> np.ndarray:
        with self._lock:
            return self._fleet[versions]


def confine_process(index: int, config: ProcessConfig) -> str | None:
    """Applies the config's JAX and CPU settings to this process before it compiles anything or
    starts any thread of its own; with `sync_cpu_dispatch`, returns `configure_cpu_jax`'s line (what
    it did, or that JAX had already started and nothing changed).

    `jax_options`: `jax.config.update(name, value)` for each pair, e.g. the driver's persistent
    compilation cache (`jax_compilation_cache_dir`), so that a process started again, or the next
    run's, loads its policy's buckets instead of compiling them.

    `sync_cpu_dispatch`: JAX's CPU backend runs each computation in the thread that calls it, all of
    it, instead of handing it to XLA's worker threads (`rlbatch.configure_cpu_jax`; nothing changes
    in a process where JAX had already started). `pin_python`:
    JAX starts first, so XLA's thread pools keep every CPU; then this thread, and every thread it
    starts afterwards (the PolicyService's and the actors'), is confined to one CPU, process i to
    the i-th of the CPUs it may use (modulo their count). Together they give each process a core of
    its own for its Python work and its policy: on a node with as many CPUs as processes, processes
    no longer take cores from one another, nor threads of one process (who share one GIL) hand the
    GIL across cores.
    """
    for name, value in config.jax_options:
        jax.config.update(name, value)
    runtime = configure_cpu_jax() if config.sync_cpu_dispatch else None
    if config.pin_python and hasattr(os, "sched_setaffinity"):
        jax.devices()
        cpus = sorted(thread_cpus())
        pin_threads({cpus[index % len(cpus)]})
    return runtime


class ActorProcess:
    """An ActorPool shipping stacked groups of trajectories (run as a Ray actor by ActorFleet).

    Args:
      index: the process's place in the fleet (0..N-1).
      config: the ProcessConfig shared by every process.
      params, fleet_version: the parameters to start with and their fleet version (after a
        restart, the same ones again: the fleet then sends the newest).
      servers: placement "server": node id -> InferenceServer handle; the process uses its own
        node's (or, on a node without one, the first).
    """

    def __init__(self, index: int, config: ProcessConfig, params: Any, fleet_version: int, servers=None):
        import ray  # in the process: the fleet's module already needed it

        self.index = index
        self._config = config
        self._node_id = ray.get_runtime_context().get_node_id()
        self._token = (self._node_id, os.getpid())
        self._versions = None
        self._cpu_runtime = confine_process(index, config)
        self._python_cpus = sorted(thread_cpus())  # what this process's own threads inherit
        if config.placement == "local":
            self._policy = PolicyService(config.apply_fn, params, example_obs=config.example_obs,
                                         example_state=config.example_state, buckets=config.buckets,
                                         max_delay=config.max_delay, seed=config.seed + index,
                                         name=f"policy-p{index}", **dict(config.policy_options))
            self._versions = VersionMap(self._policy, fleet_version)
        else:
            from rlbatch.distributed.server import ServerPolicy

            server = servers.get(self._node_id) or next(iter(servers.values()))
            self._policy = ServerPolicy(server, index, config.example_obs, config.buckets, config.max_delay)
        n = config.envs_per_process
        self._actor_offset = index * config.num_actors
        self._episode_offset = np.int64(index * n) << np.int64(32)  # the env index sits in the high bits
        self._pool = ActorPool(config.env_fn, self._policy, config.num_actors, config.unroll_length,
                               envs_per_actor=config.envs_per_actor, seed=config.seed + index * n,
                               name=f"p{index}-actor", vector_env_fn=config.vector_env_fn,
                               async_batch_size=config.async_batch_size, recent_episodes=config.recent_episodes,
                               **dict(config.pool_options))
        self._closing = False
        self._pool.start()

    def info(self) -> dict:
        """Where this incarnation runs: {"index", "node_id", "pid", "python_cpus" (the CPUs its pool's
        and policy's threads may use), "cpu_runtime" (what `sync_cpu_dispatch` did, None without it)}."""
        return {"index": self.index, "node_id": self._node_id, "pid": os.getpid(), "python_cpus": self._python_cpus,
                "cpu_runtime": self._cpu_runtime}

    def next_group(self) -> tuple[Trajectory, ProcessReport]:
        """The next `group_size` finished trajectories stacked [T, g * w, ...] with fleet versions,
        fleet-wide actor and episode ids and the policy's observation dtypes, and this process's
        report. Blocks until they are finished; PoolStopped if the pool stopped (None if `close`
        stopped it)."""
        try:
            trajectories = [self._pool.get() for _ in range(self._config.group_size)]
        except PoolStopped:
            if self._closing:
                return None  # the fleet is stopping: nothing to report
            raise
        group = stack_trajectories(trajectories)
        example = self._config.example_obs
        cast = lambda x, e: x if x.dtype == np.asarray(e).dtype else x.astype(np.asarray(e).dtype)  # noqa: E731
        versions = group.policy_version if self._versions is None else self._versions.to_fleet(group.policy_version)
        group = group._replace(obs=jax.tree_util.tree_map(cast, group.obs, example),
                               final_obs=jax.tree_util.tree_map(cast, group.final_obs, example),
                               policy_version=versions, actor_id=group.actor_id + self._actor_offset,
                               episode_id=group.episode_id + self._episode_offset)
        return group, self.report()

    def report(self) -> ProcessReport:
        """This incarnation's counters (what it costs does not grow with the episodes played)."""
        stats = self._pool.stats
        errors = tuple(f"actor {f.actor_id + self._actor_offset}, {f.where}: {f.error}"
                       for f in stats.recent_errors[-_RECENT_ERRORS:])
        return ProcessReport(token=self._token, env_steps=stats.env_steps, elapsed=stats.elapsed,
                             trajectories=stats.trajectories, episodes=stats.episodes,
                             recent_return_mean=stats.recent_return_mean,
                             recent_length_mean=stats.recent_length_mean,
                             recent_count=min(stats.episodes, self._config.recent_episodes),
                             env_errors=stats.env_errors, policy_errors=stats.policy_errors,
                             dropped_on_error=stats.dropped_on_error, actors_running=stats.actors_running,
                             recent_errors=errors)

    def set_params(self, fleet_version: int, params: Any) -> int:
        """Runs `params` as `fleet_version` from the next batch on, unless the process already has
        a newer one; returns the version it has. The actors keep playing meanwhile (PolicyService
        publishes the parameters only once they are on the device)."""
        if self._versions is not None:
            self._versions.update(fleet_version, params)
            return self._versions.latest
        return fleet_version  # placement "server": the server holds the parameters

    def close(self, timeout: float = 5.0) -> bool:
        """Stops the pool (its environments closed, its threads joined) and the policy."""
        t0 = time.monotonic()
        self._closing = True
        stopped = self._pool.stop(timeout)
        self._policy.close(wait=stopped and time.monotonic() - t0 < timeout)
        return stopped
