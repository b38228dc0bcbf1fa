"""Benchmark of ActorFleet: CartPole env steps/s across processes, and time to solve CartPole.

In one run, with the same 4-64-64-2 MLP policy sampling its actions and `num_envs` (256) CartPole
environments in total:

- pool-grouped and pool-single: the single-process ActorPool, 8 actors x 32 environments and 256
  actors x 1 (one PolicyService, max delay 2 ms);
- fleet-local and fleet-server: an ActorFleet of 1, 2 and 4 processes, the same 256 environments
  split evenly (8 / N actors x 32 environments per process), inference in every process ("local")
  or in one inference server ("server"); a process ships groups of `group_size` trajectories.

Steps/s are counted over `duration` s after a discarded `warmup` (ActorPool.stats.env_steps;
ActorFleet.refresh_stats().env_steps, which asks every process for its count). The main thread
drains the trajectories as a trainer would (pool.get / fleet.get), so nothing blocks on a full
queue. Each row's ratio is to the better single-process pool, measured in the same run.

Then time to solve CartPole-v1: `python -m experiments.train` (the classic preset) and the same
with `--processes 2`, as subprocesses, back to back for each of `solve_seeds`, each to its
report's moment of solving, counted from the launch of its process (None: not solved within
`solve_max_seconds`). The floor of each fleet run is its first update, counted the same way: it
cannot have solved before. Where that time goes: from before Ray starts to the first trajectory
of a fleet with the same settings, measured in this process after the solve runs.

Ray starts once (bound to 127.0.0.1) before the Python threads are pinned (`pin_python`, the
single-process pool's better setting), so Ray's processes keep every CPU. Targets, shown and never
asserted: 2 processes >= 1.6x the single-process pool's steps/s; time to solve with 2 processes
below the single-process time.

    python -m experiments.bench_fleet            # the table and the solve times (several minutes)
    python -m experiments.bench_fleet --quick    # a smoke run (about a minute), no solve runs
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Optional

import jax
import numpy as np
import ray
import tyro

import rlbatch
from experiments.bench_policy import mlp_policy
from experiments.lib import env_loops, outputs, runtime
from rlbatch.distributed import ActorFleet
from rlbatch.distributed.cluster import connect

_clock = time.perf_counter


@dataclasses.dataclass(frozen=True)
class Args:
    num_envs: int = 256
    """CartPole environments of every configuration"""
    envs_per_actor: int = 32
    """environments per actor in the grouped pool and in the fleets' processes"""
    processes: tuple[int, ...] = (1, 2, 4)
    """fleet sizes"""
    placements: tuple[str, ...] = ("local", "server")
    """where the fleets' inference runs"""
    unroll_length: int = 32
    """T: steps per trajectory"""
    group_size: int = 4
    """trajectories per object a fleet process ships"""
    warmup: float = 3.0
    """seconds discarded before each measurement (compiles, process start)"""
    duration: float = 10.0
    """seconds measured per configuration"""
    throughput: bool = True
    """measure the steps/s rows (--no-throughput: the solve runs only)"""
    solve: bool = True
    """run the time-to-solve comparison (experiments.train with and without --processes 2)"""
    solve_seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of the solve runs, each run once in one process and once with --processes"""
    solve_processes: int = 2
    """--processes of the fleet's solve run"""
    solve_fleet_args: str = "--num-actors 2"
    """more flags of the fleet's solve runs, as one string given with "=" (default: 2 actors per process, so
    that 2 processes play the single process's 32 environments, 4 actors x 8, in total)"""
    solve_max_seconds: float = 300.0
    """--max-seconds of each solve run"""
    solve_total_steps: Optional[int] = None
    """--total-steps of each solve run (None: the preset's)"""
    seed: int = 0
    """seeds the parameters, the policies' key schedules and the environments of the steps/s rows"""
    pin_python: bool = True
    """confine this process's Python threads to one CPU (after Ray started) for the pool rows"""
    cpu_modes: tuple[str, ...] = ("pinned", "free")
    """the fleets' CPU settings: "pinned" (ActorFleet pin_python and sync_cpu_dispatch: process i's
    Python threads and policy on CPU i) and "free" (neither)"""
    repeats: int = 3
    """rounds: every configuration is measured once per round, the rounds interleaved; rows show the median"""
    quick: bool = False
    """a smoke run: 0.5 s warm-up and measurement, no solve runs"""
    out: str = "runs/bench_fleet"
    """file stem for the JSON and Markdown outputs (and the solve runs' directories)"""


