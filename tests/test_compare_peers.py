"""experiments.compare_peers and its parts (experiments.lib.peers, experiments.lib.peer_process).

Nothing here imports SBX: it is not in the test install. The solve rule, the table and JSON, and
the parsing of each runner's result are checked on known records; the script runs for real with
only the rlbatch peer. No time is asserted, only where each figure comes from.
"""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from experiments import compare_peers
from experiments.lib import peer_process
from experiments.lib.peers import (SOLVE_RULES, PeerRun, SolveRule, as_json, format_markdown, mean_row, rule_for,
                                   rule_holds)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CARTPOLE = SolveRule(threshold=475.0, window=100)


# ------------------------------------------------------------------ the solve rule


def test_rule_needs_a_full_window_of_episodes():
    assert not rule_holds([500.0] * 99, CARTPOLE)
    assert rule_holds([500.0] * 100, CARTPOLE)


def test_rule_holds_at_the_threshold_and_not_just_below():
    assert rule_holds([475.0] * 100, CARTPOLE)
    assert not rule_holds([475.0] * 99 + [474.0], CARTPOLE)


def test_rule_reads_only_the_last_window_of_returns():
    old_failures = [9.0] * 50
    assert rule_holds(old_failures + [480.0] * 100, CARTPOLE)
    # the newest episodes decide: a good start followed by a bad window is not solved
    assert not rule_holds([500.0] * 100 + [100.0] * 100, CARTPOLE)


def test_rule_of_twenty_episodes_as_the_mujoco_tasks_use():
    hopper = SOLVE_RULES["Hopper-v5"]
    assert hopper == SolveRule(threshold=2383.0, window=20)
    assert not rule_holds([2400.0] * 19, hopper)
    assert rule_holds([0.0] * 30 + [2383.0] * 10 + [2400.0] * 10, hopper)
    assert not rule_holds([2383.0] * 19 + [2300.0], hopper)


def test_rule_for_reads_the_table_and_takes_overrides():
    assert rule_for("CartPole-v1") == CARTPOLE
    assert rule_for("HalfCheetah-v5") == SolveRule(threshold=1442.6, window=20)
    assert rule_for("CartPole-v1", threshold=200.0) == SolveRule(threshold=200.0, window=100)
    assert rule_for("rlbatch/Catch-v0", threshold=0.9, window=10) == SolveRule(threshold=0.9, window=10)


def test_rule_for_an_unknown_task_without_both_settings_names_it():
    with pytest.raises(ValueError, match=r"solve rule for 'Acrobot-v1': expected a task of .*got threshold=-100"):
        rule_for("Acrobot-v1", threshold=-100.0)
    with pytest.raises(ValueError, match=r"expected a window of at least 1 episode, got 0"):
        rule_for("CartPole-v1", window=0)


# ------------------------------------------------------------------ the table and the JSON


def two_peers_runs():
    return [
        PeerRun("rlbatch", 0, process_seconds=30.0, seconds_to_threshold=20.0, steps_to_threshold=160_000,
                env_steps=161_000, stop_reason="condition", seconds_to_training=6.0),
        PeerRun("sbx", 0, process_seconds=28.0, seconds_to_threshold=27.0, steps_to_threshold=70_000,
                env_steps=70_000, stop_reason="condition", seconds_to_training=5.0),
        PeerRun("rlbatch", 1, process_seconds=40.0, seconds_to_threshold=30.0, steps_to_threshold=170_000,
                env_steps=171_000, stop_reason="condition", seconds_to_training=8.0),
        PeerRun("sbx", 1, process_seconds=50.0, seconds_to_threshold=None, steps_to_threshold=None,
                env_steps=100_000, stop_reason="budget", seconds_to_training=None),
    ]


def test_mean_row_takes_threshold_figures_over_solved_runs_only():
    runs = two_peers_runs()
    assert mean_row([r for r in runs if r.peer == "rlbatch"]) == {
        "runs": 2, "solved": 2, "process_seconds": 35.0, "seconds_to_training": 7.0, "seconds_to_threshold": 25.0,
        "steps_to_threshold": 165_000}
    assert mean_row([r for r in runs if r.peer == "sbx"]) == {
        "runs": 2, "solved": 1, "process_seconds": 39.0, "seconds_to_training": 5.0, "seconds_to_threshold": 27.0,
        "steps_to_threshold": 70_000}


