"""The main job and the fleet benchmark on Ray, from their users' side: `experiments.train --processes
2` writes its report with the per-process figures, its learning curve, TensorBoard scalars and a
checkpoint; `experiments.bench_fleet --quick` writes every row; neither leaves a process behind.

Each run is a subprocess carrying a marker in its environment, which every process Ray starts for
it inherits: the processes still carrying it afterwards are the ones it left (other Ray instances
on the machine do not count). Budgets are tiny: these check what the runs write, never how fast.
"""
import json
import os
import pathlib
import subprocess
import sys
import uuid

import pytest

from experiments import bench_fleet
from experiments.lib import checkpoints
from tests.test_train_job import read_scalars

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARK = "RLBATCH_FLEET_JOB_TEST"


def processes_marked(mark: str) -> list[str]:
    """`pid cmdline` of every process whose environment carries MARK=mark."""
    found, needle = [], f"{MARK}={mark}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry} {cmdline}")
        except OSError:
            continue  # exited meanwhile, or not ours to read
    return found


def run_module(module, *flags):
    """Runs `python -m module flags` with a marker; asserts it succeeded and left no process."""
    mark = uuid.uuid4().hex
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **{MARK: mark})
    proc = subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"{module} exited with {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    left = processes_marked(mark)
    assert not left, f"{module} left processes behind: {left}"
    return proc.stdout


def test_train_with_two_processes_writes_per_process_figures_curve_scalars_and_checkpoint(tmp_path):
    out = tmp_path / "fleet"
    stdout = run_module("experiments.train", "--out", str(out), "--no-progress", "--no-plots", "--processes", "2",
                        "--num-actors", "2", "--envs-per-actor", "4", "--buckets", "8", "--batch-size", "2",
                        "--unroll-length", "16", "--total-steps", "1500", "--max-seconds", "60")
    report = json.loads((out / "report.jsonl").read_text().splitlines()[-1])

    fleet = report["fleet"]
    assert fleet["num_processes"] == 2 and [p["index"] for p in fleet["processes"]] == [0, 1]
    for key in ("steps_per_sec", "restarts", "trajectories_lost", "env_steps"):
        assert all(key in p for p in fleet["processes"]), key
    assert fleet["env_steps"] == sum(p["env_steps"] for p in fleet["processes"]) == report["throughput"]["env_steps"]
    assert fleet["env_steps"] >= 1500 and fleet["restarts"] == 0 and fleet["trajectory_bytes"] > 0
    assert fleet["param_bytes"] > 0 and fleet["params_version"] == report["learning"]["updates"]
    assert report["throughput"]["steps_per_sec"] > 0 and report["learning"]["stop_reason"] == "budget"
    assert "process 1" in stdout and "fleet: 2 processes" in stdout

    assert report["learning_curve"] and report["learning_curve"]["env_steps"]
    metadata = checkpoints.read_metadata(report["checkpoint"])
    assert metadata["env_steps"] == fleet["env_steps"] and metadata["args"]["processes"] == 2
    scalars = read_scalars(out / "tensorboard")
    assert scalars.get("charts/SPS") and any(tag.startswith("losses/") for tag in scalars)


def test_bench_fleet_quick_writes_every_row(tmp_path):
    out = tmp_path / "bench"
    run_module("experiments.bench_fleet", "--quick", "--out", str(out), "--processes", "1", "2",
               "--cpu-modes", "pinned", "--no-pin-python")
    result = json.loads(out.with_suffix(".json").read_text())
    modes = [(r["mode"], r["processes"]) for r in result["rows"]]
    assert modes == [("pool-grouped", 1), ("pool-single", 1), ("fleet-local-pinned", 1), ("fleet-local-pinned", 2),
                     ("fleet-server-pinned", 1), ("fleet-server-pinned", 2)]
    assert all(r["steps_per_s"] > 0 and len(r["runs_steps_per_s"]) == 1 for r in result["rows"])
    assert max(r["ratio_to_pool"] for r in result["rows"] if r["mode"].startswith("pool")) == 1.0
    assert [len(r["per_process_steps_per_s"]) for r in result["rows"][2:]] == [1, 2, 1, 2]
    pools = result["rows"][:2]
    assert all(0 < r["cpus_busy"] <= result["cpus"] + 0.5 and r["cpu_ceiling"] > 0 for r in pools)
    table = out.with_suffix(".md").read_text()
    assert table.count("| fleet-") == 4 and "2 processes" in table and ">= 1.6x" in table
    assert "CPU ceiling" in table


