"""The calls an ActorFleet has out to its processes and servers, and what each answer changes.

Three kinds of call are out at any time, each an ObjectRef the fleet waits on with `ray.wait`:
`next_group` (`fetches_per_process` per process: a group of trajectories and a report), `info`
(which incarnation of a process runs: asked at start and whenever a call finds the process
unavailable) and `set_params` (at most one per parameter target, see ParamLink). `handle(ref)`
takes one answer: a group is checked (GroupSpec) and its trajectories queued in `ready`, a report
updates the process's record, a failure is sorted into "restarting" (ActorUnavailableError, or a
group lost with its node: call again, Ray holds the call until the process is up), "dead for
good" (ActorDiedError) and "the process's own code raised" (RayTaskError: the fleet halts).

Not thread-safe: the fleet calls it under its own lock. Ray is only asked to send calls and give
answers that are ready; nothing here blocks.
"""
from __future__ import annotations

import collections
import time

import jax
import numpy as np
import ray

from rlbatch.distributed.records import FleetFault, ParamLink, ProcessRecord
from rlbatch.distributed.spec import GroupSpec, TrajectoryRefused, split_group
from rlbatch.errors import PoolStopped

__all__ = ["FleetCalls", "tree_nbytes"]

_KEEP_FAULTS = 64


