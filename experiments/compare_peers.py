"""rlbatch's main job against SBX PPO on the same task, solve rule and seeds, one process after another.

Each peer runs as its own process, so its wall time counts start-up, imports and compilation:
- rlbatch: `python -m experiments.train --env E --seed S --solve-return R ...` (its defaults otherwise);
- sbx: `python -m experiments.lib.sbx_runner` (SBX PPO with rl-baselines3-zoo's settings).
Both stop when the rule holds (the mean return of the last `window` episodes >= threshold, from
experiments.lib.peers.SOLVE_RULES) or at the step or time budget. For each peer and seed it prints
the process wall time, the seconds from launch to the start of training and to the moment the rule
first held, and the env steps then, as a Markdown table, and writes them as JSON
(`<out>/compare_peers.json`) beside each process's output.

    python -m experiments.compare_peers                              # CartPole-v1, seeds 0 1 2
    python -m experiments.compare_peers --seeds 0 --peers rlbatch    # without SBX installed

The sbx peer needs `pip install -e .[peers]` (README, "Comparing with SBX"). Both peers report
their moments (start of training, rule first held) as Unix times, placed on the launch's clock.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from typing import Literal, Optional

import tyro

from experiments.lib.peer_process import TimedProcess, run_timed
from experiments.lib.peers import PeerRun, SolveRule, as_json, format_markdown, rule_for

Peer = Literal["rlbatch", "sbx"]
@dataclasses.dataclass(frozen=True)
class Args:
    env: str = "CartPole-v1"
    """gymnasium id of the task: one of experiments.lib.peers.SOLVE_RULES, or any with both --solve-* flags"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds, each run by every peer"""
    peers: tuple[Peer, ...] = ("rlbatch", "sbx")
    """which peers to run, in this order for each seed"""
    total_steps: int = 2_000_000
    """env step budget of each run"""
    max_seconds: float = 600.0
    """wall-clock budget of each run in seconds"""
    solve_return: Optional[float] = None
    """threshold of the solve rule; None: the task's"""
    solve_window: Optional[int] = None
    """episodes in the solve rule's mean; None: the task's"""
    train_args: str = ""
    """more flags for experiments.train, as one string given with "=": --train-args="--num-actors 128" """
    out: str = "runs/compare_peers"
    """directory for the JSON and each process's output"""


def rlbatch_command(args: Args, rule: SolveRule, seed: int, out_dir: str) -> list[str]:
    return [sys.executable, "-m", "experiments.train", "--env", args.env, "--seed", str(seed),
            "--total-steps", str(args.total_steps), "--max-seconds", str(args.max_seconds),
            "--solve-return", repr(rule.threshold), "--solve-window", str(rule.window), "--out", out_dir,
            "--no-plots", *shlex.split(args.train_args)]


def sbx_command(args: Args, rule: SolveRule, seed: int) -> list[str]:
    return [sys.executable, "-m", "experiments.lib.sbx_runner", "--env", args.env, "--seed", str(seed),
            "--total-steps", str(args.total_steps), "--max-seconds", str(args.max_seconds),
            "--solve-return", repr(rule.threshold), "--solve-window", str(rule.window)]


def _failed(peer: str, seed: int, proc: TimedProcess, why: str) -> PeerRun:
    return PeerRun(peer=peer, seed=seed, process_seconds=proc.seconds, seconds_to_threshold=None,
                   steps_to_threshold=None, env_steps=None, stop_reason="failed",
                   note=f"{why}; see {proc.stderr_path}")


def rlbatch_result(seed: int, proc: TimedProcess, report_path: str) -> PeerRun:
    """rlbatch's run from its process and the last line of its JSON report."""
    if proc.returncode != 0:
        return _failed("rlbatch", seed, proc, f"experiments.train exited with status {proc.returncode}")
    try:
        with open(report_path) as f:
            report = json.loads(f.read().splitlines()[-1])
    except (OSError, IndexError, ValueError) as e:
        return _failed("rlbatch", seed, proc, f"expected a JSON report at {report_path}, got {e!r}")
    learning, throughput = report.get("learning", {}), report.get("throughput", {})
    solved_at, training_at = report.get("solved_at"), report.get("training_started_at")
    return PeerRun(peer="rlbatch", seed=seed, process_seconds=proc.seconds,
                   seconds_to_threshold=None if solved_at is None else proc.seconds_since_launch(solved_at),
                   steps_to_threshold=learning.get("solved_at_steps") if solved_at is not None else None,
                   env_steps=throughput.get("env_steps"), stop_reason=learning.get("stop_reason", "unknown"),
                   seconds_to_training=None if training_at is None else proc.seconds_since_launch(training_at),
                   note="s to threshold = launch -> the report's solved_at (Unix time of the first update "
                        "after which the rule held)")


def sbx_result(seed: int, proc: TimedProcess) -> PeerRun:
    """SBX's run from its process and the JSON line the runner prints last."""
    if proc.returncode != 0:
        return _failed("sbx", seed, proc, f"experiments.lib.sbx_runner exited with status {proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError) as e:
        return _failed("sbx", seed, proc, f"expected a JSON line last on the runner's stdout, got {e!r}")
    solved_at, training_at = result.get("solved_at"), result.get("training_started_at")
    return PeerRun(peer="sbx", seed=seed, process_seconds=proc.seconds,
                   seconds_to_threshold=None if solved_at is None else proc.seconds_since_launch(solved_at),
                   steps_to_threshold=result.get("steps_to_threshold"), env_steps=result.get("env_steps"),
                   stop_reason=result.get("stop_reason", "unknown"),
                   seconds_to_training=None if training_at is None else proc.seconds_since_launch(training_at),
                   note="s to threshold = launch -> the callback's first step with the rule holding")


def run_peer(peer: str, args: Args, rule: SolveRule, seed: int) -> PeerRun:
    """Runs one peer on one seed to its end."""
    name = f"{peer}-seed{seed}"
    run_dir = os.path.join(args.out, name)
    print(f"== {name} ==", flush=True)
    if peer == "rlbatch":
        report_path = os.path.join(run_dir, "report.jsonl")
        if os.path.exists(report_path):  # train.py appends: a report left by an earlier comparison must not count
            os.remove(report_path)
        proc = run_timed(rlbatch_command(args, rule, seed, run_dir), args.out, name)
        return rlbatch_result(seed, proc, report_path)
    if peer == "sbx":
        return sbx_result(seed, run_timed(sbx_command(args, rule, seed), args.out, name))
    raise ValueError(f"compare_peers --peers: expected rlbatch or sbx, got {peer!r}")


def main(args: Args) -> dict:
    rule = rule_for(args.env, args.solve_return, args.solve_window)
    runs = [run_peer(peer, args, rule, seed) for seed in args.seeds for peer in args.peers]
    table = format_markdown(args.env, rule, runs)
    print(table)
    result = as_json(args.env, rule, runs)
    result["table"] = table
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "compare_peers.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"json: {path}")
    return result


if __name__ == "__main__":
    main(tyro.cli(Args, prog="python -m experiments.compare_peers", description=__doc__))
