"""experiments.bench_envs and its loops: every peer loop counts what it steps, every environment kind
of a workload gives the same observations, and a small real run writes every row."""

import json
import os

import gymnasium
import numpy as np
import pytest

from experiments import bench_envs
from experiments.lib import runtime, tasks, vector_loops
from experiments.lib.workloads import WORKLOADS

TIMING = dict(warmup=0.05, duration=0.2)


def _cartpole_vec(n, seed):
    return gymnasium.vector.SyncVectorEnv([lambda: gymnasium.make("CartPole-v1")] * n)


def _recording_act(shapes):
    def act(obs, i):
        shapes.append(obs.shape)
        return np.zeros(len(obs), np.int64)
    return act


def test_vector_loop_counts_n_steps_per_policy_call():
    shapes = []
    rate = vector_loops.run_vector_loop(_cartpole_vec, _recording_act(shapes), 4, seed=3, **TIMING)
    assert rate.env_steps > 0 and rate.env_steps % 4 == 0
    assert set(shapes) == {(4, 4)} and rate.mean_batch == 4.0
    assert rate.steps_per_s == pytest.approx(rate.env_steps / rate.elapsed_s)


def test_envpool_async_loop_asks_the_policy_about_each_recv_batch():
    import envpool

    shapes, sent = [], []

    def make(n, batch, seed):
        env = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=n, batch_size=batch, seed=seed)
        send = env.send
        env.send = lambda action, env_id: (sent.append(np.asarray(env_id).copy()), send(action, env_id))
        return env

    rate = vector_loops.run_envpool_async_loop(make, _recording_act(shapes), 6, 2, **TIMING)
    assert set(shapes) == {(2, 4)}
    assert rate.env_steps > 0 and rate.env_steps % 2 == 0 and rate.mean_batch == 2.0
    # Every environment of the pool is played, not only the first batch's.
    assert set(np.concatenate(sent).tolist()) == set(range(6))


def test_floors_step_without_a_policy_and_the_policy_without_environments():
    stepped = []

    def recording_vec(n, seed):
        vec = _cartpole_vec(n, seed)
        step = vec.step
        vec.step = lambda actions: (stepped.append(np.asarray(actions).copy()), step(actions))[1]
        return vec

    actions = np.array([[0, 1, 0], [1, 1, 0]], np.int64)
    rate = vector_loops.run_env_alone(recording_vec, actions, 3, **TIMING)
    assert rate.env_steps > 0 and rate.env_steps % 3 == 0
    assert len(stepped) > 2 and all((a == actions[i % 2]).all() for i, a in enumerate(stepped))  # cycled
    floor = WORKLOADS["halfcheetah"].floor_actions(5, steps=3, seed=1)
    assert floor.shape == (3, 5, 6) and floor.dtype == np.float32 and len(np.unique(floor)) == floor.size
    assert np.abs(floor).max() <= 1.0 and (floor == WORKLOADS["halfcheetah"].floor_actions(5, steps=3, seed=1)).all()
    assert 0 < rate.cpu_s <= 2.5 * rate.elapsed_s  # this process's CPU time over the measurement
    calls = []
    rate = vector_loops.run_policy_alone(lambda obs, i: calls.append(i), np.zeros((5, 4)), **TIMING)
    # Rows of the calls in the measured span: not the first (it compiles, before the clock), nor warm-up's.
    assert rate.env_steps > 0 and rate.env_steps % 5 == 0 and rate.env_steps < 5 * (len(calls) - 1)


