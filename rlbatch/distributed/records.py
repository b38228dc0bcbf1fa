"""What the fleet knows of each actor process: its incarnations, counters, faults and parameters.

A process (one Ray actor) may die and be restarted by Ray; each life is an *incarnation*, told
apart by the token `(node id, pid)` its answers carry. `ProcessRecord` is the state machine that
turns what the fleet hears (the report that comes with every group, an answer to `info`, a call
that failed) into restarts, lost trajectories and totals that never go backwards. `ParamLink`
is which parameter version a process has and which one is on its way. Neither touches Ray: the
fleet drives them, and tests drive them without processes.

Counting rules:
- a restart is an answer from a new incarnation (`seen`: a group's report, or `info`) while an
  old one was current, or after calls failed as unavailable (`interrupted`: Ray fails the calls
  in flight to a dying process, and those made while it restarts, with ActorUnavailableError);
  Ray's ActorDiedError, once it gave up restarting, ends the process for good (`died_for_good`);
- the trajectories an incarnation lost are those it had finished by its last report
  (`ProcessReport.trajectories`) and the fleet never received: a lower bound, since what it
  finished after its last report is not known;
- totals (steps, episodes, errors) are the sums over incarnations of their last reports.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

__all__ = ["FleetFault", "FleetStats", "ParamLink", "ProcessRecord", "ProcessReport", "ProcessStats", "recent_means"]

_KEEP_FAULTS = 16


class ProcessReport(NamedTuple):
    """A process's counters, sent with every group (plain numbers and strings only)."""

    token: tuple  # (node id, pid): which incarnation sent it
    env_steps: int
    elapsed: float  # seconds since this incarnation's pool started
    trajectories: int  # finished by this incarnation's pool (put into its queue)
    episodes: int  # finished by this incarnation
    recent_return_mean: float  # over its pool's last `recent_episodes` episodes (nan before any)
    recent_length_mean: float
    recent_count: int  # episodes in that window
    env_errors: int
    policy_errors: int
    dropped_on_error: int
    actors_running: int
    recent_errors: tuple  # the pool's last ActorFaults, as "actor a, where: error" strings


@dataclasses.dataclass(frozen=True)
class FleetFault:
    """A fault the fleet saw: `where` is "process" (a process died or was restarted), "trajectory"
    (a group was refused), "params" (a parameter update failed), "pool" (a process's pool
    stopped), "server" (an inference server died) or "stop" (stop() ran out of time); `process`
    is None for the last two."""

    process: int | None
    where: str
    error: str
    time: float  # time.time()


@dataclasses.dataclass(frozen=True)
class ProcessStats:
    """One process, over all its incarnations; rates are the current incarnation's."""

    index: int
    node_id: str | None
    pid: int | None
    alive: bool  # False once Ray gave up restarting it, or the fleet stopped
    env_steps: int
    steps_per_sec: float
    episodes: int
    trajectories: int  # received by the fleet
    trajectories_finished: int  # finished by the process's pool (by its last report)
    trajectories_lost: int  # finished but never received, because the process died
    trajectories_refused: int  # received with the wrong shapes or dtypes, never handed out
    restarts: int
    env_errors: int
    policy_errors: int
    params_version: int  # the newest parameter version in its trajectories
    recent_errors: tuple


@dataclasses.dataclass(frozen=True)
class FleetStats:
    """A snapshot of a fleet. `env_steps`, `episodes` and `recent_return_mean` are what the
    Trainer reads (rlbatch.training.interfaces.SourceStats)."""

    num_processes: int
    processes_alive: int
    env_steps: int
    elapsed: float
    steps_per_sec: float
    episodes: int
    recent_return_mean: float  # each process's last `recent_episodes` episodes together (nan before any)
    recent_length_mean: float
    trajectories: int
    trajectories_lost: int
    trajectories_refused: int
    restarts: int
    params_version: int
    trajectory_bytes: int  # trajectory arrays received through the object store
    param_bytes: int  # parameter arrays put into the object store (once per version)
    processes: tuple  # ProcessStats, by process index

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def recent_means(reports) -> tuple[float, float]:
    """Mean return and length over the recent-episode windows of `reports` (None: no report yet),
    each window weighted by the episodes in it; nan before any episode."""
    reports = [r for r in reports if r is not None and r.recent_count > 0]
    n = sum(r.recent_count for r in reports)
    if not n:
        return float("nan"), float("nan")
    return (sum(r.recent_return_mean * r.recent_count for r in reports) / n,
            sum(r.recent_length_mean * r.recent_count for r in reports) / n)


