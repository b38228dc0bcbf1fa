"""Joining or starting Ray, placing one inference server per node, and ending actors for sure.

A fleet that starts Ray itself starts a local instance for this machine only: no dashboard, its
logical CPUs sized for the fleet, and every Ray server (GCS, raylet, workers) listening on
127.0.0.1 only. On Linux Ray takes the machine's outward address as the node's and listens on every
interface, and resolves a node address of 127.0.0.1 back to the outward one; only its
single-machine mode (what it runs on macOS and Windows, switched by RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
and read from ray._private.ray_constants) keeps it on the loopback address. `local_only()` turns
that mode on around `ray.init` and restores it afterwards, so that a later `ray.init(address=...)`
in the same program joins a real cluster normally; tests check what listens (ray 2.60).

With an address the fleet joins that cluster; inside a program that initialised Ray already it
uses that instance and leaves it running.
"""
from __future__ import annotations

import contextlib
import os
import select
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlbatch.distributed.server import InferenceServer

__all__ = ["connect", "end_actors", "local_only", "start_servers", "wait_exited"]

_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_GRACE = 3.0  # seconds processes get to close their pools before they are killed


def connect(address: str | None, num_cpus: int) -> bool:
    """Joins Ray (the initialised instance, or the cluster at `address`) or starts a local one;
    True if this call started or joined it, so that the caller shuts it down."""
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address)
    else:
        with local_only():
            ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


@contextlib.contextmanager
def local_only():
    """Ray instances started inside (`ray.init()`, `ray.cluster_utils.Cluster`) listen on
    127.0.0.1 only; see the module docstring."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_SINGLE_MACHINE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE_ENV] = "0"  # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, which read the variable at import
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_SINGLE_MACHINE_ENV] = saved_env


def start_servers(config, buckets: tuple, params_ref, version: int, *, num_cpus: float, num_gpus: float,
                  max_concurrency: int, options: dict) -> dict:
    """One InferenceServer on every live node (node id -> handle), compiled before this returns
    (a server that fails to build raises here)."""
    remote = ray.remote(InferenceServer)
    servers = {}
    for node in [n["NodeID"] for n in ray.nodes() if n.get("Alive")]:
        servers[node] = remote.options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=max_concurrency,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False), **options,
        ).remote(config, buckets, params_ref, version)
    ray.get([s.ready.remote() for s in servers.values()])
    return servers


def end_actors(actors: list, closing: list, timeout: float | None) -> bool:
    """Waits up to a few seconds for the `closing` calls (graceful: pools close their
    environments), kills every actor without restart, then waits until a call to each fails
    because it is dead (Ray marks an actor dead once its worker process has exited). True if all
    that happened within `timeout` s."""
    end = None if timeout is None else time.monotonic() + timeout
    left = lambda: None if end is None else max(0.0, end - time.monotonic())  # noqa: E731
    if closing:
        ray.wait(closing, num_returns=len(closing), timeout=_GRACE if end is None else min(_GRACE, left()))
    for actor in actors:
        ray.kill(actor, no_restart=True)
    # ray.kill only asks: a call made just after it may still be answered. Each actor is asked
    # again until a call fails because it is dead.
    pings = {a.__ray_ready__.remote(): a for a in actors}
    while pings:
        done, _ = ray.wait(list(pings), num_returns=1, timeout=left())
        if not done:
            return False
        actor = pings.pop(done[0])
        try:
            ray.get(done[0])
            pings[actor.__ray_ready__.remote()] = actor  # answered: not dead yet
        except ray.exceptions.RayActorError:
            pass
    return True


def wait_exited(pids: list[int], timeout: float | None) -> bool:
    """Waits until the processes `pids` of this machine have exited (Ray marks a killed actor dead
    a moment before its worker process is gone); True if they all did within `timeout` s.

    Blocks on a pidfd per process (Linux 5.3+, which works for processes that are not children);
    elsewhere it falls back to psutil.wait_procs.
    """
    end = None if timeout is None else time.monotonic() + timeout
    if not hasattr(os, "pidfd_open"):
        import psutil

        procs = []
        for pid in pids:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                pass
        return not psutil.wait_procs(procs, timeout=timeout)[1]
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            pass  # already gone
    try:
        while fds:
            left = None if end is None else max(0.0, end - time.monotonic())
            ready, _, _ = select.select(fds, [], [], left)
            if not ready:
                return False
            for fd in ready:
                fds.remove(fd)
                os.close(fd)
        return True
    finally:
        for fd in fds:
            os.close(fd)