def test_threads_floor_steps_one_vector_env_per_thread_with_its_columns_and_raises_a_build_error():
    made, stepped = [], {}

    def recording_vec(n, seed):
        made.append((n, seed))
        vec = _cartpole_vec(n, seed)
        step = vec.step
        vec.step = lambda actions: (stepped.setdefault(seed, []).append(np.asarray(actions).copy()), step(actions))[1]
        return vec

    actions = np.array([[0, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 1]], np.int64)
    rate = vector_loops.run_envs_alone_threads(recording_vec, actions, 6, 2, seed=10, **TIMING)
    assert sorted(made) == [(3, 10), (3, 13)] and rate.num_actors == 2 and rate.envs_per_actor == 3
    assert rate.env_steps > 0 and rate.env_steps % 3 == 0 and 0 < rate.cpu_s
    for seed, first in ((10, 0), (13, 3)):  # each thread its own columns, cycled
        assert all((a == actions[i % 2, first:first + 3]).all() for i, a in enumerate(stepped[seed]))

    def broken(n, seed):
        raise RuntimeError(f"no environment for seed {seed}")

    with pytest.raises(RuntimeError, match="no environment for seed"):
        vector_loops.run_envs_alone_threads(broken, actions, 6, 2, **TIMING)


def test_policy_threads_act_on_each_threads_own_observations_and_raise_a_policy_error():
    made, stepped, seen = [], {}, []

    def recording_vec(n, seed):
        made.append(seed)
        vec = _cartpole_vec(n, seed)
        step = vec.step
        vec.step = lambda actions: (stepped.setdefault(seed, []).append(np.asarray(actions).copy()), step(actions))[1]
        return vec

    def act(obs, i):  # push right where the pole leans right: an action read from these observations
        seen.append(obs.copy())
        return (obs[:, 2] > 0).astype(np.int64)

    rate = vector_loops.run_policy_threads(recording_vec, act, 6, 2, seed=10, **TIMING)
    # (on a loaded machine one thread may not get the GIL within the short run: each that stepped is checked)
    assert sorted(made) == [10, 13] and stepped and rate.num_actors == 2 and rate.envs_per_actor == 3
    assert rate.env_steps > 0 and rate.env_steps % 3 == 0
    assert all(o.shape == (3, 4) for o in seen) and len(seen) >= sum(map(len, stepped.values()))
    # Each thread's actions follow its own environments' observations: replaying the actions it sent
    # on a fresh copy of its environments gives back observations whose sign matches every action.
    for seed, actions in stepped.items():
        vec = _cartpole_vec(3, seed)
        obs = vec.reset(seed=[seed + j for j in range(3)])[0]
        for a in actions[:20]:
            assert (a == (obs[:, 2] > 0)).all()
            obs = vec.step(a)[0]
        vec.close()

    def failing(obs, i):
        raise ValueError("policy broke")

    with pytest.raises(ValueError, match="policy broke"):
        vector_loops.run_policy_threads(recording_vec, failing, 6, 2, **TIMING)


def test_envpool_async_floor_sends_each_recv_its_actions_without_a_policy():
    import envpool

    sent = []

    def make(n, batch, seed):
        env = envpool.make("CartPole-v1", env_type="gymnasium", num_envs=n, batch_size=batch, seed=seed)
        send = env.send
        env.send = lambda action, env_id: (sent.append(np.asarray(env_id).copy()), send(action, env_id))
        return env

    rate = vector_loops.run_envpool_async_alone(make, np.ones((3, 6), np.int64), 6, 2, **TIMING)
    assert rate.env_steps > 0 and rate.env_steps % 2 == 0 and rate.mean_batch == 0.0
    assert set(np.concatenate(sent).tolist()) == set(range(6)) and all(len(e) == 2 for e in sent)


