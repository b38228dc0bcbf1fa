"""Throughput reports: one summary for every run, as a table, JSON lines and PNG plots.

    recorder = rlbatch.report.Recorder(pool, policy, trainer)     # trainer optional
    ... trainer.run(..., on_update=recorder.on_update)              # or call recorder.sample()
    summary = recorder.finish(train_report, config=vars(args))
    print(rlbatch.report.format_table(summary))
    rlbatch.report.write(summary, "runs/x")                         # report.jsonl (+ PNGs)

The summary holds:
- throughput: env steps/s over the whole run and the last 10 s and 60 s, and a time series;
- stages: where the time went, summed over threads: env step, actor waiting for its action,
  actor blocked on the full trajectory queue, request queue wait, host preparation (rows into
  buffers, transfer, dispatch), device compute, learner update, parameter publish;
- batching: batch-size histogram, fill per bucket, padding waste, request latency p50/p99,
  compile count;
- learning: policy lag, trajectory queue depth, dropped trajectories, env and policy errors,
  env rebuilds, episodes and recent return.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any

__all__ = ["Recorder", "format_table", "write", "write_runs", "summarize", "plot"]

_clock = time.perf_counter


def _window_rate(series, seconds):
    """Steps/s over the last `seconds` of a [(elapsed, steps)] series."""
    if len(series) < 2:
        return float("nan")
    t_end, s_end = series[-1]
    for t, s in series:
        if t_end - t <= seconds:
            return (s_end - s) / (t_end - t) if t_end > t else float("nan")
    return float("nan")


def summarize(pool=None, policy=None, train=None, series=None, elapsed=None, config=None) -> dict:
    """Builds the summary dict from whatever parts a run has (pool, policy service, train report)."""
    out: dict[str, Any] = {"config": config or {}, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    series = series or []
    if pool is not None:
        a = pool.stats
        elapsed = elapsed if elapsed is not None else a.elapsed
        out["throughput"] = {
            "env_steps": a.env_steps,
            "elapsed_s": elapsed,
            "steps_per_sec": a.env_steps / elapsed if elapsed else float("nan"),
            "steps_per_sec_last_10s": _window_rate(series, 10.0),
            "steps_per_sec_last_60s": _window_rate(series, 60.0),
            "series": [[round(t, 3), s] for t, s in series],
        }
        out["actors"] = {
            "num_actors": a.num_actors, "num_envs": a.num_envs, "episodes": a.episodes,
            "recent_return_mean": a.recent_return_mean, "recent_length_mean": a.recent_length_mean,
            "trajectories": a.trajectories, "queue_depth": a.queue_depth, "dropped_full": a.dropped_full,
            "dropped_on_error": a.dropped_on_error, "env_errors": a.env_errors, "env_rebuilds": a.env_rebuilds,
            "policy_errors": a.policy_errors, "last_step_age_max": max(a.last_step_age) if a.last_step_age else 0.0,
        }
        out["stages"] = {"env_step": a.env_time, "actor_wait_for_action": a.policy_wait_time,
                         "actor_blocked_on_full_queue": a.queue_wait_time}
    if policy is not None:
        p = policy.stats
        stages = out.setdefault("stages", {})
        stages["request_queue_wait_p50_per_request"] = p.queue_wait_p50
        stages["host_prep"] = getattr(p, "host_prep_time", float("nan"))
        stages["device_compute"] = getattr(p, "device_time", float("nan"))
        fill = {}
        for bucket, padding in getattr(p, "bucket_padding", {}).items():
            fill[str(bucket)] = {"batches": p.bucket_hist.get(bucket, 0), "fill": 1.0 - padding}
        out["batching"] = {
            "requests": p.requests, "rows": p.rows, "batches": p.batches, "mean_batch_size": p.mean_batch_size,
            "batch_size_hist": {str(k): v for k, v in sorted(p.batch_size_hist.items())},
            "bucket_fill": fill, "padding_fraction": p.padding_fraction,
            "latency_p50_ms": 1e3 * p.latency_p50, "latency_p99_ms": 1e3 * p.latency_p99,
            "queue_wait_p50_ms": 1e3 * p.queue_wait_p50, "queue_wait_p99_ms": 1e3 * p.queue_wait_p99,
            "compile_count": getattr(p, "compile_count", None), "errors": p.errors, "invalid": p.invalid,
            "params_version": getattr(p, "params_version", None),
            "latency_samples_ms": [1e3 * x for x in policy.service.latency_samples()]
            if hasattr(policy, "service") else [],
        }
    if train is not None:
        stages = out.setdefault("stages", {})
        stages["learner_update"] = train.time_learner_update
        stages["parameter_publish"] = train.time_publish
        stages["trainer_wait_for_trajectories"] = train.time_waiting_for_trajectories
        out["learning"] = {
            "updates": train.updates, "stop_reason": train.stop_reason, "solved_at_steps": train.solved_at_steps,
            "solved_at_seconds": train.solved_at_seconds, "samples_trained": train.samples_trained,
            "stale_steps_dropped": train.stale_steps_dropped, "policy_lag_min": train.policy_lag_min,
            "policy_lag_mean": train.policy_lag_mean, "policy_lag_max": train.policy_lag_max,
            "recent_return_mean": train.recent_return_mean, "last_metrics": train.last_metrics,
            "error": train.error,
        }
    return out


class Recorder:
    """Samples a running pool over time and builds the summary at the end.

    `every` seconds (default 60) it prints a one-line progress report, so long runs show where
    they are without a bar.
    """

    def __init__(self, pool=None, policy=None, trainer=None, every: float | None = 60.0, echo=print):
        self.pool, self.policy, self.trainer = pool, policy, trainer
        self.series: list[tuple[float, int]] = []
        self.every = every
        self._echo = echo
        self._last_print = _clock()
        self._t0 = None

    def sample(self) -> None:
        stats = self.pool.stats
        self.series.append((stats.elapsed, stats.env_steps))
        if self.every is not None and _clock() - self._last_print >= self.every:
            self._last_print = _clock()
            self._echo(f"[{stats.elapsed:7.1f}s] env steps {stats.env_steps:,} | "
                       f"{_window_rate(self.series, 10.0):,.0f} steps/s (10 s) | "
                       f"return {stats.recent_return_mean:.1f} | queue {stats.queue_depth}")

    def on_update(self, progress) -> None:
        self.sample()

    def finish(self, train_report=None, config=None) -> dict:
        if self.pool is not None:
            self.sample()
        return summarize(self.pool, self.policy, train_report, self.series, config=config)


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def format_table(summary: dict) -> str:
    """A readable report of a summary."""
    lines = ["", "== rlbatch throughput report =="]
    t = summary.get("throughput")
    if t:
        lines.append(f"env steps {t['env_steps']:,} in {t['elapsed_s']:.1f} s: {_fmt(t['steps_per_sec'])} steps/s "
                     f"(last 10 s {_fmt(t['steps_per_sec_last_10s'])}, last 60 s {_fmt(t['steps_per_sec_last_60s'])})")
    stages = summary.get("stages")
    if stages:
        lines.append("time by stage (seconds, summed over threads):")
        for k, v in stages.items():
            lines.append(f"  {k:38s} {_fmt(v)}")
    b = summary.get("batching")
    if b:
        lines.append(f"batching: {b['requests']:,} requests in {b['batches']:,} batches, mean batch "
                     f"{_fmt(b['mean_batch_size'])}, padding {100 * b['padding_fraction']:.1f}%, "
                     f"latency p50 {_fmt(b['latency_p50_ms'])} ms p99 {_fmt(b['latency_p99_ms'])} ms, "
                     f"compiles {b['compile_count']}")
        if b["bucket_fill"]:
            lines.append("  bucket fill: " + ", ".join(f"{k}: {v['batches']} batches {100 * v['fill']:.0f}% full"
                                                       for k, v in b["bucket_fill"].items()))
    a = summary.get("actors")
    if a:
        lines.append(f"actors: {a['num_actors']} x {a['num_envs'] // max(a['num_actors'], 1)} envs, "
                     f"{a['episodes']:,} episodes, recent return {_fmt(a['recent_return_mean'])}, "
                     f"queue {a['queue_depth']}, dropped full {a['dropped_full']}, "
                     f"dropped on error {a['dropped_on_error']}, env errors {a['env_errors']}, "
                     f"rebuilds {a['env_rebuilds']}, policy errors {a['policy_errors']}")
    g = summary.get("learning")
    if g:
        lines.append(f"learning: {g['updates']} updates, stop: {g['stop_reason']}, solved at "
                     f"{g['solved_at_steps']} steps / {_fmt(g['solved_at_seconds'] or float('nan'))} s, "
                     f"policy lag min/mean/max {_fmt(g['policy_lag_min'])}/{_fmt(g['policy_lag_mean'])}/"
                     f"{_fmt(g['policy_lag_max'])}, stale dropped {g['stale_steps_dropped']}")
    return "\n".join(lines)


def write(summary: dict, out_dir: str, plots: bool = True, name: str = "report") -> str:
    """Appends the summary to `<out_dir>/<name>.jsonl`; with plots, writes PNGs beside it.

    Plots need matplotlib (`pip install -e .[plots]`); without it they are skipped with a note.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(summary, default=float) + "\n")
    if plots:
        try:
            plot(summary, out_dir, name)
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install -e .[plots])")
    return path


