"""Joining or starting Ray, placing one inference server per node, and ending actors for sure.

A fleet that starts Ray itself starts a local instance for this machine only: no dashboard, and
its logical CPUs sized for the fleet. With an address it joins that cluster; inside a program that
initialised Ray already it uses that instance and leaves it running.
"""
from __future__ import annotations

import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rlbatch.distributed.server import InferenceServer

__all__ = ["connect", "end_actors", "start_servers"]

_GRACE = 3.0  # seconds processes get to close their pools before they are killed


def connect(address: str | None, num_cpus: int) -> bool:
    """Joins Ray (the initialised instance, or the cluster at `address`) or starts a local one;
    True if this call started or joined it, so that the caller shuts it down."""
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    return True


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
    pings = [a.__ray_ready__.remote() for a in actors]
    done, pending = ray.wait(pings, num_returns=len(pings), timeout=left())
    for ref in done:
        try:
            ray.get(ref)
            return False  # still answering
        except ray.exceptions.RayActorError:
            pass
    return not pending
