"""The main job's actor fleet: `experiments.train --processes N` in place of its ActorPool.

    fleet = fleet_job.make_fleet(args, task, learner, state)      # N processes x args.num_actors
    recorder = fleet_job.FleetRecorder(fleet)                     # Trainer.run(on_update=recorder.on_update)
    summary = recorder.finish(train_report, config=config)        # a report.Summary
    report.write(summary, out, extra={**extra, "fleet": fleet_job.fleet_section(fleet.stats)})

Each process runs an ActorPool with the pool's settings (`--num-actors` actors per process,
`--envs-per-actor`, the task's environment or EnvPool vector environment) and its own
PolicyService (placement "local") or its node's inference server ("server"). A process ships its
trajectories in groups of `--batch-size`, one learner batch per object in Ray's object store.

The report: the Summary's sections describe one ActorPool and its PolicyService (report.summarize
reads ActorStats and PolicyStats), which a fleet has per process, not in one place. So a fleet's
Summary has the throughput (env steps of every process over the fleet's time) and the learning
section, and the per-process figures go into the report's `fleet` field (`fleet_section`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from experiments.lib import presets, runtime, tasks
from rlbatch import report

__all__ = ["FleetRecorder", "fleet_section", "format_fleet", "make_fleet"]


def make_fleet(args, task: tasks.Task, learner, state, *, num_processes: int, placement: str = "local",
               address: Optional[str] = None):
    """An ActorFleet (not started) of `num_processes` processes, each playing what the main job's
    ActorPool would play with (resolved) `args`; its parameters are version 0 of `learner`'s `state`.

    `--pin-python` becomes the fleet's `pin_python` (classic control only, as for one process):
    each process keeps its Python threads and, with synchronous CPU dispatch, its policy on a CPU of
    its own (256 CartPole environments on 2 CPUs: see experiments.bench_fleet's pinned and free rows).
    The processes share the job's persistent compilation cache (`--compilation-cache`).
    """
    from rlbatch.distributed import ActorFleet  # Ray is an optional extra: imported only for a fleet

    # (the processes of a local fleet share this machine's cores; elsewhere each has its own)
    envs = tasks.pool_envs(task, args.env, args.num_actors * (num_processes if placement == "local" else 1))
    return ActorFleet(envs["env_fn"], learner.policy.apply, learner.params(state), example_obs=task.example_obs,
                      vector_env_fn=envs.get("vector_env_fn"), num_processes=num_processes,
                      num_actors=args.num_actors, unroll_length=args.unroll_length,
                      envs_per_actor=args.envs_per_actor, seed=args.seed, group_size=args.batch_size,
                      placement=placement, buckets=args.buckets, max_delay=args.max_delay,
                      pool_options={"max_queue": args.queue_batches * args.batch_size},
                      recent_episodes=args.solve_window, address=address,
                      pin_python=args.pin_python and presets.family_of(args.env) == "classic",
                      sync_cpu_dispatch=True, jax_options=runtime.compilation_cache_options(args.compilation_cache))


def fleet_section(stats) -> dict[str, Any]:
    """The report's per-process figures of a FleetStats: totals and one row per process."""
    return {
        "num_processes": stats.num_processes, "processes_alive": stats.processes_alive,
        "env_steps": stats.env_steps, "elapsed_s": stats.elapsed, "steps_per_sec": stats.steps_per_sec,
        "restarts": stats.restarts, "trajectories": stats.trajectories,
        "trajectories_lost": stats.trajectories_lost, "trajectories_refused": stats.trajectories_refused,
        "trajectory_bytes": stats.trajectory_bytes, "param_bytes": stats.param_bytes,
        "params_version": stats.params_version,
        "processes": [{"index": p.index, "pid": p.pid, "alive": p.alive, "env_steps": p.env_steps,
                       "steps_per_sec": p.steps_per_sec, "episodes": p.episodes, "trajectories": p.trajectories,
                       "restarts": p.restarts, "trajectories_lost": p.trajectories_lost,
                       "trajectories_refused": p.trajectories_refused, "env_errors": p.env_errors,
                       "policy_errors": p.policy_errors, "recent_errors": list(p.recent_errors)}
                      for p in stats.processes],
    }


def format_fleet(section: Mapping[str, Any]) -> str:
    """The per-process figures as lines under the throughput report."""
    lines = [f"fleet: {section['num_processes']} processes, {section['steps_per_sec']:,.0f} steps/s in total, "
             f"{section['restarts']} restarts, {section['trajectories_lost']} trajectories lost, "
             f"{section['trajectories_refused']} refused; object store: trajectories "
             f"{section['trajectory_bytes'] / 1e6:,.1f} MB, parameters {section['param_bytes'] / 1e6:,.1f} MB"]
    for p in section["processes"]:
        lines.append(f"  process {p['index']} (pid {p['pid']}): {p['env_steps']:,} env steps, "
                     f"{p['steps_per_sec']:,.0f} steps/s, {p['restarts']} restarts, "
                     f"{p['trajectories_lost']} lost, {p['env_errors']} env errors, "
                     f"{p['policy_errors']} policy errors")
    return "\n".join(lines)


class FleetRecorder:
    """Samples a fleet's env steps over time (as report.Recorder samples a pool) and builds the
    run's Summary: throughput and learning; the per-process figures are `fleet_section`'s."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.series: list[tuple[float, int]] = []

    def sample(self) -> None:
        stats = self.fleet.stats
        self.series.append((stats.elapsed, stats.env_steps))

    def on_update(self, progress) -> None:
        """A Trainer.run `on_update` callback."""
        self.sample()

    def finish(self, train_report=None, config: Optional[Mapping[str, Any]] = None) -> report.Summary:
        self.sample()
        stats = self.fleet.stats
        throughput = report.Throughput(
            env_steps=stats.env_steps, elapsed_s=stats.elapsed, steps_per_sec=stats.steps_per_sec,
            steps_per_sec_last_10s=report.window_rate(self.series, 10.0),
            steps_per_sec_last_60s=report.window_rate(self.series, 60.0),
            series=tuple((round(t, 3), s) for t, s in self.series))
        return dataclasses.replace(report.summarize(None, None, train_report, config=config), throughput=throughput)