def plot(summary: dict, out_dir: str, name: str = "report") -> list[str]:
    """Draws steps/s over time, the batch-size histogram and the latency distribution as PNGs."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    paths = []
    series = summary.get("throughput", {}).get("series", [])
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
    b = summary.get("batching")
    if b and b["batch_size_hist"]:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar([int(k) for k in b["batch_size_hist"]], list(b["batch_size_hist"].values()))
        ax.set_xlabel("valid rows per batch")
        ax.set_ylabel("batches")
        ax.set_title("batch size histogram")
        paths.append(_save(fig, out_dir, f"{name}_batch_sizes.png"))
    if b and b.get("latency_samples_ms"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(b["latency_samples_ms"], bins=50)
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


def write_runs(summaries: list, out_stem: str, plots: bool = True) -> str:
    """Writes several runs' summaries to `<out_stem>_reports.jsonl` (one line each, replacing the
    file) and draws the plots of the last one as `<out_stem>_report_*.png`; returns the path.

    The benchmark scripts use it so that each of their rlbatch runs also leaves the library's report.
    """
    directory, base = os.path.split(out_stem)
    directory = directory or "."
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{base}_reports.jsonl")
    with open(path, "w") as f:
        for summary in summaries:
            f.write(json.dumps(summary, default=float) + "\n")
    if plots and summaries:
        try:
            plot(summaries[-1], directory, f"{base}_report")
        except ImportError:
            print("plots skipped: matplotlib is not installed (pip install -e .[plots])")
    return path
