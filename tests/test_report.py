"""Throughput report: numbers checked against a scripted run whose counts are known."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

import envs
from tests import fakes
import rlbatch
from rlbatch import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_report_counts_match_a_scripted_run(tmp_path):
    def apply(params, obs, key):
        return jnp.zeros(obs.shape[0], jnp.int32), {"v": obs[:, 0]}

    # One actor, one env, buckets (4,): every step is one request of one row padded to 4.
    policy = rlbatch.PolicyService(apply, {}, example_obs=np.zeros(2, np.float32), buckets=(4,), max_delay=0.0)
    pool = rlbatch.ActorPool(lambda: fakes.ScriptedEnv((3, 5, 2), (False, True, False)), policy, num_actors=1,
                             unroll_length=10)
    recorder = report.Recorder(pool, policy, every=None)
    with pool:
        for _ in range(3):
            pool.get(timeout=30)
            recorder.sample()
    summary = recorder.finish(config={"name": "scripted"})
    policy.close()
    steps = summary["throughput"]["env_steps"]
    b = summary["batching"]
    assert steps >= 30
    assert b["requests"] == b["batches"] == steps  # one request and one batch per step
    assert b["batch_size_hist"] == {"1": steps}
    assert b["padding_fraction"] == 0.75 and b["bucket_fill"] == {"4": {"batches": steps, "fill": 0.25}}
    assert b["compile_count"] == 1
    a = summary["actors"]
    # scripted episodes of lengths 3, 5, 2, 3, 5, 2, ...: episodes finished within `steps` steps
    lengths, done, total = [3, 5, 2], 0, 0
    while total + lengths[done % 3] <= steps:
        total += lengths[done % 3]
        done += 1
    assert a["episodes"] == done and a["trajectories"] >= 3 and a["env_errors"] == 0
    assert summary["stages"]["env_step"] > 0 and summary["stages"]["actor_wait_for_action"] > 0
    text = report.format_table(summary)
    assert f"{steps:,}" in text and "padding 75.0%" in text
    path = report.write(summary, str(tmp_path), plots=True)
    line = json.loads(open(path).read().splitlines()[-1])
    assert line["batching"]["requests"] == steps and line["config"] == {"name": "scripted"}
    assert os.path.exists(tmp_path / "report_batch_sizes.png") and os.path.exists(tmp_path / "report_latency.png")


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
    assert (out / "report_steps_per_sec.png").exists()


def test_args_help_lists_field_docstrings():
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    assert "--num-actors" in proc.stdout and "actor threads" in proc.stdout