class _Incarnation:
    __slots__ = ("report", "received")

    def __init__(self):
        self.report: ProcessReport | None = None
        self.received = 0


class ProcessRecord:
    """The fleet's record of process `index` (see the module docstring for the counting rules)."""

    def __init__(self, index: int):
        self.index = index
        self.restarts = 0  # also the epoch: parameter updates are tagged with it when sent
        self.given_up = False  # Ray will not restart it again
        self.refused = 0
        self.newest_version = 0
        self._incarnations: dict[tuple, _Incarnation] = {}
        self._current: tuple | None = None
        self._ended: set = set()
        self._interrupted = False
        self.faults: collections.deque = collections.deque(maxlen=_KEEP_FAULTS)

    @property
    def epoch(self) -> int:
        return self.restarts

    def died_for_good(self) -> bool:
        """Ray reports the process dead for good (it used up its restarts). True the first time."""
        if self.given_up:
            return False
        self.given_up = True
        if self._current is not None:
            self._ended.add(self._current)
            self._current = None
        return True

    def interrupted(self) -> None:
        """A call failed because the process was unavailable: it died, and Ray restarts it."""
        self._interrupted = True

    def seen(self, token: tuple) -> bool:
        """Incarnation `token` answered. True if it is a new one that replaced another (a
        restart: it runs its constructor's parameters, not the newest). An incarnation that died
        before it ever answered is known only from the calls it left unanswered (`interrupted`)."""
        token = tuple(token)
        if token in self._ended or token == self._current:
            return False  # a late answer of a dead incarnation, or the current one
        replaced = self._current is not None or self._interrupted
        if replaced:
            self.restarts += 1
            if self._current is not None:
                self._ended.add(self._current)
        self._current = token
        self._interrupted = False
        return replaced

    def report(self, report: ProcessReport, received: int) -> bool:
        """Counts a group of `received` trajectories and the report that came with it; as `seen`."""
        life = self._incarnations.setdefault(tuple(report.token), _Incarnation())
        life.received += received
        if life.report is None or report.env_steps >= life.report.env_steps:
            life.report = report
        return self.seen(report.token)

    def saw_version(self, version: int) -> None:
        self.newest_version = max(self.newest_version, version)

    def refuse(self) -> None:
        self.refused += 1

    # ------------------------------------------------------------------ totals

    def _sum(self, field: str) -> int:
        return sum(getattr(life.report, field) for life in self._incarnations.values() if life.report is not None)

    @property
    def received(self) -> int:
        return sum(life.received for life in self._incarnations.values())

    @property
    def lost(self) -> int:
        return sum(max(0, life.report.trajectories - life.received) for token, life in self._incarnations.items()
                   if token in self._ended and life.report is not None)

    @property
    def current_token(self) -> tuple | None:
        """(node id, pid) of the current incarnation, once it reported."""
        return self._current

    @property
    def current_report(self) -> ProcessReport | None:
        life = self._incarnations.get(self._current)
        return None if life is None else life.report

    def stats(self, alive: bool) -> ProcessStats:
        report = self.current_report
        token = self._current or (None, None)
        rate = report.env_steps / report.elapsed if report is not None and report.elapsed > 0 else 0.0
        errors = tuple(report.recent_errors) if report is not None else ()
        return ProcessStats(
            index=self.index, node_id=token[0], pid=token[1], alive=alive and not self.given_up,
            env_steps=self._sum("env_steps"), steps_per_sec=rate, episodes=self._sum("episodes"), trajectories=self.received,
            trajectories_finished=self._sum("trajectories"),
            trajectories_lost=self.lost, trajectories_refused=self.refused, restarts=self.restarts,
            env_errors=self._sum("env_errors"), policy_errors=self._sum("policy_errors"),
            params_version=self.newest_version, recent_errors=errors + tuple(f.error for f in self.faults))


class ParamLink:
    """The parameter versions of one process: the newest it confirmed (`has`) and the one on its
    way (`in_flight`). At most one update travels to a process at a time, and a process is only
    ever sent a version newer than the one it has, so a slow process gets the newest version next
    rather than a backlog of old ones."""

    def __init__(self, has: int):
        self.has = has
        self.in_flight: int | None = None

    def wants(self, latest: int) -> bool:
        return self.in_flight is None and latest > self.has

    def sent(self, version: int) -> None:
        self.in_flight = version

    def confirmed(self, version: int) -> None:
        self.in_flight = None
        self.has = max(self.has, version)

    def failed(self) -> None:
        self.in_flight = None

    def reset(self, has: int) -> None:
        """A new incarnation: it has the parameters it was constructed with."""
        self.in_flight = None
        self.has = has
