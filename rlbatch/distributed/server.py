"""Placement "server": one inference server per node, batching the requests of every actor process.

    actor threads ─▶ ServerPolicy (BatchedService in the process) ─one Ray call per batch─▶
        InferenceServer (PolicyService on the node's device: batched again across processes)

An actor process's threads are batched in the process by a BatchedService whose batch function is
one Ray call to its node's `InferenceServer` carrying the whole local batch (never one call per
thread or per environment step). The server's PolicyService batches the requests of the processes
again: each process is a registered caller there, so a server batch goes as soon as every attached
process has a request waiting (or at `max_delay`).

The cost that decides between the placements: one Ray call round trip (an actor method taking a
CartPole batch of 4 float32 rows and returning actions and extras) takes 0.93 ms median (p10
0.87 ms, p90 1.18 ms) on the 2-core development VM (ray 2.60, 1000 calls after 200 warm-up, one
caller; 0.5 ms is the figure published for faster machines). A process pays about that per step
of its pool on top of inference, so the server placement pays off where one device shared by many
processes is worth that latency (GPU nodes, big networks), not for small MLPs on CPUs.
"""
from __future__ import annotations

import threading
from typing import Any

import jax
import numpy as np

from rlbatch.batching.service import BatchedService
from rlbatch.distributed.process import VersionMap
from rlbatch.errors import InvalidRequest
from rlbatch.policy.collate import ObservationCollator
from rlbatch.policy.service import PolicyCaller, PolicyService

__all__ = ["InferenceServer", "ServerPolicy"]


class InferenceServer:
    """A node's PolicyService, called by the node's actor processes (run as a Ray actor).

    Args:
      config: the fleet's ProcessConfig (policy function, example observation, max_delay,
        policy_options); `buckets`: the server's own bucket sizes (rows of all processes together).
      params, fleet_version: the parameters to start with and their fleet version.
    """

    def __init__(self, config, buckets: tuple, params: Any, fleet_version: int):
        import ray

        self._policy = PolicyService(config.apply_fn, params, example_obs=config.example_obs, buckets=buckets,
                                     max_delay=config.max_delay, seed=config.seed, implicit_callers=False,
                                     name="inference-server", **dict(config.policy_options))
        self._versions = VersionMap(self._policy, fleet_version)
        self._callers: dict[int, PolicyCaller] = {}
        self._lock = threading.Lock()
        self.node_id = ray.get_runtime_context().get_node_id()

    def ready(self) -> str:
        """The node id, once the policy is compiled."""
        return self.node_id

    def attach(self, process: int) -> None:
        """Registers `process` as a caller (a restarted process replaces its old registration)."""
        with self._lock:
            old = self._callers.pop(process, None)
            self._callers[process] = self._policy.register()
        if old is not None:
            old.close()

    def infer(self, process: int, obs: np.ndarray):
        """(action, extras, fleet version) for `obs` [n, ...], one request of n rows from `process`."""
        caller = self._callers.get(process)
        if caller is None:
            self.attach(process)
            caller = self._callers[process]
        out = caller(obs)
        return out.action, out.extras, int(self._versions.to_fleet(np.int64(out.version)))

    def set_params(self, fleet_version: int, params: Any) -> int:
        self._versions.update(fleet_version, params)
        return self._versions.latest

    def stats(self) -> dict:
        return dict(self._policy.stats.__dict__)

    def close(self) -> None:
        with self._lock:
            callers, self._callers = list(self._callers.values()), {}
        for c in callers:
            c.close()
        self._policy.close()


class ServerPolicy:
    """What an ActorPool in a process plays with under placement "server": a BatchedService in
    the process whose batch function sends the batch (its valid rows only) to the server in one
    call. It offers what ActorPool uses of a PolicyService: `register()`, calls, `example_obs`,
    `example_state` (None: feed-forward only), `service`, `close()`."""

    example_state = None

    def __init__(self, server, process: int, example_obs: Any, buckets: tuple, max_delay: float):
        import ray

        self._ray_get = ray.get
        self._server = server
        self._process = process
        self._ray_get(server.attach.remote(process))
        self._example_obs = jax.tree_util.tree_map(np.asarray, example_obs)
        self._collator = ObservationCollator(self._batch, tuple(sorted(buckets)), self._example_obs, None,
                                             check_finite=False)
        # One call to the server at a time: the process is one registered caller there.
        self._service = BatchedService(self._batch, max_delay=max_delay, max_batch_size=max(buckets),
                                       max_in_flight=1, collator=self._collator, name=f"server-client-p{process}")

    def _batch(self, obs, num_valid):
        action, extras, version = self._ray_get(self._server.infer.remote(self._process, obs[:num_valid]))
        return (action, extras), version

    @property
    def example_obs(self):
        return self._example_obs

    @property
    def service(self) -> BatchedService:
        return self._service

    def __call__(self, obs, state=None, *, timeout: float | None = None, caller=None):
        try:
            args, rows = self._collator.request(obs, state)
        except InvalidRequest:
            self._service.record_invalid()
            raise
        return self._service.call_request(args, {}, rows=rows, timeout=timeout, caller=caller)

    def submit(self, obs, state=None, *, timeout: float | None = None, priority: int = 0, caller=None):
        args, rows = self._collator.request(obs, state)
        return self._service.submit_request(args, {}, rows=rows, priority=priority, timeout=timeout, caller=caller)

    def register(self) -> PolicyCaller:
        return PolicyCaller(self, self._service.register(), self._collator.fast_spec)

    def close(self, wait: bool = True, *, cancel_pending: bool = False) -> None:
        self._service.close(wait, cancel_pending=cancel_pending)
