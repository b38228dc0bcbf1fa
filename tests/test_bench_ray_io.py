"""experiments.bench_ray_io from its user's side: `--quick` writes every row with positive figures,
names the machine and every payload's size, and leaves no Ray process behind (run_module checks
the processes carrying its marker); the figure map that docs/scale.md's placeholders name is
checked against hand-made rows. Nothing here asserts how fast anything is.
"""
import json

import numpy as np

from experiments import bench_ray_io
from tests.test_fleet_job import run_module

_MACHINE = dict(cpus=2, platform="Linux-test", python="3.11", ray="2.0", jax="0.1", jax_device="TFRT_CPU_0")


def test_quick_run_writes_every_row_with_positive_figures_and_leaves_no_process(tmp_path):
    out = tmp_path / "io"
    run_module("experiments.bench_ray_io", "--quick", "--out", str(out))
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    quick = bench_ray_io.QUICK
    keys = [(r["measure"], r["payload"], r.get("processes")) for r in rows]
    assert keys == ([("round_trip", "CartPole batch 4 x 4 float32", None),
                     ("learner", "cartpole-mlp", None), ("learner", "nature-cnn", None)] +
                    [("broadcast", name, n) for name in ("cartpole-mlp", "nature-cnn", "synthetic-8mb")
                     for n in quick["processes"]] +
                    [("group", name, n) for name in ("atari", "cartpole") for n in quick["processes"]])
    figure_fields = dict(round_trip=("median_ms", "p90_ms"), learner=("update_ms", "samples_per_s", "first_call_s"),
                         broadcast=("put_ms", "publish_ms", "delivered_mb_per_s"),
                         group=("groups_per_s", "mb_per_s", "env_steps_per_s"))
    for r in rows:
        assert r["payload_bytes"] > 0 and r["machine"].startswith(f"{result['machine']['cpus']} CPUs"), r
        assert all(r[f] > 0 for f in figure_fields[r["measure"]]), r

    sizes = {r["payload"]: r["payload_bytes"] for r in rows if r["measure"] == "broadcast"}
    assert sizes["synthetic-8mb"] == 4 * (8_000_000 // 16) * 4
    assert 6_000_000 < sizes["nature-cnn"] < 7_500_000  # the Nature CNN actor-critic: about 1.69M float32
    T, envs = quick["atari_group"]
    atari = next(r for r in rows if r["measure"] == "group" and r["payload"] == "atari")
    assert atari["obs_bytes"] == (T + 1) * envs * 4 * 84 * 84 and atari["payload_bytes"] > 2 * T * envs * 4 * 84 * 84

    table = out.with_suffix(".md").read_text()
    assert f"Machine: {result['machine']['cpus']} CPUs" in table
    assert table.count("| synthetic-8mb | 8.000 MB |") == len(quick["processes"])
    assert result["figures"]["broadcast.nature-cnn.p2.publish_ms"] == next(
        r["publish_ms"] for r in rows if r["payload"] == "nature-cnn" and r.get("processes") == 2)


def _rows():
    return [dict(measure="round_trip", payload="CartPole batch 4 x 4 float32", payload_bytes=64, calls=10,
                 median_ms=0.9, p90_ms=1.5),
            dict(measure="broadcast", payload="nature-cnn", payload_bytes=6_750_000, processes=4, repeats=3,
                 leaves=10, put_ms=2.0, publish_ms=27.0, delivered_mb_per_s=1000.0),
            dict(measure="group", payload="atari", shape="T=128 x 8 envs x [4, 84, 84] uint8",
                 payload_bytes=57_900_000, obs_bytes=29_100_000, processes=2, groups=32, rounds=3,
                 groups_per_s=10.0, mb_per_s=579.0, env_steps_per_s=10240.0),
            dict(measure="learner", payload="cartpole-mlp", payload_bytes=90_000, batch="T=16 x 64", samples=1024,
                 epochs=20, minibatches=1, repeats=5, first_call_s=2.5, update_ms=40.0, samples_per_s=25600.0)]


def test_figures_name_each_measure_payload_and_process_count():
    got = bench_ray_io.figures(_rows(), _MACHINE)
    assert got == {"machine.cpus": 2, "machine.platform": "Linux-test",
                   "round_trip.median_ms": 0.9, "round_trip.p90_ms": 1.5,
                   "broadcast.nature-cnn.bytes": 6_750_000, "broadcast.nature-cnn.p4.publish_ms": 27.0,
                   "broadcast.nature-cnn.p4.put_ms": 2.0, "broadcast.nature-cnn.p4.delivered_mb_per_s": 1000.0,
                   "group.atari.bytes": 57_900_000, "group.atari.p2.groups_per_s": 10.0, "group.atari.p2.mb_per_s": 579.0,
                   "group.atari.p2.env_steps_per_s": 10240.0,
                   "learner.cartpole-mlp.samples_per_s": 25600.0, "learner.cartpole-mlp.update_ms": 40.0}


def test_every_table_row_names_the_machine_and_its_payload_size():
    table = bench_ray_io.render(_rows(), _MACHINE, quick=False)
    assert "Machine: 2 CPUs, Linux-test, Python 3.11, Ray 2.0, JAX 0.1 on TFRT_CPU_0" in table
    assert "| actor method, 2 CPUs | CartPole batch 4 x 4 float32 (64 B) | 0.900 | 1.500 | 10 |" in table
    assert "| nature-cnn | 6.750 MB | 10 | 4 | 2.00 | 27.00 | 1,000 |" in table
    assert "| atari | T=128 x 8 envs x [4, 84, 84] uint8 | 57.900 MB (29.100 MB) | 2 | 10.0 | 579 | 10,240 |" in table
    assert "| cartpole-mlp | T=16 x 64 | 0.090 MB | 20 x 1 | 2.50 | 40.0 | 25,600 |" in table
    assert "(--quick)" in bench_ray_io.render(_rows(), _MACHINE, quick=True)


def test_a_group_has_every_trajectory_field_and_full_size_final_obs():
    group = bench_ray_io.make_group((4, 84, 84), "uint8", 16, 4)
    assert group["obs"].shape == (17, 4, 4, 84, 84) and group["final_obs"].shape == (16, 4, 4, 84, 84)
    assert group["reward"].dtype == np.float32 and group["policy_version"].dtype == np.int64
    assert group["actor_id"].shape == (4,)
    assert bench_ray_io.copy_leaves(group) == sum(x.nbytes for x in group.values())
    tree = {"a": {"b": np.zeros(3, np.float32)}, "c": [np.zeros(2, np.int64), (np.zeros(3, np.int8),)]}
    assert bench_ray_io.copy_leaves(tree) == 12 + 16 + 3