def test_cpu_ceiling_adds_the_cpu_time_of_a_step_and_of_a_row():
    from experiments.lib.env_loops import StepRate

    env = StepRate(steps_per_s=0, num_actors=1, envs_per_actor=1, mean_batch=0, env_steps=1000, elapsed_s=1,
                   cpu_s=2.0)  # 2 ms of CPU per step
    policy = StepRate(steps_per_s=0, num_actors=1, envs_per_actor=1, mean_batch=0, env_steps=4000, elapsed_s=1,
                      cpu_s=2.0)  # 0.5 ms per row
    assert vector_loops.cpu_ceiling(env, policy, cores=2) == pytest.approx(2 / 0.0025)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_vector_kind_of_a_workload_gives_the_single_env_layout(name):
    workload = WORKLOADS[name]
    single = workload.make_env()
    try:
        want = single.observation_space
    finally:
        single.close()
    kinds = [k for k in workload.kinds if k != "envpool-async"]
    for kind in kinds:
        env = workload.vector_env_fn(kind)(2, 7)
        try:
            obs, _ = env.reset() if kind.startswith("envpool") else env.reset(seed=7)
            assert env.num_envs == 2, kind
            assert obs.shape == (2,) + want.shape, kind
            assert obs.dtype == want.dtype or (want.dtype == np.float64 and obs.dtype.kind == "f"), kind
        finally:
            env.close()
    pool = workload.envpool_async_fn(lambda k: k // 2)(4, 0)
    try:
        assert pool.config["batch_size"] == 2 and pool.config["num_envs"] == 4
    finally:
        pool.close()


def test_targets_compare_the_best_rlbatch_row_with_the_best_peer_beside_the_cpu_ceiling():
    rows = [dict(workload="w", num_envs=32, group="peer", mode="a loop", steps_per_s=100.0),
            dict(workload="w", num_envs=32, group="peer", mode="b loop", steps_per_s=200.0),
            dict(workload="w", num_envs=32, group="rlbatch", mode="x", steps_per_s=230.0),
            dict(workload="w", num_envs=32, group="rlbatch", mode="y", steps_per_s=150.0),
            dict(workload="w", num_envs=32, group="ceiling", mode="b + policy, CPU time", steps_per_s=210.0),
            dict(workload="w", num_envs=32, group="ceiling", mode="a + policy, CPU time", steps_per_s=150.0),
            dict(workload="w", num_envs=32, group="floor", mode="policy alone", steps_per_s=9999.0),
            dict(workload="w", num_envs=8, group="peer", mode="a loop", steps_per_s=1.0)]
    [goal] = bench_envs.targets(rows, bench_envs.Args(workloads=("w",)))
    assert goal["best_peer"] == "b loop" and goal["best_rlbatch"] == "x"
    assert goal["ratio"] == pytest.approx(1.15) and goal["met"]
    assert goal["cpu_ceiling"] == "b + policy, CPU time" and goal["ceiling_over_best_peer"] == pytest.approx(1.05)


def test_best_rows_keep_each_kinds_best_split():
    sweep = [dict(workload="w", num_envs=8, group="sweep", mode="rlbatch k", threads=t, steps_per_s=s)
             for t, s in ((1, 10.0), (2, 30.0), (4, 20.0))]
    [best] = bench_envs.best_rows(sweep)
    assert best["group"] == "rlbatch" and best["threads"] == 2 and best["steps_per_s"] == 30.0


def test_a_small_run_writes_every_row_with_stages(tmp_path):
    out = tmp_path / "b"
    args = bench_envs.Args(workloads=("halfcheetah",), num_envs=(4,), threads=(2,),
                           kinds=("single", "envpool-sync", "envpool-async"), warmup=0.1, duration=0.3, compilation_cache="",
                           out=str(out))
    rows = bench_envs.main(args)
    modes = {(r["group"], r["mode"]) for r in rows}
    assert modes == {("floor", "policy alone (batch 4: least CPU per row)"), ("floor", "envpool-sync, no policy"), ("peer", "envpool-sync loop"),
                     ("ceiling", "envpool-sync + policy, CPU time"), ("floor", "envpool-sync, no policy, 2 threads"),
                     ("no library", "envpool-sync + policy, no library, 2 threads"),
                     ("floor", "envpool-async, no policy"), ("ceiling", "envpool-async + policy, CPU time"),
                     ("peer", "envpool-async loop"), ("rlbatch", "1 env per thread"),
                     ("rlbatch", "rlbatch envpool-sync (best split)"), ("rlbatch", "rlbatch envpool-async (best split)"),
                     ("rlbatch", "rlbatch envpool-sync, batch per actor (best split)"),
                     ("rlbatch", "rlbatch envpool-async, batch per actor (best split)"),
                     ("rlbatch", "rlbatch envpool-sync, inline policy (best split)"),
                     ("rlbatch", "rlbatch envpool-async, inline policy (best split)")}
    assert all(r["steps_per_s"] > 0 and r["cpu_util"] > 0 for r in rows)
    by_mode = {r["mode"]: r for r in rows}
    # The ceiling adds the policy's CPU time to the environment's: below what the environment's CPU
    # time alone would allow on every core.
    env = by_mode["envpool-sync, no policy"]
    cores = len(os.sched_getaffinity(0))
    assert by_mode["envpool-sync + policy, CPU time"]["steps_per_s"] < env["steps_per_s"] * cores / env["cpu_util"]
    for r in rows:
        if r["group"] == "rlbatch":
            assert r["stages"]["env_step"] > 0 and r["stages"]["wait_for_action"] > 0
            assert r["batching"] == ("per-actor" if "batch per actor" in r["mode"] else
                                     "inline" if "inline policy" in r["mode"] else "merged")
    saved = json.loads((tmp_path / "b.json").read_text())
    # Each pool's report: a per-actor or inline service never batches more than one actor's request
    # (2 envs; EnvPool async: its batch of 1), a merged one may.
    for summary in map(json.loads, (tmp_path / "b_reports.jsonl").read_text().splitlines()):
        config = summary["config"]
        largest = max(int(b) for b in summary["batching"]["batch_size_hist"])
        if config["batching"] in ("per-actor", "inline"):
            assert largest <= (1 if config["kind"] == "envpool-async" else 2)
    assert len(saved["rows"]) == len(rows) and saved["sweep"]
    assert (tmp_path / "b.png").stat().st_size > 0
    assert "| 4 | rlbatch | 1 env per thread | 4 x 1 |" in (tmp_path / "b.md").read_text()


def test_paired_rounds_alternate_the_best_peer_and_rlbatch_row_and_the_target_takes_their_medians():
    calls = []
    series = {"p loop": iter([100.0, 300.0, 200.0]), ("x", 2): iter([250.0, 150.0, 350.0]),
              "e, no policy, 2 threads": iter([260.0, 210.0, 230.0]), "e + policy, 2": iter([300.0, 200.0, 280.0])}

    def rerun(key):
        def measure():
            calls.append(key)
            return dict(steps_per_s=next(series[key]))
        return measure

    row = dict(workload="w", num_envs=32)
    rows = [dict(row, group="peer", mode="p loop", steps_per_s=120.0, threads=1, envs_per_thread=32),
            dict(row, group="peer", mode="q loop", steps_per_s=50.0, threads=1, envs_per_thread=32),
            dict(row, group="sweep", mode="x", steps_per_s=140.0, threads=2, envs_per_thread=16),
            dict(row, group="sweep", mode="x", steps_per_s=90.0, threads=4, envs_per_thread=8),
            dict(row, group="floor", mode="e, no policy", steps_per_s=150.0, threads=1, envs_per_thread=32),
            dict(row, group="floor", mode="e, no policy, 2 threads", steps_per_s=160.0, threads=2, envs_per_thread=16),
            dict(row, group="floor", mode="policy alone", steps_per_s=9999.0, threads=1, envs_per_thread=32),
            dict(row, group="no library", mode="e + policy, 2", steps_per_s=170.0, threads=2, envs_per_thread=16),
            dict(row, group="no library", mode="e + policy, 4", steps_per_s=110.0, threads=4, envs_per_thread=8)]
    reruns = {"p loop": rerun("p loop"), "q loop": rerun("q loop"), ("x", 2): rerun(("x", 2)),
              ("x", 4): rerun(("x", 4)), "e, no policy": rerun("e, no policy"),
              "e, no policy, 2 threads": rerun("e, no policy, 2 threads"), "e + policy, 2": rerun("e + policy, 2"),
              "e + policy, 4": rerun("e + policy, 4")}
    paired = bench_envs.paired_rounds(rows, reruns, 3)
    # Alternately, the best of each side only (the policy-alone floor is no environment floor).
    assert calls == ["p loop", ("x", 2), "e, no policy, 2 threads", "e + policy, 2"] * 3
    assert paired["peer_steps_per_s"] == 200.0 and paired["steps_per_s"] == 250.0
    assert paired["floor_steps_per_s"] == 230.0 and paired["no_library_steps_per_s"] == 280.0
    table = bench_envs.best_rows(rows + [dict(row, **paired)])
    [goal] = bench_envs.targets(table, bench_envs.Args(workloads=("w",)))
    assert goal["ratio"] == pytest.approx(1.25) and goal["met"]
    assert goal["sweep_ratio"] == pytest.approx(140.0 / 120.0)
    assert goal["paired"] == {"peer": [100, 300, 200], "rlbatch": [250, 150, 350], "floor": [260, 210, 230],
                              "no_library": [300, 200, 280]}
    assert goal["no_library"] == "e + policy, 2" and goal["no_library_over_best_peer"] == pytest.approx(1.4)
    assert goal["rlbatch_over_no_library"] == pytest.approx(250.0 / 280.0)
    assert goal["best_peer"] == "p loop" and goal["best_rlbatch"] == "x (best split)"
    assert goal["env_floor"] == "e, no policy, 2 threads" and goal["floor_over_best_peer"] == pytest.approx(1.15)
    assert not goal["ruled_out"]
    text = bench_envs.render(table, [goal], ["cpu:0"], bench_envs.Args(workloads=("w",), num_envs=(32,)))
    assert "| 1.25x | 1.17x | 1.15x (e, no policy, 2 threads) | 1.40x (e + policy, 2) | 0.89 |" in text
    assert "100, 300, 200 / 250, 150, 350 / 260, 210, 230 / 300, 200, 280" in text
    assert "paired |" not in text.split("CPU ceiling:")[0]  # not a row of the main table


def test_a_floor_under_1_1x_the_best_peer_rules_the_target_out():
    row = dict(workload="w", num_envs=128, threads=1, envs_per_thread=128)
    rows = [dict(row, group="peer", mode="p loop", steps_per_s=100.0),
            dict(row, group="rlbatch", mode="x", steps_per_s=90.0),
            dict(row, group="floor", mode="e, no policy", steps_per_s=105.0)]
    [goal] = bench_envs.targets(rows, bench_envs.Args(workloads=("w",), num_envs=(128,)))
    assert goal["ruled_out"] and not goal["met"] and goal["floor_over_best_peer"] == pytest.approx(1.05)
    text = bench_envs.render(rows, [goal], ["cpu:0"], bench_envs.Args(workloads=("w",), num_envs=(128,)))
    assert "NO: ruled out by the floor" in text
    rows[2]["steps_per_s"] = 111.0
    [goal] = bench_envs.targets(rows, bench_envs.Args(workloads=("w",), num_envs=(128,)))
    assert not goal["ruled_out"] and not goal["met"]


def test_actors_environments_share_the_cores_instead_of_each_starting_a_thread_per_core():
    cores = runtime.cores()
    assert runtime.env_threads_per_actor(1) == cores and runtime.env_threads_per_actor(4 * cores) == 1
    assert runtime.env_threads_per_actor(2) == max(1, cores // 2)
    halfcheetah = WORKLOADS["halfcheetah"]
    for make, want in ((halfcheetah.vector_env_fn("envpool-sync", 1), 1),
                       (halfcheetah.envpool_async_fn(lambda k: k // 2, 1), 1),
                       (halfcheetah.vector_env_fn("envpool-sync"), 0)):  # 0: EnvPool's default, min(k, cores)
        env = make(4, 0)
        try:
            assert env.config["num_threads"] == want
        finally:
            env.close()
    task = tasks.probe("ALE/Pong-v5")
    env = tasks.pool_envs(task, "ALE/Pong-v5", actors_per_machine=4 * cores)["vector_env_fn"](2, 0)
    try:
        assert env.config["num_threads"] == 1
    finally:
        env.close()
