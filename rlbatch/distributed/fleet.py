"""ActorFleet: N actor processes (Ray actors), each an ActorPool, feeding one Trainer.

    fleet = ActorFleet("CartPole-v1", learner.policy.apply, learner.params(state),
                       example_obs=np.zeros(4, np.float32), num_processes=2, num_actors=64,
                       unroll_length=32, group_size=4)
    report = rlbatch.Trainer(learner, fleet, fleet, state=state, batch_size=16).run(total_steps=10**6)

The fleet is both the Trainer's trajectory source (`start`, `started`, `get`, `stop`, `stats`)
and the sink it publishes to (`update_params`, `version`, `params`, `close`).

Trajectories: each process ships its trajectories in stacked groups of `group_size`, one object
in Ray's object store per group; the fleet keeps `fetches_per_process` calls outstanding per
process and waits on all of them at once (`ray.wait`, in `get`, on the caller's thread: no thread
of its own, nothing polls). A group is checked against the shapes the policy implies
(rlbatch.distributed.spec) and refused, naming its process, if it differs; `get` hands out its
trajectories one at a time, as an ActorPool does, each with the fleet version of the parameters
behind every step.

Parameters: `update_params` puts each version into the object store once (`ray.put`) and sends
its reference to every process; a process gets one update at a time and never a version older
than one it has (a slow process skips to the newest).

Faults: a process that dies (SIGKILL, a lost node) is restarted by Ray up to `max_restarts`
times; the fleet counts the restart and the trajectories lost with it, sends the new incarnation
the newest parameters, and goes on. A process whose pool stops for good (an environment that can
never fit the policy) stops the fleet: `get` raises PoolStopped naming it. `stop()` closes every
pool, kills every process and server, waits until Ray reports them dead, and shuts Ray down if
the fleet started it.

Network: a fleet that starts Ray itself starts a local instance with no dashboard; with
`address=` it joins that cluster, and inside an initialised Ray it uses that one.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import ray

from rlbatch.actors.lifecycle import StartStopContext
from rlbatch.distributed.calls import FleetCalls, tree_nbytes
from rlbatch.distributed.cluster import connect, end_actors, start_servers, wait_exited
from rlbatch.distributed.process import ActorProcess, ProcessConfig
from rlbatch.distributed.records import FleetStats, ProcessReport, recent_means
from rlbatch.distributed.spec import GroupSpec
from rlbatch.errors import ParamsMismatch, PoolStopped
from rlbatch.policy.collate import leaf_specs
from rlbatch.policy.service import DEFAULT_BUCKETS

__all__ = ["ActorFleet", "PLACEMENTS"]

PLACEMENTS = ("local", "server")
_clock = time.perf_counter


class ActorFleet(StartStopContext):
    """N Ray actor processes, each an ActorPool with its own inference or its node's server.

    Args:
      env_fn, vector_env_fn, num_actors, unroll_length, envs_per_actor, async_batch_size: each
        process's ActorPool, as ActorPool takes them (num_actors is per process).
      apply_fn, params, example_obs, example_state, buckets, max_delay: the policy, as
        PolicyService takes them; `params` is version 0 of the fleet.
      num_processes: N actor processes.
      seed: process i seeds its environments from seed + i * num_actors * envs_per_actor and its
        policy's key schedule from seed + i.
      group_size: g trajectories per object shipped.
      fetches_per_process: groups requested ahead from each process.
      placement: "local" (a PolicyService in every process) or "server" (one InferenceServer per
        node; feed-forward policies only).
      server_buckets: the server's bucket sizes (default: powers of two up to every process's
        environments together, at most 1024).
      policy_options, pool_options: more keyword arguments for PolicyService and ActorPool.
      max_restarts: how often Ray restarts a process that died.
      address: a Ray cluster to join (None: start a local Ray, or use the one already initialised).
      num_cpus: the local Ray's logical CPUs (default: enough for the fleet, at least os.cpu_count()).
      process_cpus, server_cpus, server_gpus: Ray resources of each process and each server.
      runtime_env: Ray's runtime_env for the processes and servers (e.g. env_vars).
      recent_episodes: each process's window of recent episodes; `stats.recent_return_mean` is
        the mean over every process's window together.
      pin_python, sync_cpu_dispatch: each process confines its Python threads to one CPU of its
        node (process i to the i-th, modulo the node's CPUs) after JAX starts, and, on a CPU-only
        JAX, runs its policy's computations in the calling thread (see `confine_process`). Both
        on suit a node with about one CPU per process and a small policy (CartPole on 2 CPUs:
        measured in experiments.bench_fleet); leave them off for policies that want every core.
      jax_options: `jax.config.update` settings every process applies before it compiles, e.g.
        {"jax_compilation_cache_dir": path} to share the driver's persistent compilation cache.
      process_class: the class each process runs: ActorProcess, or a subclass that changes what a
        process does (its constructor and methods keep ActorProcess's signatures).
    """

    def __init__(self, env_fn, apply_fn: Callable, params: Any, *, example_obs: Any, num_processes: int,
                 num_actors: int, unroll_length: int, envs_per_actor: int = 1, vector_env_fn=None,
                 async_batch_size: int | None = None, example_state: Any = None, seed: int = 0,
                 group_size: int = 4, fetches_per_process: int = 2, placement: str = "local",
                 buckets=DEFAULT_BUCKETS, server_buckets=None, max_delay: float = 0.002,
                 policy_options: Mapping | None = None, pool_options: Mapping | None = None,
                 max_restarts: int = 3, address: str | None = None, num_cpus: int | None = None,
                 process_cpus: float = 1, server_cpus: float = 1, server_gpus: float = 0,
                 runtime_env: dict | None = None, recent_episodes: int = 100, pin_python: bool = False,
                 sync_cpu_dispatch: bool = False, jax_options: Mapping | None = None,
                 process_class: type = ActorProcess):
        for key, value in (("num_processes", num_processes), ("num_actors", num_actors),
                           ("unroll_length", unroll_length), ("envs_per_actor", envs_per_actor),
                           ("group_size", group_size), ("fetches_per_process", fetches_per_process)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ActorFleet: {key} must be a positive int, got {value!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f'ActorFleet: placement must be "local" or "server", got {placement!r}')
        if placement == "server" and example_state is not None:
            raise ValueError("ActorFleet: placement \"server\" serves feed-forward policies only, got example_state")
        if not (isinstance(process_class, type) and issubclass(process_class, ActorProcess)):
            raise TypeError(f"ActorFleet: process_class must be ActorProcess or a subclass, got {process_class!r}")
        if not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"ActorFleet: max_restarts must be an int >= 0, got {max_restarts!r}")
        self.config = ProcessConfig(
            env_fn=env_fn, vector_env_fn=vector_env_fn, apply_fn=apply_fn, example_obs=example_obs,
            example_state=example_state, num_actors=num_actors, unroll_length=unroll_length,
            envs_per_actor=envs_per_actor, async_batch_size=async_batch_size, seed=seed, group_size=group_size,
            placement=placement, buckets=tuple(buckets), max_delay=max_delay, recent_episodes=recent_episodes,
            pin_python=bool(pin_python), sync_cpu_dispatch=bool(sync_cpu_dispatch),
            jax_options=tuple(dict(jax_options or {}).items()),
            policy_options=tuple(dict(policy_options or {}).items()),
            pool_options=tuple(dict(pool_options or {}).items()))
        self.num_processes = num_processes
        self.placement = placement
        self.fetches_per_process = fetches_per_process
        self.max_restarts = max_restarts
        rows = num_processes * self.config.envs_per_process
        self.server_buckets = tuple(server_buckets) if server_buckets is not None else tuple(
            2 ** i for i in range(3, 11) if 2 ** (i - 1) < min(rows, 1024))
        self._address, self._num_cpus = address, num_cpus
        self._process_cpus, self._server_cpus, self._server_gpus = process_cpus, server_cpus, server_gpus
        self._runtime_env = runtime_env
        self._process_class = process_class
        self.spec = GroupSpec(apply_fn, params, example_obs, unroll_length=unroll_length, width=self.config.width,
                              group_size=group_size, example_state=example_state)
        self._params = jax.device_get(params)
        self._param_specs = leaf_specs(self._params)
        self._param_treedef = jax.tree_util.tree_structure(self._params)
        self._version = 0
        self._start_ref = None
        self._param_bytes = 0
        # `_lock` guards `_calls` and the fields below; `_consume_lock` admits one caller into get().
        self._lock = threading.Lock()
        self._consume_lock = threading.Lock()
        self._calls = FleetCalls(self.config, self.spec, num_processes, max_restarts)
        self._processes: list = []
        self._servers: dict = {}
        self._started = self._stopped = False
        self._owns_ray = False
        self._start_time = self._stop_time = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "ActorFleet":
        """Starts Ray if needed, the servers (placement "server") and the N processes."""
        with self._lock:
            if self._started:
                raise RuntimeError("ActorFleet.start: already started")
            self._started = True
        need = self.num_processes * self._process_cpus + (self._server_cpus if self.placement == "server" else 0)
        self._owns_ray = connect(self._address, self._num_cpus or max(os.cpu_count() or 1, int(np.ceil(need))))
        self._start_time = _clock()
        # Held for the fleet's life: Ray restarts a process with its constructor's arguments.
        self._start_ref = ref = self._put_latest()
        self._calls.start_version = self._version
        options = {} if self._runtime_env is None else {"runtime_env": self._runtime_env}
        if self.placement == "server":
            self._servers = start_servers(self.config, self.server_buckets, ref, self._version,
                                          num_cpus=self._server_cpus, num_gpus=self._server_gpus,
                                          max_concurrency=self.num_processes + 4, options=options)
        remote = ray.remote(self._process_class).options(
            num_cpus=self._process_cpus, max_restarts=self.max_restarts, max_task_retries=0,
            max_concurrency=self.fetches_per_process + 4, scheduling_strategy="SPREAD", **options)
        with self._lock:
            self._processes = [remote.remote(i, self.config, ref, self._version, self._servers or None)
                               for i in range(self.num_processes)]
            self._calls.attach(self._processes, self._servers, self.fetches_per_process)
        return self

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Closes every pool, kills every process and server, and waits (up to `timeout` s) until
        Ray reports them dead and those on this machine have exited; shuts Ray down if the fleet
        started it. True if all that finished in time (else `errors` says what did not). Safe to
        call more than once."""
        calls = self._calls
        with self._lock:
            if self._stopped or not self._started:
                self._stopped = calls.stopping = True
                return True
            if not calls.stopping:
                calls.halt("the fleet was stopped")
            actors = list(self._processes) + list(self._servers.values())
            tokens = [r.current_token for r in calls.records if r.current_token is not None]
        end = None if timeout is None else time.monotonic() + timeout
        infos = [p.info.remote() for p in self._processes]  # where each one runs, before it goes
        closing = [p.close.remote(1.0) for p in self._processes] + [s.close.remote() for s in self._servers.values()]
        problems = []
        if not end_actors(actors, infos + closing, timeout):
            problems.append("Ray did not report every process and server dead")
        for ref in infos:
            try:
                info = ray.get(ref, timeout=0)
                tokens.append((info["node_id"], info["pid"]))
            except ray.exceptions.RayError:
                pass  # it died before answering (its last report's token is there)
        # Those on this machine: until their worker processes have exited, not only until Ray
        # reports them dead. (Ray's own reaping covers the other machines.)
        here = {n["NodeID"] for n in ray.nodes() if n.get("NodeManagerAddress") == ray.util.get_node_ip_address()}
        left = None if end is None else max(0.0, end - time.monotonic())
        if not wait_exited(sorted({pid for node, pid in tokens if node in here}), left):
            problems.append("worker processes of this machine were still running")
        left = None if end is None else max(0.0, end - time.monotonic())
        if self._consume_lock.acquire(timeout=-1 if left is None else left):
            self._consume_lock.release()
        else:
            problems.append("a get() call was still waiting")
        with self._lock:
            for problem in problems:
                calls.fault(None, "stop", f"stop(timeout={timeout}): {problem}")
            calls.clear()
            self._stopped = True
            self._stop_time = _clock()
        if self._owns_ray:
            ray.shutdown()
        return not problems

    def close(self) -> None:
        """`stop()` under PolicySink's name."""
        self.stop()

    @property
    def started(self) -> bool:
        return self._started

    @property
    def running(self) -> bool:
        return self._started and not self._calls.stopping

    # ------------------------------------------------------------------ calls to processes (under _lock)

    def _put_latest(self):
        ref = ray.put(self._params)
        self._param_bytes += tree_nbytes(self._params)
        self._calls.publish(self._version, ref)
        return ref

    # ------------------------------------------------------------------ consuming

    def get(self, timeout: float | None = None):
        """The next trajectory (as the ActorPool in its process made it, with fleet versions).

        TimeoutError after `timeout` s; PoolStopped once the fleet is stopped (or every process
        is gone for good) and the trajectories received are handed out."""
        end = None if timeout is None else time.monotonic() + timeout
        calls = self._calls
        with self._consume_lock:
            while True:
                with self._lock:
                    if calls.ready:
                        return calls.ready.popleft()
                    if calls.stopping:
                        raise PoolStopped(calls.stop_reason)
                    refs, fetching = calls.refs()
                if not fetching:
                    raise PoolStopped(f"every process of the fleet has died more than max_restarts="
                                      f"{self.max_restarts} times; last fault: "
                                      f"{calls.faults[-1].error if calls.faults else None}")
                wait = None if end is None else max(0.0, end - time.monotonic())
                ready, _ = ray.wait(refs, num_returns=1, timeout=wait)
                if not ready:
                    raise TimeoutError(f"ActorFleet.get: no trajectory within {timeout} s")
                with self._lock:
                    calls.handle(ready[0])

    # ------------------------------------------------------------------ parameters (PolicySink)

    def update_params(self, params: Any) -> int:
        """Publishes `params` to every process (one copy in the object store); returns their
        version. ParamsMismatch if they do not have the structure, shapes and dtypes of the first."""
        treedef = jax.tree_util.tree_structure(params)
        if treedef != self._param_treedef:
            raise ParamsMismatch(f"ActorFleet.update_params: expected a parameter tree of structure "
                                 f"{self._param_treedef}, got {treedef}; the old parameters stay in use")
        host = jax.device_get(params)
        for (path, shape, dtype), (_, got_shape, got_dtype) in zip(self._param_specs, leaf_specs(host)):
            if shape != got_shape or dtype != got_dtype:
                raise ParamsMismatch(f"ActorFleet.update_params: parameter {path} expected {dtype}{list(shape)}, "
                                     f"got {got_dtype}{list(got_shape)}; the old parameters stay in use")
        with self._lock:
            self._params = host
            self._version += 1
            if self._started and not self._calls.stopping:
                self._put_latest()
            return self._version

    @property
    def version(self) -> int:
        return self._version

    @property
    def params(self):
        return self._params

    # ------------------------------------------------------------------ stats

    def process_info(self, timeout: float = 30.0) -> list[dict]:
        """{"index", "node_id", "pid"} of every process's current incarnation (asks each one)."""
        return ray.get([p.info.remote() for p in self._processes], timeout=timeout)

    def refresh_stats(self, timeout: float = 30.0) -> FleetStats:
        """Asks every live process for its report now (stats otherwise come with each group);
        returns the stats. A process that does not answer within `timeout` s keeps its last report."""
        with self._lock:
            asked = {p.report.remote(): i for i, p in enumerate(self._processes)
                     if not self._calls.records[i].given_up and not self._calls.stopping}
        if not asked:
            return self.stats
        done, _ = ray.wait(list(asked), num_returns=len(asked), timeout=timeout)
        for ref in done:
            try:
                report = ray.get(ref)
            except ray.exceptions.RayError:
                continue  # a dead process: the calls that fetch its groups count the death
            if type(report) is not ProcessReport:
                continue
            with self._lock:
                self._calls.take_report(asked[ref], report, 0)
        return self.stats

    @property
    def errors(self) -> list:
        """The fleet's most recent FleetFaults (up to 64), oldest first."""
        with self._lock:
            return list(self._calls.faults)

    @property
    def stats(self) -> FleetStats:
        calls = self._calls
        with self._lock:
            alive = self._started and not self._stopped
            procs = tuple(r.stats(alive) for r in calls.records)
            now = _clock() if self._stop_time is None else self._stop_time
            elapsed = 0.0 if self._start_time is None else now - self._start_time
            steps = sum(p.env_steps for p in procs)
            ret, length = recent_means([r.current_report for r in calls.records])
            return FleetStats(
                num_processes=self.num_processes, processes_alive=sum(p.alive for p in procs), env_steps=steps,
                elapsed=elapsed, steps_per_sec=steps / elapsed if elapsed > 0 else 0.0,
                episodes=sum(p.episodes for p in procs), recent_return_mean=ret, recent_length_mean=length,
                trajectories=sum(p.trajectories for p in procs),
                trajectories_lost=sum(p.trajectories_lost for p in procs),
                trajectories_refused=sum(p.trajectories_refused for p in procs),
                restarts=sum(p.restarts for p in procs), params_version=self._version,
                trajectory_bytes=calls.trajectory_bytes, param_bytes=self._param_bytes, processes=procs)
