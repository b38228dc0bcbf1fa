"""Throughput report: numbers checked against a scripted run whose counts are known."""
import json
import math
import os

import jax.numpy as jnp
import numpy as np

from tests import fakes
import rlbatch
from rlbatch import report


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
    steps = summary.throughput.env_steps
    b = summary.batching
    assert steps >= 30 and summary.learning is None
    assert b.requests == b.batches == steps  # one request and one batch per step
    assert b.batch_size_hist == {1: steps}
    assert b.padding_fraction == 0.75 and b.bucket_fill == {4: report.BucketFill(batches=steps, fill=0.25)}
    assert b.compile_count == 1 and b.params_version == 0 and len(b.latency_samples_ms) == steps
    a = summary.actors
    # scripted episodes of lengths 3, 5, 2, 3, 5, 2, ...: episodes finished within `steps` steps
    lengths, done, total = [3, 5, 2], 0, 0
    while total + lengths[done % 3] <= steps:
        total += lengths[done % 3]
        done += 1
    assert a.episodes == done and a.trajectories >= 3 and a.env_errors == 0
    assert summary.stages.env_step > 0 and summary.stages.actor_wait_for_action > 0
    assert summary.stages.learner_update is None  # no trainer in this run
    text = report.format_table(summary)
    assert f"{steps:,}" in text and "padding 75.0%" in text and "4: %d batches 25%% full" % steps in text
    assert "learner_update" not in text and "learning:" not in text
    path = report.write(summary, str(tmp_path), plots=True)
    line = json.loads(open(path).read().splitlines()[-1])
    assert list(line) == ["config", "time", "throughput", "actors", "stages", "batching"]  # no learning section
    assert line["batching"]["requests"] == steps and line["config"] == {"name": "scripted"}
    assert line["batching"]["batch_size_hist"] == {"1": steps}
    assert line["batching"]["bucket_fill"] == {"4": {"batches": steps, "fill": 0.25}}
    assert list(line["stages"]) == ["env_step", "actor_wait_for_action", "actor_blocked_on_full_queue",
                                    "request_queue_wait_p50_per_request", "host_prep", "device_compute"]
    assert os.path.exists(tmp_path / "report_batch_sizes.png") and os.path.exists(tmp_path / "report_latency.png")


def test_a_batched_service_alone_reports_its_batches_without_policy_figures(tmp_path, no_thread_leak):
    with rlbatch.BatchedService(lambda xs: [2 * x for x in xs], max_batch_size=4, max_delay=0.0) as svc:
        assert list(svc.map(range(3))) == [0, 2, 4]
        summary = report.summarize(service=svc.stats, config={"mode": "alone"})
    assert summary.throughput is summary.actors is summary.learning is None
    b = summary.batching
    assert b.requests == 3 and b.rows == 3 and sum(b.batch_size_hist.values()) == b.batches >= 1
    assert b.compile_count is None and b.params_version is None and b.bucket_fill == {}
    assert b.latency_samples_ms == ()  # none were passed
    assert math.isnan(summary.stages.host_prep) and math.isnan(summary.stages.device_compute)
    path = report.write_runs([summary, summary], str(tmp_path / "x"), plots=False)
    lines = [json.loads(line) for line in open(path).read().splitlines()]
    assert len(lines) == 2 and list(lines[0]) == ["config", "time", "stages", "batching"]
    assert list(lines[0]["stages"]) == ["request_queue_wait_p50_per_request", "host_prep", "device_compute"]
    assert lines[0]["batching"]["compile_count"] is None and lines[0]["config"] == {"mode": "alone"}
    text = report.format_table(summary)
    assert "batching: 3 requests" in text and "compiles None" in text and "actors:" not in text
