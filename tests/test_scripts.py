"""Smoke tests of the experiment scripts: each runs as a subprocess with tiny settings and writes its
tables and reports; their command lines take the flags their users type.

They check what the scripts report, never how fast anything was: timings belong to the benchmarks.
"""
import ast
import importlib
import inspect
import itertools
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import tyro

ROOT = pathlib.Path(__file__).resolve().parents[1]


SCRIPTS = ("train", "evaluate", "throughput", "bench_actors", "bench_batching", "bench_policy")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_option_with_its_docstring(script):
    proc = subprocess.run([sys.executable, "-m", f"experiments.{script}", "--help"], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", COLUMNS="200"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"usage: python -m experiments.{script}" in proc.stdout
    module = importlib.import_module(f"experiments.{script}")
    assert module.__doc__.splitlines()[0] in proc.stdout  # the module docstring describes the script
    for field, doc in field_docstrings(module.Args).items():
        flag = "--" + field.replace("_", "-")
        assert flag in proc.stdout, flag
        assert doc in " ".join(proc.stdout.replace("│", " ").split()), (flag, doc)


def field_docstrings(cls):
    """The string literal under each field of a dataclass, whitespace collapsed; every field has one."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {node.target.id: " ".join(nxt.value.value.split()) for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)}
    assert set(docs) == set(cls.__dataclass_fields__), set(cls.__dataclass_fields__) - set(docs)
    return docs


def test_train_takes_the_flags_its_users_type():
    from experiments.train import Args

    args = tyro.cli(Args, args=["--env", "rlbatch/Catch-v0", "--agent", "impala", "--num-actors", "8",
                                "--buckets", "8", "16", "32", "--no-pin-python", "--no-progress", "--no-plots",
                                "--solve-return", "0.9", "--max-policy-lag", "3", "--max-delay", "0.001"])
    assert args == Args(env="rlbatch/Catch-v0", agent="impala", num_actors=8, buckets=(8, 16, 32), pin_python=False,
                        progress=False, plots=False, solve_return=0.9, max_policy_lag=3, max_delay=0.001)
    assert tyro.cli(Args, args=[]) == Args()
    with pytest.raises(SystemExit):
        tyro.cli(Args, args=["--agent", "dqn"])
    args = tyro.cli(Args, args=["--env", "ALE/Pong-v5", "--network", "impala", "--hidden", "256", "256",
                                "--learning-rate", "1e-4", "--anneal-lr", "False", "--checkpoint-every", "50",
                                "--resume", "runs/train/checkpoint.npz", "--no-track-tensorboard",
                                "--no-save-checkpoint"])
    assert args == Args(env="ALE/Pong-v5", network="impala", hidden=(256, 256), learning_rate=1e-4, anneal_lr=False,
                        checkpoint_every=50, resume="runs/train/checkpoint.npz", track_tensorboard=False,
                        save_checkpoint=False)
    with pytest.raises(SystemExit):
        tyro.cli(Args, args=["--network", "resnet"])


def test_evaluate_takes_the_flags_its_users_type():
    from experiments.evaluate import Args

    args = tyro.cli(Args, args=["--checkpoint", "runs/train/checkpoint.npz", "--episodes", "5", "--greedy",
                                "--capture-video"])
    assert args == Args(checkpoint="runs/train/checkpoint.npz", episodes=5, greedy=True, capture_video=True)
    with pytest.raises(SystemExit):
        tyro.cli(Args, args=["--episodes", "5"])  # the checkpoint is required


def test_benchmarks_take_the_flags_their_users_type():
    from experiments import bench_actors, bench_batching, bench_policy, throughput

    args = tyro.cli(throughput.Args, args=["--quick", "--envs", "CartPole-v1", "--buckets", "8,16,32", "16,64",
                                           "--max-delay", "0.0005", "0.002", "--latency-budget-ms", "5",
                                           "--no-pin-python", "--num-actors", "16", "64"])
    assert (args.quick, args.envs, args.buckets, args.max_delay, args.latency_budget_ms, args.pin_python,
            args.num_actors) == (True, ("CartPole-v1",), ("8,16,32", "16,64"), (0.0005, 0.002), 5.0, False, (16, 64))
    args = tyro.cli(bench_policy.Args, args=["--cpu-dispatch", "sync", "--threads", "16", "256",
                                             "--seed-max-batch-size", "32"])
    assert (args.cpu_dispatch, args.threads, args.seed_max_batch_size) == ("sync", (16, 256), 32)
    args = tyro.cli(bench_actors.Args, args=["--num-envs", "64", "--group-size", "16", "--stop-actors", "8"])
    assert (args.num_envs, args.group_size, args.stop_actors) == ((64,), 16, 8)
    args = tyro.cli(bench_batching.Args, args=["--threads", "1", "16", "--max-batch-size", "32", "--repeats", "1"])
    assert (args.threads, args.max_batch_size, args.repeats) == ((1, 16), 32, 1)


def run_quick(module, out):
    """Runs `python -m module --quick --out out` from the repository root on the CPU; the JSON it wrote."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (f"{module} exited with {proc.returncode}:\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    assert "jax.devices()" in proc.stdout
    assert pathlib.Path(f"{out}.md").read_text().count("| target |") == 1
    assert_library_reports(out)
    return json.loads(pathlib.Path(f"{out}.json").read_text())


def assert_library_reports(out):
    """Every script also leaves rlbatch's own report of its rlbatch runs, with plots."""
    lines = pathlib.Path(f"{out}_reports.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["batching"]["batches"] > 0 for line in lines)
    assert pathlib.Path(f"{out}_report_batch_sizes.png").stat().st_size > 0


def test_bench_policy_refuses_an_unknown_cpu_dispatch_naming_it():
    from experiments import bench_policy

    with pytest.raises(SystemExit, match='"sync" or "async", got \'threads\''):
        bench_policy.main(bench_policy.Args(cpu_dispatch="threads"))


@pytest.mark.timeout(300)
def test_bench_policy_quick_writes_every_row(tmp_path):
    from experiments.bench_policy import MODES

    report = run_quick("experiments.bench_policy", tmp_path / "x")
    args = report["args"]
    assert args["quick"] is True and report["devices"]
    num_buckets = len(set(args["buckets"]))
    assert report["num_buckets"] == num_buckets
    rows = report["rows"]
    assert sorted((r["policy"], r["threads"], r["mode"]) for r in rows) == sorted(
        itertools.product(args["policies"], args["threads"], MODES))
    for r in rows:
        assert r["requests_per_s"] > 0 and r["ratio_to_seed_style"] > 0, r
        assert r["wall_us_per_request"] == pytest.approx(1e6 / r["requests_per_s"])
        assert 1 <= r["mean_batch"] <= max(args["buckets"]), r
        assert 0 < r["p50_ms"] <= r["p99_ms"], r
        if r["mode"] == "rlbatch":
            # compiled once per bucket when the service started, never while serving
            assert r["compile_count"] == num_buckets and r["compiles_during_run"] == 0, r
            assert r["mean_batch"] <= r["threads"], r
        elif r["mode"] == "seed-style":
            assert r["compile_count"] == 1 and r["compiles_during_run"] == 0, r
            assert r["ratio_to_seed_style"] == 1.0
        elif r["mode"] == "thread-floor":  # no policy at all; every round releases every thread
            assert r["compile_count"] == 0 and r["compiles_during_run"] == 0, r
            assert r["mean_batch"] == r["threads"], r
        else:  # no-buckets: one compilation per batch size met
            assert 1 <= r["compile_count"] <= max(args["buckets"]), r
            assert r["compiles_during_run"] <= r["compile_count"], r
    assert [o["policy"] for o in report["overhead"]] == list(args["policies"])
    for o in report["overhead"]:
        assert o["bare_call_us"] > 0 and o["rlbatch_us_per_request"] > 0
        assert o["overhead_us"] == pytest.approx(o["rlbatch_us_per_request"] - o["bare_call_us"])
    (padding,) = report["padding"]
    assert padding["requests"] == args["padding_requests"]
    assert padding["compile_count"] == num_buckets and padding["compiles_during_run"] == 0
    assert 0 <= padding["padding_fraction"] < 1
    # sizes 1..256 over buckets 8..256: 10816 padded rows in 43712
    assert padding["expected_padding_fraction"] == pytest.approx(10816 / 43712)
    assert report["targets"] and all(isinstance(t["met"], bool) for t in report["targets"])


@pytest.mark.timeout(300)
def test_bench_actors_quick_writes_every_row(tmp_path):
    from experiments.bench_actors import MODES

    report = run_quick("experiments.bench_actors", tmp_path / "x")
    args = report["args"]
    assert args["quick"] is True and report["devices"]
    rows = report["rows"]
    assert sorted((r["env"], r["num_envs"], r["mode"]) for r in rows) == sorted(
        itertools.product(args["envs"], args["num_envs"], MODES))
    for r in rows:
        assert r["steps_per_s"] > 0 and r["ratio_to_sync_vector"] > 0, r
        assert r["num_actors"] * r["envs_per_actor"] == r["num_envs"], r
        assert 0 < r["mean_batch"] <= r["num_envs"], r
        if r["mode"] == "sync-vector":
            assert r["ratio_to_sync_vector"] == 1.0
        if r["mode"] == "pool-grouped":
            assert 1 < r["envs_per_actor"] < r["num_envs"], r
    stop = report["stop"]
    assert stop["num_actors"] == args["stop_actors"] and stop["env_steps"] > 0
    assert stop["all_threads_joined"] is True and stop["envs_open_after"] == 0
    assert stop["stop_s"] > 0
    assert report["targets"] and all(isinstance(t["met"], bool) for t in report["targets"])


@pytest.mark.timeout(300)
def test_throughput_quick_writes_table_json_and_plots(tmp_path):
    from experiments.throughput import BASELINES, parse_buckets

    out = tmp_path / "tp"
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "experiments.throughput", "--quick", "--no-progress",
                           "--latency-budget-ms", "1000", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (f"experiments.throughput exited with {proc.returncode}:\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    assert "jax.devices()" in proc.stdout and "suggested max_batch_size=" in proc.stdout
    report = json.loads(pathlib.Path(f"{out}.json").read_text())
    args = report["args"]
    assert args["quick"] is True and report["devices"]
    bucket_sets = [list(parse_buckets(b)) for b in args["buckets"]]
    rows = report["rows"]
    assert sorted((r["env"], r["num_actors"], r["envs_per_actor"], r["buckets"], r["max_delay"]) for r in rows) == sorted(
        itertools.product(args["envs"], args["num_actors"], args["envs_per_actor"], bucket_sets, args["max_delay"]))
    base = {(b["env"], b["num_envs"], b["mode"]): b for b in report["baselines"]}
    assert set(base) == {(r["env"], r["num_envs"], mode) for r in rows for mode in BASELINES}
    assert all(b["steps_per_s"] > 0 for b in base.values())
    for r in rows:
        assert r["num_envs"] == r["num_actors"] * r["envs_per_actor"]
        assert r["steps_per_s"] > 0, r
        for mode in BASELINES:
            ratio = r["ratio_to_" + mode.replace("-", "_")]
            assert ratio == pytest.approx(r["steps_per_s"] / base[(r["env"], r["num_envs"], mode)]["steps_per_s"])
        assert 1 <= r["mean_batch"] <= max(r["buckets"]) and 0 <= r["padding_fraction"] < 1, r
        assert 0 < r["latency_p50_ms"] <= r["latency_p99_ms"], r
        assert sum(r["batch_size_hist"].values()) > 0
        s = r["summary"]  # the library's throughput report of this run
        assert s["config"]["env"] == r["env"] and s["config"]["buckets"] == r["buckets"]
        assert s["throughput"]["env_steps"] > 0 and len(s["throughput"]["series"]) >= 2
        assert s["batching"]["compile_count"] == len(r["buckets"]) and s["actors"]["env_errors"] == 0
        assert "latency_samples_ms" not in s["batching"]
    for env_id, best in report["best"].items():
        assert rows[best["row_index"]]["steps_per_s"] == max(r["steps_per_s"] for r in rows if r["env"] == env_id)
    assert set(report["suggestions"]) == set(args["envs"])
    for env_id, s in report["suggestions"].items():  # a 1 s budget: every row fits
        assert s["max_delay"] in args["max_delay"] and s["buckets"][-1] == s["max_batch_size"]
        assert s["expected_padding"] <= 0.25 and s["row"]["env"] == env_id
    md = pathlib.Path(f"{out}.md").read_text()
    assert md.count("| env | actors x envs |") == 1 and "Suggested settings" in md
    assert len(report["plots"]) >= 2 and all(pathlib.Path(p).exists() for p in report["plots"])
    assert pathlib.Path(f"{out}_steps_per_sec.png").exists()


@pytest.mark.timeout(300)
def test_bench_batching_quick_writes_every_row(tmp_path):
    from experiments.bench_batching import FUNCTIONS, MODES

    out = tmp_path / "x"
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_batching", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(pathlib.Path(f"{out}.json").read_text())
    rows = report["rows"]
    assert sorted((r["function"], r["threads"], r["mode"]) for r in rows) == sorted(
        itertools.product(FUNCTIONS, report["args"]["threads"], MODES))
    for r in rows:
        assert r["items_per_s"] > 0 and r["cpu_per_1k"] >= 0 and 0 < r["p50_ms"] <= r["p99_ms"], r
        if r["mode"] == "thread-floor":  # every round releases every thread
            assert r["mean_batch"] == r["threads"], r
        else:
            assert 1 <= r["mean_batch"] <= min(r["threads"], report["args"]["max_batch_size"]), r
        if r["mode"] == "seed-style":
            assert r["ratio_to_seed_style"] == 1.0
    # --quick measures 1 and 16 threads: the 16-thread target, beside the thread floor, per function
    assert sorted((t["function"], t["threads"]) for t in report["targets"]) == [(f, 16) for f in sorted(FUNCTIONS)]
    assert all(t["thread_floor"] > 0 and t["met"] == (t["measured"] >= t["target"]) for t in report["targets"])
    assert pathlib.Path(f"{out}.md").read_text().count("| function | threads | mode |") == 1
    assert_library_reports(out)


def test_train_script_runs_as_subprocess_and_writes_json_and_png(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    out = tmp_path / "train"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--env", "rlbatch/Catch-v0", "--num-actors", "8",
         "--unroll-length", "9", "--batch-size", "4", "--buckets", "8", "--total-steps", "3000",
         "--no-progress", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rlbatch throughput report" in proc.stdout
    summary = json.loads((out / "report.jsonl").read_text().splitlines()[-1])
    assert summary["throughput"]["env_steps"] >= 3000
    assert summary["learning"]["updates"] > 0 and summary["batching"]["compile_count"] == 1
    assert list(summary) == ["config", "time", "throughput", "actors", "stages", "batching", "learning",
                             "learning_curve", "checkpoint", "env_steps_offset", "resumed_from", "updates_total",
                             "training_started_at", "solved_at"]
    assert summary["solved_at"] is None or summary["solved_at"] > summary["training_started_at"]
    assert len(summary["stages"]) == 9 and summary["stages"]["learner_update"] > 0
    assert summary["config"]["num_actors"] == 8 and summary["config"]["buckets"] == [8]
    assert (out / "report_steps_per_sec.png").exists()
