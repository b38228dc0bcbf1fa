"""Throughput reports: one typed summary for every run, as a table, JSON lines and PNG plots.

    recorder = rlbatch.report.Recorder(pool, policy)                # samples pool.stats over time
    ... trainer.run(..., on_update=recorder.on_update)              # or call recorder.sample()
    summary = recorder.finish(train_report, config=vars(args))      # a frozen Summary
    print(rlbatch.report.format_table(summary))
    rlbatch.report.write(summary, "runs/x")                         # report.jsonl (+ PNGs)

`summarize(actors=pool.stats, service=policy.stats, train=train_report)` builds a Summary from the
public stats of whichever parts a run has: an ActorPool's ActorStats, a PolicyService's PolicyStats
(or a BatchedService's ServiceStats) and a Trainer's TrainReport. A Summary holds:
- throughput: env steps/s over the whole run and the last 10 s and 60 s, and a time series;
- stages: where the time went, summed over threads: env step, actor waiting for its action,
  actor blocked on the full trajectory queue, request queue wait, host preparation (rows into
  buffers, transfer, dispatch), device compute, learner update, parameter publish;
- batching: batch-size histogram, fill per bucket, padding waste, request latency p50/p99,
  compile count;
- actors and learning: episodes and recent return, trajectory queue depth, dropped trajectories,
  env and policy errors, env rebuilds; policy lag, stale steps dropped, the learner's last metrics.

A section (or stage) is None when the run had no such part, and its JSON (`Summary.as_json`,
`dataclasses.asdict` of it) leaves it out.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from rlbatch.actors.pool import ActorPool, ActorStats
from rlbatch.batching.service import BatchedService
from rlbatch.batching.stats import ServiceStats
from rlbatch.policy.service import PolicyService, PolicyStats
from rlbatch.training.trainer import Progress, TrainReport

__all__ = ["Actors", "Batching", "BucketFill", "Learning", "Recorder", "Stages", "Summary", "Throughput",
           "format_table", "plot", "summarize", "window_rate", "write", "write_runs"]

_clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Environment steps of the pool over the run."""

    env_steps: int
    elapsed_s: float
    steps_per_sec: float  # over the whole run
    steps_per_sec_last_10s: float  # nan while the series spans less than that
    steps_per_sec_last_60s: float
    series: tuple[tuple[float, int], ...]  # (seconds since the pool started, env steps) samples


@dataclasses.dataclass(frozen=True)
class Actors:
    """The pool's actors and environments at the end of the run."""

    num_actors: int
    num_envs: int
    episodes: int
    recent_return_mean: float  # mean return of the last 100 finished episodes (nan before any)
    recent_length_mean: float
    trajectories: int  # emitted into the trajectory queue
    queue_depth: int
    dropped_full: int  # trajectories dropped because the queue was full
    dropped_on_error: int  # unfinished trajectories dropped because an environment failed
    env_errors: int
    env_rebuilds: int
    policy_errors: int
    last_step_age_max: float  # seconds since the stalest actor's last step (a stuck env shows here)


@dataclasses.dataclass(frozen=True)
class Stages:
    """Where the time went, in seconds summed over threads; None where the run had no such part."""

    env_step: Optional[float] = None  # actors stepping and resetting environments
    actor_wait_for_action: Optional[float] = None
    actor_blocked_on_full_queue: Optional[float] = None
    request_queue_wait_p50_per_request: Optional[float] = None  # the median, not a sum
    host_prep: Optional[float] = None  # rows into buffers, transfer, dispatch (nan: not a policy service)
    device_compute: Optional[float] = None  # waiting for the device's outputs (nan: not a policy service)
    learner_update: Optional[float] = None
    parameter_publish: Optional[float] = None
    trainer_wait_for_trajectories: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class BucketFill:
    """One bucket of a policy service: the batches it ran and the valid fraction of their rows."""

    batches: int
    fill: float


@dataclasses.dataclass(frozen=True)
class Batching:
    """The service's batches and request latencies over the run."""

    requests: int  # a multi-row request counts once
    rows: int
    batches: int
    mean_batch_size: float  # valid rows per batch
    batch_size_hist: Mapping[int, int]  # valid rows -> batches, sorted by size
    bucket_fill: Mapping[int, BucketFill]  # bucket -> its fill (empty without buckets)
    padding_fraction: float  # padded rows / all rows passed to the function
    latency_p50_ms: float  # submit to result ready
    latency_p99_ms: float
    queue_wait_p50_ms: float
    queue_wait_p99_ms: float
    compile_count: Optional[int]  # None: not a policy service
    errors: int  # requests failed by the batch function or its output
    invalid: int  # requests refused for their inputs
    params_version: Optional[int]  # None: not a policy service
    latency_samples_ms: tuple[float, ...]  # recent request latencies, for the latency plot