def _policy(seed: int):
    mlp = mlp_policy(4, (64, 64), 2)
    return mlp.apply, mlp.init(jax.random.PRNGKey(seed), np.zeros(4, np.float32))


def measure_pool(args: Args, apply_fn, params, num_actors: int, envs_per_actor: int) -> dict:
    """Steps/s of the single-process ActorPool, and the CPUs its process kept busy meanwhile."""
    with rlbatch.PolicyService(apply_fn, params, example_obs=np.zeros(4, np.float32), seed=args.seed) as svc:
        with rlbatch.ActorPool("CartPole-v1", svc, num_actors=num_actors, unroll_length=args.unroll_length,
                               envs_per_actor=envs_per_actor, seed=args.seed) as pool:
            rate = env_loops.measure_pool(pool, svc, warmup=args.warmup, duration=args.duration)
    return dict(steps_per_s=rate.steps_per_s, cpus_busy=rate.cpu_s / rate.elapsed_s)


def measure_fleet(args: Args, apply_fn, params, num_processes: int, placement: str, cpu_mode: str) -> dict:
    """Steps/s of an ActorFleet of `num_processes` with the run's environments split evenly."""
    per_process = args.num_envs // num_processes
    envs_per_actor = min(args.envs_per_actor, per_process)
    fleet = ActorFleet("CartPole-v1", apply_fn, params, example_obs=np.zeros(4, np.float32),
                       num_processes=num_processes, num_actors=per_process // envs_per_actor,
                       envs_per_actor=envs_per_actor, unroll_length=args.unroll_length,
                       group_size=args.group_size, placement=placement, seed=args.seed,
                       pin_python=cpu_mode == "pinned", sync_cpu_dispatch=cpu_mode == "pinned")
    with fleet:
        env_loops.drain_until(fleet, _clock() + args.warmup)
        # Until every process has shipped a group: a process not heard from yet would count its
        # warm-up steps inside the measurement.
        deadline = _clock() + 60.0
        while not all(p.trajectories for p in fleet.stats.processes) and _clock() < deadline:
            env_loops.drain_until(fleet, _clock() + 0.5)
        s0, t0 = fleet.refresh_stats().env_steps, _clock()
        env_loops.drain_until(fleet, t0 + args.duration)
        stats, t1 = fleet.refresh_stats(), _clock()
        errors = fleet.errors
    if errors:
        e = errors[-1]
        raise RuntimeError(f"measure_fleet: {num_processes} processes, placement {placement!r}: process "
                           f"{e.process} failed in {e.where}: {e.error}")
    return dict(steps_per_s=(stats.env_steps - s0) / (t1 - t0), restarts=stats.restarts,
                trajectory_mb=stats.trajectory_bytes / 1e6,
                per_process_steps_per_s=[p.steps_per_sec for p in stats.processes])