def tree_nbytes(tree) -> int:
    """Bytes of the arrays of a pytree."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


class FleetCalls:
    """The outstanding calls of a fleet of `num_processes` processes, and their answers' effects."""

    def __init__(self, config, spec: GroupSpec, num_processes: int, max_restarts: int):
        self.config = config
        self.spec = spec
        self.max_restarts = max_restarts
        self.records = [ProcessRecord(i) for i in range(num_processes)]
        self.processes: list = []
        self.servers: dict = {}
        # Who receives parameters: the processes (placement "local") or the servers ("server").
        self.targets: list = []
        self.links: list[ParamLink] = []
        self.fetches: dict = {}  # ref -> process
        self.acks: dict = {}  # ref -> (target, version, epoch)
        self.hellos: dict = {}  # ref -> process
        self.ready: collections.deque = collections.deque()  # trajectories received, not handed out
        self.faults: collections.deque = collections.deque(maxlen=_KEEP_FAULTS)
        self.trajectory_bytes = 0
        self.version = 0  # the newest parameter version, and its object
        self.latest_ref = None
        self.start_version = 0  # the version processes are constructed (and restarted) with
        self.stopping = False
        self.stop_reason: str | None = None

    def attach(self, processes: list, servers: dict, fetches_per_process: int) -> None:
        """The processes (and servers) just created: asks each which incarnation runs and for its
        first groups."""
        self.processes, self.servers = processes, servers
        self.targets = list(servers.values()) if servers else list(processes)
        self.links = [ParamLink(self.version) for _ in self.targets]
        for i in range(len(processes)):
            self.hello(i)
            for _ in range(fetches_per_process):
                self.fetch(i)

    def publish(self, version: int, ref) -> None:
        """Parameter `version` is in the object store as `ref`: sends it to every target that has
        no update on its way (the others get it when theirs is confirmed)."""
        self.version, self.latest_ref = version, ref
        for target in range(len(self.targets)):
            self.send_params(target)

    def refs(self) -> tuple[list, bool]:
        """Every outstanding call, and whether any of them fetches trajectories. `ray.wait` lists
        the ready calls in the order given: the few `info` and `set_params` answers come before
        the groups, which are almost always ready, so that they are never left waiting behind them."""
        return list(self.hellos) + list(self.acks) + list(self.fetches), bool(self.fetches)

    def clear(self) -> None:
        self.fetches.clear()
        self.acks.clear()
        self.hellos.clear()

    def fetch(self, i: int) -> None:
        self.fetches[self.processes[i].next_group.remote()] = i

    def hello(self, i: int) -> None:
        if i not in self.hellos.values() and not self.stopping and not self.records[i].given_up:
            self.hellos[self.processes[i].info.remote()] = i

    def _unavailable(self, i: int) -> None:
        """A call to process i failed as unavailable: it died and Ray restarts it; asking which
        incarnation runs tells the fleet as soon as the new one is up."""
        self.records[i].interrupted()
        self.hello(i)

    def _epoch(self, target: int) -> int:
        """Which incarnation of a parameter target a call goes to (servers are never restarted)."""
        return 0 if self.servers else self.records[target].epoch

    def send_params(self, target: int) -> None:
        link = self.links[target]
        if self.stopping or not link.wants(self.version):
            return
        if not self.servers and self.records[target].given_up:
            return
        ref = self.targets[target].set_params.remote(self.version, self.latest_ref)
        link.sent(self.version)
        self.acks[ref] = (target, self.version, self._epoch(target))

    def fault(self, i: int | None, where: str, error: str) -> None:
        fault = FleetFault(i, where, error, time.time())
        self.faults.append(fault)
        if i is not None:
            self.records[i].faults.append(fault)

    def handle(self, ref) -> None:
        """Takes the answer to the outstanding call `ref` (which `ray.wait` found ready)."""
        if ref in self.hellos:
            self._handle_hello(ref, self.hellos.pop(ref))
        elif ref in self.acks:
            self._handle_ack(ref, *self.acks.pop(ref))
        elif ref in self.fetches:
            self._handle_group(ref, self.fetches.pop(ref))

    def _handle_ack(self, ref, i: int, version: int, epoch: int) -> None:
        current = epoch == self._epoch(i)  # else sent to an incarnation since replaced
        name = f"server {i}" if self.servers else f"process {i}"
        try:
            has = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # raised by the process's own code
            self.fault(None if self.servers else i, "params",
                       f"{name} refused parameters version {version}: {e.cause!r}")
            if current:
                self.links[i].failed()
            return
        except ray.exceptions.ActorDiedError as e:
            if self.servers:
                self.fault(None, "server", f"{name} died: {str(e)[:200]}")
            else:
                self._died_for_good(i, e)
            return
        except ray.exceptions.RayError:  # restarting: its new incarnation's first answer resets the link
            if not self.servers:
                self._unavailable(i)
            if current:
                self.links[i].failed()
                self.send_params(i)  # Ray holds the call until the process is up again
            return
        if current:
            self.links[i].confirmed(has)
            self.send_params(i)

    def _handle_group(self, ref, i: int) -> None:
        record = self.records[i]
        try:
            payload = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # raised by the process's own code
            if not self.stopping:
                self.halt(f"process {i}'s pool stopped: {e.cause}" if isinstance(e.cause, PoolStopped)
                          else f"process {i} failed in next_group: {e.cause!r}")
                self.fault(i, "pool", self.stop_reason)
            return
        except ray.exceptions.ActorDiedError as e:
            self._died_for_good(i, e)
            return
        except ray.exceptions.RayError as e:
            # Restarting (ActorUnavailableError), or the group was lost with its node: what the
            # process had finished is counted as lost when its new incarnation reports.
            if not self.stopping:
                self.fault(i, "process", f"process {i}: {type(e).__name__}: {str(e)[:200]}")
                self._unavailable(i)
            self._refetch(i)  # Ray holds the call until the process is up again
            return
        if payload is None and self.stopping:
            return  # the process's pool was closed by stop()
        try:
            group, report = self.spec.unpack(payload, f"process {i}")
            self.spec.check(group, f"process {i} (pid {report.token[1]})", (0, self.version))
        except TrajectoryRefused as e:
            record.refuse()
            self.fault(i, "trajectory", str(e))
            self._refetch(i)
            return
        self.take_report(i, report, self.config.group_size)
        record.saw_version(int(group.policy_version.max()))
        self.trajectory_bytes += tree_nbytes(group)
        self.ready.extend(split_group(group, self.config.group_size, self.config.width))
        self._refetch(i)

    def _handle_hello(self, ref, i: int) -> None:
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorDiedError as e:
            self._died_for_good(i, e)
            return
        except ray.exceptions.RayError:
            if not self.stopping:
                self._unavailable(i)
            return
        if type(info) is dict and isinstance(info.get("node_id"), str) and isinstance(info.get("pid"), int):
            self._restarted(i, self.records[i].seen((info["node_id"], info["pid"])), info["pid"])

    def _restarted(self, i: int, replaced: bool, pid: int) -> None:
        if replaced:
            self.fault(i, "process", f"process {i} was restarted (now pid {pid})")
            if not self.servers:
                self.links[i].reset(self.start_version)  # a new incarnation: its constructor's params
                self.send_params(i)

    def take_report(self, i: int, report, received: int) -> None:
        self._restarted(i, self.records[i].report(report, received), report.token[1])

    def _refetch(self, i: int) -> None:
        if not self.stopping and not self.records[i].given_up:
            self.fetch(i)

    def _died_for_good(self, i: int, error: BaseException) -> None:
        if not self.stopping and self.records[i].died_for_good():
            self.fault(i, "process", f"process {i} is dead for good (Ray restarts a process at most "
                                     f"max_restarts={self.max_restarts} times): {str(error)[:200]}")

    def halt(self, reason: str) -> None:
        self.stopping = True
        self.stop_reason = reason