@dataclasses.dataclass(frozen=True)
class Learning:
    """The trainer's run: why it stopped, how stale its samples were, what the learner reported."""

    updates: int
    stop_reason: str  # "budget", "condition", "time", "interrupted", "error", "pool stopped"
    solved_at_steps: Optional[int]  # env steps when the stop condition first held (None: never)
    solved_at_seconds: Optional[float]
    samples_trained: int
    stale_steps_dropped: int  # steps of trajectories dropped for exceeding max_policy_lag
    policy_lag_min: float  # learner updates between the acting parameters and the update
    policy_lag_mean: float
    policy_lag_max: float
    recent_return_mean: float
    last_metrics: Mapping[str, Any]  # the learner's metrics of its last update
    error: Optional[str]  # what stopped the run, when stop_reason is "error"


@dataclasses.dataclass(frozen=True)
class Summary:
    """One run's report. A section is None when the run had no such part (no pool, no trainer)."""

    config: Mapping[str, Any]  # the run's settings, as the script passed them
    time: str  # local time the summary was made, ISO 8601 to the second
    throughput: Optional[Throughput] = None
    actors: Optional[Actors] = None
    stages: Optional[Stages] = None
    batching: Optional[Batching] = None
    learning: Optional[Learning] = None

    def as_json(self) -> dict:
        """`dataclasses.asdict`, leaving out the sections and stages that are None."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if "stages" in out:
            out["stages"] = {k: v for k, v in out["stages"].items() if v is not None}
        return out


def window_rate(series, seconds):
    """Steps/s over the samples of an [(elapsed, steps)] series within its last `seconds`; nan with
    fewer than two samples."""
    if len(series) < 2:
        return float("nan")
    t_end, s_end = series[-1]
    for t, s in series:
        if t_end - t <= seconds:
            return (s_end - s) / (t_end - t) if t_end > t else float("nan")
    return float("nan")


def summarize(actors: Optional[ActorStats] = None, service: Optional[ServiceStats] = None,
              train: Optional[TrainReport] = None, *, series: Sequence[tuple[float, int]] = (),
              latency_samples: Sequence[float] = (), elapsed: Optional[float] = None,
              config: Optional[Mapping[str, Any]] = None) -> Summary:
    """A Summary from the stats of whichever parts a run has.

    actors: `ActorPool.stats`; service: `PolicyService.stats` (a PolicyStats: compile count,
    parameter version, bucket fill, host and device time) or `BatchedService.stats`; train: what
    `Trainer.run` returned. series: (elapsed s, env steps) samples of the pool; latency_samples:
    recent request latencies in seconds; elapsed: the run's seconds (default: the pool's).
    """
    throughput = actor_figures = stages = batching = learning = None
    stage_times: dict[str, float] = {}
    if actors is not None:
        a = actors
        elapsed = elapsed if elapsed is not None else a.elapsed
        throughput = Throughput(
            env_steps=a.env_steps, elapsed_s=elapsed,
            steps_per_sec=a.env_steps / elapsed if elapsed else float("nan"),
            steps_per_sec_last_10s=window_rate(series, 10.0), steps_per_sec_last_60s=window_rate(series, 60.0),
            series=tuple((round(t, 3), s) for t, s in series))
        actor_figures = Actors(
            num_actors=a.num_actors, num_envs=a.num_envs, episodes=a.episodes,
            recent_return_mean=a.recent_return_mean, recent_length_mean=a.recent_length_mean,
            trajectories=a.trajectories, queue_depth=a.queue_depth, dropped_full=a.dropped_full,
            dropped_on_error=a.dropped_on_error, env_errors=a.env_errors, env_rebuilds=a.env_rebuilds,
            policy_errors=a.policy_errors, last_step_age_max=max(a.last_step_age) if a.last_step_age else 0.0)
        stage_times.update(env_step=a.env_time, actor_wait_for_action=a.policy_wait_time,
                           actor_blocked_on_full_queue=a.queue_wait_time)
    if service is not None:
        p = service
        policy = p if isinstance(p, PolicyStats) else None
        stage_times.update(request_queue_wait_p50_per_request=p.queue_wait_p50,
                           host_prep=policy.host_prep_time if policy else float("nan"),
                           device_compute=policy.device_time if policy else float("nan"))
        fill = {}
        if policy is not None:
            fill = {bucket: BucketFill(batches=p.bucket_hist.get(bucket, 0), fill=1.0 - padding)
                    for bucket, padding in policy.bucket_padding.items()}
        batching = Batching(
            requests=p.requests, rows=p.rows, batches=p.batches, mean_batch_size=p.mean_batch_size,
            batch_size_hist=dict(sorted(p.batch_size_hist.items())), bucket_fill=fill,
            padding_fraction=p.padding_fraction, latency_p50_ms=1e3 * p.latency_p50,
            latency_p99_ms=1e3 * p.latency_p99, queue_wait_p50_ms=1e3 * p.queue_wait_p50,
            queue_wait_p99_ms=1e3 * p.queue_wait_p99, compile_count=policy.compile_count if policy else None,
            errors=p.errors, invalid=p.invalid, params_version=policy.params_version if policy else None,
            latency_samples_ms=tuple(1e3 * x for x in latency_samples))
    if train is not None:
        stage_times.update(learner_update=train.time_learner_update, parameter_publish=train.time_publish,
                           trainer_wait_for_trajectories=train.time_waiting_for_trajectories)
        learning = Learning(
            updates=train.updates, stop_reason=train.stop_reason, solved_at_steps=train.solved_at_steps,
            solved_at_seconds=train.solved_at_seconds, samples_trained=train.samples_trained,
            stale_steps_dropped=train.stale_steps_dropped, policy_lag_min=train.policy_lag_min,
            policy_lag_mean=train.policy_lag_mean, policy_lag_max=train.policy_lag_max,
            recent_return_mean=train.recent_return_mean, last_metrics=train.last_metrics, error=train.error)
    if stage_times:
        stages = Stages(**stage_times)
    return Summary(config=dict(config or {}), time=time.strftime("%Y-%m-%dT%H:%M:%S"), throughput=throughput,
                   actors=actor_figures, stages=stages, batching=batching, learning=learning)


class Recorder:
    """Samples a running pool over time and builds the summary at the end.

    `policy` is the pool's PolicyService (or a BatchedService); either may be None. `every`
    seconds (default 60) it prints a one-line progress report, so long runs show where they are
    without a bar.
    """

    def __init__(self, pool: Optional[ActorPool] = None, policy: PolicyService | BatchedService | None = None,
                 every: Optional[float] = 60.0, echo: Callable[[str], Any] = print):
        self.pool, self.policy = pool, policy
        self.series: list[tuple[float, int]] = []
        self.every = every
        self._echo = echo
        self._last_print = _clock()

    def sample(self) -> None:
        stats = self.pool.stats
        self.series.append((stats.elapsed, stats.env_steps))
        if self.every is not None and _clock() - self._last_print >= self.every:
            self._last_print = _clock()
            self._echo(f"[{stats.elapsed:7.1f}s] env steps {stats.env_steps:,} | "
                       f"{window_rate(self.series, 10.0):,.0f} steps/s (10 s) | "
                       f"return {stats.recent_return_mean:.1f} | queue {stats.queue_depth}")

    def on_update(self, progress: Progress) -> None:
        """A Trainer.run `on_update` callback: samples the pool after every learner update."""
        self.sample()

    def finish(self, train_report: Optional[TrainReport] = None,
               config: Optional[Mapping[str, Any]] = None) -> Summary:
        if self.pool is not None:
            self.sample()
        actors = self.pool.stats if self.pool is not None else None
        service = self.policy.stats if self.policy is not None else None
        return summarize(actors, service, train_report, series=self.series,
                         latency_samples=self._latency_samples(), config=config)

    def _latency_samples(self) -> list:
        if isinstance(self.policy, PolicyService):
            return self.policy.service.latency_samples()
        if isinstance(self.policy, BatchedService):
            return self.policy.latency_samples()
        return []


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def format_table(summary: Summary) -> str:
    """A readable report of a summary."""
    lines = ["", "== rlbatch throughput report =="]
    t = summary.throughput
    if t:
        lines.append(f"env steps {t.env_steps:,} in {t.elapsed_s:.1f} s: {_fmt(t.steps_per_sec)} steps/s "
                     f"(last 10 s {_fmt(t.steps_per_sec_last_10s)}, last 60 s {_fmt(t.steps_per_sec_last_60s)})")
    if summary.stages:
        lines.append("time by stage (seconds, summed over threads):")
        for k, v in dataclasses.asdict(summary.stages).items():
            if v is not None:
                lines.append(f"  {k:38s} {_fmt(v)}")
    b = summary.batching
    if b:
        lines.append(f"batching: {b.requests:,} requests in {b.batches:,} batches, mean batch "
                     f"{_fmt(b.mean_batch_size)}, padding {100 * b.padding_fraction:.1f}%, "
                     f"latency p50 {_fmt(b.latency_p50_ms)} ms p99 {_fmt(b.latency_p99_ms)} ms, "
                     f"compiles {b.compile_count}")
        if b.bucket_fill:
            lines.append("  bucket fill: " + ", ".join(f"{k}: {v.batches} batches {100 * v.fill:.0f}% full"
                                                       for k, v in b.bucket_fill.items()))
    a = summary.actors
    if a:
        lines.append(f"actors: {a.num_actors} x {a.num_envs // max(a.num_actors, 1)} envs, "
                     f"{a.episodes:,} episodes, recent return {_fmt(a.recent_return_mean)}, "
                     f"queue {a.queue_depth}, dropped full {a.dropped_full}, "
                     f"dropped on error {a.dropped_on_error}, env errors {a.env_errors}, "
                     f"rebuilds {a.env_rebuilds}, policy errors {a.policy_errors}")
    g = summary.learning
    if g:
        lines.append(f"learning: {g.updates} updates, stop: {g.stop_reason}, solved at "
                     f"{g.solved_at_steps} steps / {_fmt(g.solved_at_seconds or float('nan'))} s, "
                     f"policy lag min/mean/max {_fmt(g.policy_lag_min)}/{_fmt(g.policy_lag_mean)}/"
                     f"{_fmt(g.policy_lag_max)}, stale dropped {g.stale_steps_dropped}")
    return "\n".join(lines)


def write(summary: Summary, out_dir: str, plots: bool = True, name: str = "report",
          extra: Optional[Mapping[str, Any]] = None) -> str:
    """Appends the summary's JSON to `<out_dir>/<name>.jsonl`; with plots, writes PNGs beside it.

    extra: more top-level fields for the JSON line (a script's learning curve, its checkpoint's
    path); a key the summary has already is refused. Plots need matplotlib (`pip install -e
    .[plots]`); without it they are skipped with a note.
    """
    line = summary.as_json()
    clash = sorted(set(extra or {}) & set(line))
    if clash:
        raise ValueError(f"report.write: extra fields must not replace the summary's, got {clash}")
    line.update(extra or {})
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(line, default=float) + "\n")
    if plots:
        try:
            plot(summary, out_dir, name)
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install -e .[plots])")
    return path


def plot(summary: Summary, out_dir: str, name: str = "report") -> list[str]:
    """Draws steps/s over time, the batch-size histogram and the latency distribution as PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    paths = []
    series = summary.throughput.series if summary.throughput else ()
    if len(series) >= 2:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ts = [t for t, _ in series]
        rates = [(s1 - s0) / (t1 - t0) if t1 > t0 else float("nan")
                 for (t0, s0), (t1, s1) in zip(series, series[1:])]
        ax.plot(ts[1:], rates)
        ax.set_xlabel("seconds")
        ax.set_ylabel("env steps / s")
        ax.set_title("throughput over time")
        paths.append(_save(fig, out_dir, f"{name}_steps_per_sec.png"))
    b = summary.batching
    if b and b.batch_size_hist:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(list(b.batch_size_hist), list(b.batch_size_hist.values()))
        ax.set_xlabel("valid rows per batch")
        ax.set_ylabel("batches")
        ax.set_title("batch size histogram")
        paths.append(_save(fig, out_dir, f"{name}_batch_sizes.png"))
    if b and b.latency_samples_ms:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(b.latency_samples_ms, bins=50)
        ax.set_xlabel("request latency (ms)")
        ax.set_ylabel("requests")
        ax.set_title("latency distribution (recent requests)")
        paths.append(_save(fig, out_dir, f"{name}_latency.png"))
    return paths


def _save(fig, out_dir, filename):
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, filename)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_runs(summaries: Sequence[Summary], out_stem: str, plots: bool = True) -> str:
    """Writes several runs' summaries to `<out_stem>_reports.jsonl` (one JSON line each, replacing
    the file) and draws the plots of the last one as `<out_stem>_report_*.png`; returns the path.

    The benchmark scripts use it so that each of their rlbatch runs also leaves the library's report.
    """
    directory, base = os.path.split(out_stem)
    directory = directory or "."
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{base}_reports.jsonl")
    with open(path, "w") as f:
        for summary in summaries:
            f.write(json.dumps(summary.as_json(), default=float) + "\n")
    if plots and summaries:
        try:
            plot(summaries[-1], directory, f"{base}_report")
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install -e .[plots])")
    return path