def _median_row(runs: list[dict]) -> dict:
    """The run with the median steps/s (its other fields kept), and every run's steps/s."""
    ordered = sorted(runs, key=lambda r: r["steps_per_s"])
    return dict(ordered[(len(ordered) - 1) // 2], runs_steps_per_s=[r["steps_per_s"] for r in runs])


def throughput_rows(args: Args) -> list[dict]:
    """The pool and fleet rows (median of `repeats` interleaved rounds), each with its ratio to the
    better single-process pool, and the pools' CPU ceiling: the machine's CPUs over the CPUs the
    pool kept busy, i.e. the most any split of the same work across processes could gain."""
    apply_fn, params = _policy(args.seed)
    configs = [dict(mode="pool-grouped", processes=1, actors=args.num_envs // args.envs_per_actor,
                    envs_per_actor=args.envs_per_actor),
               dict(mode="pool-single", processes=1, actors=args.num_envs, envs_per_actor=1)]
    configs += [dict(mode=f"fleet-{placement}-{cpu}", processes=n, placement=placement, cpu_mode=cpu)
                for placement in args.placements for cpu in args.cpu_modes for n in args.processes]
    runs: list[list[dict]] = [[] for _ in configs]
    for round_ in range(args.repeats):
        for config, done in zip(configs, runs):
            if config["mode"].startswith("pool"):
                result = measure_pool(args, apply_fn, params, config["actors"], config["envs_per_actor"])
            else:
                result = measure_fleet(args, apply_fn, params, config["processes"], config["placement"],
                                       config["cpu_mode"])
            done.append(dict(config, **result))
            print(f"round {round_ + 1}/{args.repeats} {config['mode']:18s} {config['processes']} process(es): "
                  f"{result['steps_per_s']:,.0f} steps/s", flush=True)
    rows = [_median_row(done) for done in runs]
    reference = max((r for r in rows if r["mode"].startswith("pool")), key=lambda r: r["steps_per_s"])
    for r in rows:
        r["ratio_to_pool"] = r["steps_per_s"] / reference["steps_per_s"]
        if "cpus_busy" in r:
            r["cpu_ceiling"] = (os.cpu_count() or 1) / r["cpus_busy"] * r["steps_per_s"] / reference["steps_per_s"]
    return rows


def solve_run(args: Args, processes: Optional[int], seed: int) -> dict:
    """One `experiments.train` subprocess on CartPole-v1; its solve time from its report."""
    name = ("single" if processes is None else f"processes{processes}") + f"-seed{seed}"
    out = os.path.join(args.out + "_solve", name)
    if os.path.exists(os.path.join(out, "report.jsonl")):
        os.remove(os.path.join(out, "report.jsonl"))  # the report appends; one line per run here
    command = [sys.executable, "-m", "experiments.train", "--seed", str(seed), "--out", out,
               "--no-progress", "--no-plots", "--no-track-tensorboard", "--no-save-checkpoint",
               "--max-seconds", str(args.solve_max_seconds)]
    if args.solve_total_steps is not None:
        command += ["--total-steps", str(args.solve_total_steps)]
    if processes is not None:
        command += ["--processes", str(processes), *shlex.split(args.solve_fleet_args)]
    t0, launched = _clock(), time.time()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = _clock() - t0
    with open(os.path.join(out, "report.jsonl")) as f:
        line = json.loads(f.readlines()[-1])
    learning = line["learning"]
    return dict(run=name, processes=processes or 1, seed=seed, solved_at_seconds=learning["solved_at_seconds"],
                launch_to_solve_s=None if line["solved_at"] is None else line["solved_at"] - launched,
                launch_to_first_update_s=line["training_started_at"] + line["learning_curve"]["seconds"][0] - launched,
                solved_at_steps=learning["solved_at_steps"], stop_reason=learning["stop_reason"],
                steps_per_s=line["throughput"]["steps_per_sec"], wall_s=wall)


def fleet_start_floor(args: Args) -> dict:
    """What any `--processes N` solve run spends before it can learn, measured in this process:
    from before Ray starts to the first trajectory of an ActorFleet with the main job's CartPole
    settings (its persistent compilation cache warm from the solve runs), Ray shut down after."""
    from experiments import train
    from experiments.lib import fleet_job, presets, tasks

    flags = ["--processes", str(args.solve_processes), *shlex.split(args.solve_fleet_args)]
    train_args = presets.resolve(tyro.cli(train.Args, args=flags))
    task = tasks.probe(train_args.env)
    learner = train.make_learner(train_args, train.make_network(train_args, task))
    state = learner.init(jax.random.PRNGKey(0), task.example_obs, task.action_space)
    t0 = _clock()
    fleet = fleet_job.make_fleet(train_args, task, learner, state, num_processes=train_args.processes)
    with fleet:
        started = _clock()
        fleet.get(timeout=120)
        first = _clock()
    return dict(processes=train_args.processes, ray_and_fleet_start_s=started - t0, first_trajectory_s=first - t0)


def evaluate_targets(rows: list[dict], solves: list[dict], args: Args, floor: Optional[dict] = None) -> list[dict]:
    """The targets, measured (shown, never asserted: timings depend on the machine)."""
    targets = []
    two = [r for r in rows if r["processes"] == 2 and r["mode"].startswith("fleet")]
    if two:
        best = max(two, key=lambda r: r["ratio_to_pool"])
        targets.append(dict(target=f"{args.num_envs} CartPole envs, 2 processes ({best['mode']}) >= 1.6x the pool",
                            value=best["ratio_to_pool"], met=best["ratio_to_pool"] >= 1.6))
        ceiling = max(r.get("cpu_ceiling", 0.0) for r in rows)
        targets.append(dict(target="(floor) the CPU ceiling: CPUs / CPUs the best pool kept busy, x pool",
                            value=ceiling, met=ceiling >= 1.6))
    # Launch to solve: from the launch of the process to the update at which the rule held, so
    # that start-up (imports, Ray, compiling) counts for both.
    for single, fleet in zip(solves[::2], solves[1::2]):
        met = (fleet["launch_to_solve_s"] is not None and
               (single["launch_to_solve_s"] is None or fleet["launch_to_solve_s"] < single["launch_to_solve_s"]))
        targets.append(dict(target=f"seed {fleet['seed']}: solve CartPole with --processes {fleet['processes']} "
                                   f"sooner after launch than one process ({_f(single['launch_to_solve_s'], '{:.1f}')} s)",
                            value=fleet["launch_to_solve_s"], met=met))
        # The floor: before its first update a run cannot have solved; a fleet whose first update
        # comes after one process had solved cannot win that seed, however it learns.
        targets.append(dict(target=f"(floor) seed {fleet['seed']}: the fleet's first update, s after launch, "
                                   f"before one process solved", value=fleet["launch_to_first_update_s"],
                            met=single["launch_to_solve_s"] is None
                            or fleet["launch_to_first_update_s"] < single["launch_to_solve_s"]))
    if floor is not None:
        targets.append(dict(target=f"(where it goes) Ray and {floor['processes']} processes, started in this "
                                   f"process, to their first trajectory, s", value=floor["first_trajectory_s"],
                            met=None))
    return targets


def _f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)


def render(rows: list[dict], solves: list[dict], targets: list[dict], args: Args) -> str:
    lines = [f"## ActorFleet: CartPole-v1, {args.num_envs} environments, {os.cpu_count()} CPUs", ""]
    if rows:
        lines += [f"Median of {args.repeats} interleaved rounds ({args.duration:g} s each); pool rows: the CPUs the "
                  "process kept busy and the ceiling that sets on any split of the same work.", "",
                  "| configuration | processes | steps/s | x pool | rounds (steps/s) | per process steps/s | CPUs busy "
                  "(ceiling x pool) |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            shape = (f" ({r['actors']} x {r['envs_per_actor']})" if "actors" in r else "")
            per = ", ".join(f"{x:,.0f}" for x in r.get("per_process_steps_per_s", ()))
            rounds = ", ".join(f"{x:,.0f}" for x in r["runs_steps_per_s"])
            busy = f"{r['cpus_busy']:.2f} ({r['cpu_ceiling']:.2f})" if "cpus_busy" in r else "-"
            lines.append(f"| {r['mode']}{shape} | {r['processes']} | {r['steps_per_s']:,.0f} | "
                         f"{r['ratio_to_pool']:.2f} | {rounds} | {per or '-'} | {busy} |")
    if solves:
        lines += ["", "| solve run | processes | launch to solve (s) | training to solve (s) | solved at (steps) | "
                  "stop | steps/s |", "|---|---|---|---|---|---|---|"]  # the seed is in the run's name
        for s in solves:
            lines.append(f"| {s['run']} | {s['processes']} | {_f(s['launch_to_solve_s'], '{:.1f}')} | "
                         f"{_f(s['solved_at_seconds'], '{:.1f}')} | {_f(s['solved_at_steps'])} | {s['stop_reason']} | "
                         f"{s['steps_per_s']:,.0f} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in targets:
        met = "-" if t["met"] is None else "yes" if t["met"] else "no"
        lines.append(f"| {t['target']} | {_f(t['value'], '{:.2f}')} | {met} |")
    return "\n".join(lines)


def main(args: Args) -> dict:
    if args.quick:
        args = dataclasses.replace(args, warmup=0.5, duration=0.5, solve=False, repeats=1)
    rows = []
    if args.throughput:
        print(rlbatch.configure_cpu_jax())
        owns_ray = connect(None, max(os.cpu_count() or 1, 1 + max(args.processes)))
        try:
            # After Ray started: its processes descend from its own, with every CPU.
            print(runtime.pin_python_threads(args.pin_python))
            rows = throughput_rows(args)
        finally:
            if owns_ray:
                ray.shutdown()
    # One process, then the fleet, for each seed: a pair measured back to back.
    solves = [solve_run(args, processes, seed) for seed in (args.solve_seeds if args.solve else ())
              for processes in (None, args.solve_processes)]
    floor = fleet_start_floor(args) if args.solve else None
    targets = evaluate_targets(rows, solves, args, floor)
    table = render(rows, solves, targets, args)
    print(table)
    result = dict(args=dataclasses.asdict(args), cpus=os.cpu_count(), rows=rows, solves=solves, fleet_start=floor,
                  targets=targets)
    outputs.write(args.out, result, table)
    return result


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.bench_fleet", description=__doc__))