def _solve(processes, seconds, seed=0, first=6.0):
    return dict(run=f"p{processes}", processes=processes, seed=seed, solved_at_seconds=seconds,
                launch_to_solve_s=None if seconds is None else seconds + 5.0, launch_to_first_update_s=first,
                solved_at_steps=None,
                stop_reason="condition" if seconds is not None else "time", steps_per_s=1.0, wall_s=1.0)


def test_the_solve_target_needs_the_fleet_solved_and_sooner():
    args = bench_fleet.Args()
    met = lambda single, fleet: bench_fleet.evaluate_targets([], [_solve(1, single), _solve(2, fleet)], args)[0]["met"]
    assert met(30.0, 20.0) and met(None, 20.0)
    assert not met(20.0, 30.0) and not met(20.0, None) and not met(None, None)
    table = bench_fleet.render([], [_solve(1, 30.0), _solve(2, None)], [], args)
    assert "| p1 | 1 | 35.0 | 30.0 |" in table and "| p2 | 2 | - | - |" in table
    assert "| configuration |" not in table  # no steps/s rows measured: no empty table
    # One target per seed, each judged on its own pair (one process, then the fleet).
    seeds = [_solve(1, 30.0, 0), _solve(2, 20.0, 0), _solve(1, 10.0, 1), _solve(2, 20.0, 1)]
    targets = [t for t in bench_fleet.evaluate_targets([], seeds, args) if "(floor)" not in t["target"]]
    assert [t["met"] for t in targets] == [True, False]
    assert "seed 0" in targets[0]["target"] and "seed 1" in targets[1]["target"]
    # The floor: a fleet whose first update comes after one process solved cannot win that seed.
    late = bench_fleet.evaluate_targets([], [_solve(1, 10.0), _solve(2, 30.0, first=16.0)], args)
    assert [t["met"] for t in late] == [False, False] and "(floor)" in late[1]["target"] and late[1]["value"] == 16.0
    early = bench_fleet.evaluate_targets([], [_solve(1, 10.0), _solve(2, 30.0, first=12.0)], args)
    assert [t["met"] for t in early] == [False, True]
    where = bench_fleet.evaluate_targets([], seeds, args, dict(processes=2, first_trajectory_s=4.0))[-1]
    assert where["met"] is None and where["value"] == 4.0
    assert "| - |" in bench_fleet.render([], seeds, [where], args)


def test_help_of_train_and_bench_fleet_says_what_the_fleet_flags_do():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    help_of = lambda module: subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                                            capture_output=True, text=True, timeout=120).stdout
    train_help = " ".join(help_of("experiments.train").split())
    for flag in ("--processes", "--placement", "--address"):
        assert flag in train_help
    assert "actor threads, per process with --processes" in train_help
    bench_help = " ".join(help_of("experiments.bench_fleet").split())
    assert bench_fleet.__doc__.splitlines()[0] in bench_help
    for field in ("--num-envs", "--processes", "--placements", "--quick", "--solve-max-seconds", "--out"):
        assert field in bench_help, field


def test_fleet_flags_without_a_fleet_or_with_no_processes_are_refused_before_anything_starts():
    from experiments import train

    with pytest.raises(ValueError, match="expected N >= 1 actor processes, got 0"):
        train.build(train.Args(processes=0))
    with pytest.raises(ValueError, match="expected --processes N with them, got --placement server"):
        train.build(train.Args(placement="server"))
    with pytest.raises(ValueError, match="--address 127.0.0.1:6379 without --processes"):
        train.build(train.Args(address="127.0.0.1:6379"))


@pytest.mark.parametrize("env,pin", [("CartPole-v1", True), ("HalfCheetah-v5", False)])
def test_the_main_jobs_fleet_pins_its_processes_for_classic_control_only(env, pin):
    """--pin-python reaches the fleet's processes where it reaches one process's threads: classic control."""
    import jax

    from experiments import train
    from experiments.lib import fleet_job, presets, tasks

    args = presets.resolve(train.Args(env=env, processes=2))
    task = tasks.probe(args.env)
    learner = train.make_learner(args, train.make_network(args, task))
    state = learner.init(jax.random.PRNGKey(0), task.example_obs, task.action_space)
    fleet = fleet_job.make_fleet(args, task, learner, state, num_processes=2)  # never started: no Ray
    assert fleet.config.pin_python is pin and fleet.config.sync_cpu_dispatch
    unpinned = fleet_job.make_fleet(presets.resolve(train.Args(env=env, processes=2, pin_python=False)), task,
                                    learner, state, num_processes=2)
    assert unpinned.config.pin_python is False