def test_mean_row_of_a_peer_that_never_solved_has_no_threshold_figures():
    never = [PeerRun("sbx", 0, 10.0, None, None, 5, "failed")]
    assert mean_row(never) == {"runs": 1, "solved": 0, "process_seconds": 10.0, "seconds_to_training": None,
                               "seconds_to_threshold": None, "steps_to_threshold": None}


def test_json_holds_task_rule_runs_and_means_per_peer():
    out = json.loads(json.dumps(as_json("CartPole-v1", CARTPOLE, two_peers_runs())))
    assert out["env"] == "CartPole-v1" and out["rule"] == {"threshold": 475.0, "window": 100}
    assert [(r["peer"], r["seed"]) for r in out["runs"]] == [("rlbatch", 0), ("sbx", 0), ("rlbatch", 1), ("sbx", 1)]
    assert out["runs"][3]["seconds_to_threshold"] is None and out["runs"][3]["stop_reason"] == "budget"
    assert list(out["mean"]) == ["rlbatch", "sbx"]
    assert out["mean"]["sbx"]["solved"] == 1


def test_markdown_table_has_a_row_per_run_then_a_mean_row_per_peer():
    table = format_markdown("CartPole-v1", CARTPOLE, two_peers_runs())
    lines = table.splitlines()
    assert "last 100 episodes >= 475" in lines[0]
    rows = [line for line in lines if line.startswith("| rlbatch") or line.startswith("| sbx")]
    assert rows == [
        "| rlbatch | 0 | 30.0 | 6.0 | 20.0 | 160,000 | 161,000 | condition |",
        "| sbx | 0 | 28.0 | 5.0 | 27.0 | 70,000 | 70,000 | condition |",
        "| rlbatch | 1 | 40.0 | 8.0 | 30.0 | 170,000 | 171,000 | condition |",
        "| sbx | 1 | 50.0 | - | - | - | 100,000 | budget |",
        "| rlbatch | mean | 35.0 | 7.0 | 25.0 | 165,000 | | solved 2/2 |",
        "| sbx | mean | 39.0 | 5.0 | 27.0 | 70,000 | | solved 1/2 |",
    ]


# ------------------------------------------------------------------ each runner's result


def finished(returncode=0, stdout="", seconds=30.0, launched_at=1000.0):
    return peer_process.TimedProcess(returncode=returncode, launched_at=launched_at, seconds=seconds,
                                     stdout=stdout, stdout_path="x.stdout", stderr_path="x.stderr")


def test_sbx_result_puts_the_runners_unix_times_on_the_launch_scale():
    line = json.dumps({"peer": "sbx", "training_started_at": 1004.0, "solved_at": 1025.5,
                       "steps_to_threshold": 64_000, "env_steps": 64_000,
                       "stop_reason": "condition"})
    run = compare_peers.sbx_result(3, finished(stdout=f"noise\n{line}\n", launched_at=1000.0))
    assert (run.peer, run.seed, run.process_seconds) == ("sbx", 3, 30.0)
    assert run.seconds_to_threshold == 25.5 and run.steps_to_threshold == 64_000
    assert run.seconds_to_training == 4.0
    assert run.stop_reason == "condition"


def test_sbx_result_of_a_failed_runner_says_where_its_output_is():
    run = compare_peers.sbx_result(0, finished(returncode=1))
    assert run.stop_reason == "failed" and run.seconds_to_threshold is None
    assert run.note == "experiments.lib.sbx_runner exited with status 1; see x.stderr"


def write_report(path, learning, env_steps, **extra):
    path.write_text(json.dumps({"learning": {"stop_reason": "old"}}) + "\n"
                    + json.dumps({"throughput": {"env_steps": env_steps}, "learning": learning, **extra}) + "\n")


def test_rlbatch_result_puts_the_reports_unix_times_on_the_launch_scale(tmp_path):
    report = tmp_path / "report.jsonl"
    write_report(report, {"stop_reason": "condition", "solved_at_seconds": 12.5, "solved_at_steps": 150_000},
                 env_steps=151_000, training_started_at=1008.0, solved_at=1020.5)
    run = compare_peers.rlbatch_result(1, finished(launched_at=1000.0), str(report))
    assert run.seconds_to_threshold == 20.5 and run.steps_to_threshold == 150_000 and run.seconds_to_training == 8.0
    assert (run.env_steps, run.stop_reason) == (151_000, "condition")


def test_rlbatch_result_of_an_unsolved_run_gives_no_solve_time(tmp_path):
    report = tmp_path / "report.jsonl"
    write_report(report, {"stop_reason": "total_steps", "solved_at_seconds": None, "solved_at_steps": None}, 1,
                 training_started_at=1008.0, solved_at=None)
    run = compare_peers.rlbatch_result(1, finished(), str(report))
    assert run.seconds_to_threshold is None and run.steps_to_threshold is None
    assert run.stop_reason == "total_steps" and run.seconds_to_training == 8.0


def test_rlbatch_result_without_a_report_says_so(tmp_path):
    run = compare_peers.rlbatch_result(0, finished(), str(tmp_path / "missing.jsonl"))
    assert run.stop_reason == "failed" and "expected a JSON report at" in run.note


# ------------------------------------------------------------------ the timed process


def test_run_timed_keeps_the_output_and_the_exit_status(tmp_path):
    child = textwrap.dedent("""
        import sys, time
        print("to stdout")
        sys.stderr.write("before "); sys.stderr.flush()
        time.sleep(0.3)  # the second piece arrives as a read of its own
        sys.stderr.write("after"); sys.stderr.flush()
        sys.exit(3)
    """)
    proc = peer_process.run_timed([sys.executable, "-c", child], str(tmp_path), "child", echo_stderr=False)
    assert proc.returncode == 3 and proc.stdout == "to stdout\n" and proc.seconds >= 0.3
    assert pathlib.Path(proc.stderr_path).read_text() == "before after"
    assert pathlib.Path(proc.stdout_path).read_text() == "to stdout\n"



# ------------------------------------------------------------------ the script


def test_rlbatch_peer_gets_the_rules_window(tmp_path):
    rule = rule_for("HalfCheetah-v5")
    command = compare_peers.rlbatch_command(compare_peers.Args(env="HalfCheetah-v5"), rule, 0, str(tmp_path))
    assert command[command.index("--solve-window") + 1] == "20"
    assert command[command.index("--solve-return") + 1] == "1442.6"


def run_script(*flags, timeout=240):
    return subprocess.run([sys.executable, "-m", "experiments.compare_peers", *flags], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", COLUMNS="200"), capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_option():
    proc = run_script("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--env", "--seeds", "--peers", "--total-steps", "--max-seconds", "--solve-return",
                 "--solve-window", "--train-args", "--out"):
        assert flag in proc.stdout


SMALL_TRAIN = "--train-args=--num-actors 8 --buckets 8 --batch-size 16"


def test_rlbatch_peer_at_a_tiny_budget_writes_its_run_to_json(tmp_path):
    out = tmp_path / "cmp"
    proc = run_script("--peers", "rlbatch", "--seeds", "0", "--total-steps", "500", SMALL_TRAIN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "compare_peers.json").read_text())
    assert result["env"] == "CartPole-v1" and result["rule"] == {"threshold": 475.0, "window": 100}
    [run] = result["runs"]
    assert (run["peer"], run["seed"], run["stop_reason"]) == ("rlbatch", 0, "budget")
    assert run["env_steps"] >= 500 and run["process_seconds"] > 0
    assert run["seconds_to_threshold"] is None and run["steps_to_threshold"] is None
    assert result["mean"]["rlbatch"]["solved"] == 0
    assert "| rlbatch | 0 |" in proc.stdout and result["table"] in proc.stdout
    assert (out / "rlbatch-seed0" / "report.jsonl").exists()


def test_rlbatch_peer_that_solves_reports_the_moment_within_its_process(tmp_path):
    # a threshold every CartPole episode reaches: solved at the first update, after 100 episodes
    out = tmp_path / "cmp"
    proc = run_script("--peers", "rlbatch", "--seeds", "1", "--total-steps", "200000", "--solve-return", "1",
                      SMALL_TRAIN, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    [run] = json.loads((out / "compare_peers.json").read_text())["runs"]
    assert run["stop_reason"] == "condition"
    report = json.loads((out / "rlbatch-seed1" / "report.jsonl").read_text().splitlines()[-1])
    assert run["steps_to_threshold"] == report["learning"]["solved_at_steps"] >= 100
    assert 0 < run["seconds_to_training"] < run["seconds_to_threshold"] <= run["process_seconds"]
    solved_in_run = report["learning"]["solved_at_seconds"]
    assert run["seconds_to_threshold"] == pytest.approx(run["seconds_to_training"] + solved_in_run, abs=0.05)
