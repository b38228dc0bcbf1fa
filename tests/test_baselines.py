"""The benchmarks' baselines: what they count and how they fail (never how fast they are)."""
import itertools
import threading

import gymnasium
import jax.numpy as jnp
import numpy as np
import pytest

import envs  # noqa: F401 - registers the rlbatch/ environments
import rlbatch
from experiments.lib import baselines
from rlbatch.batching.relay import relay_width


def test_seed_style_batcher_gathers_and_answers_each_item(no_thread_leak):
    calls = []
    gate = threading.Event()

    def batch_fn(items):
        gate.wait(10)  # the first batch holds the worker until every item is queued
        calls.append(list(items))
        return [x * 10 for x in items]

    with baselines.SeedStyleBatcher(batch_fn, max_batch_size=4, max_delay=0.05) as b:
        futures = [b.submit(i) for i in range(9)]
        gate.set()
        assert [f.result(10) for f in futures] == [10 * i for i in range(9)]
    # in order, at most 4 a batch, and a full 4 once the queue holds more than that
    assert [x for c in calls for x in c] == list(range(9))
    assert max(len(c) for c in calls) == 4 and b.items == 9 and b.batches == len(calls)
    assert b.mean_batch_size == pytest.approx(9 / len(calls))


def test_seed_style_batcher_errors_reach_every_caller_and_close_is_final(no_thread_leak):
    def batch_fn(items):
        raise KeyError("boom")

    b = baselines.SeedStyleBatcher(batch_fn, max_batch_size=8, max_delay=0.001)
    with pytest.raises(KeyError, match="boom"):
        b(1)
    with pytest.raises(KeyError):
        b(2)  # the worker survived the first error
    b.close()
    b.close()  # safe twice
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(3)


def test_stacked_policy_batch_pads_and_splits_rows():
    def step(params, obs, key, i):
        return obs[:, 0] * 2, {"i": jnp.full(obs.shape[0], i), "n": jnp.full(obs.shape[0], obs.shape[0])}

    batch_fn = baselines.StackedPolicyBatch(step, None, None, pad_to=4)
    out = batch_fn([np.array([1.0, 0.0]), np.array([2.0, 0.0])])
    assert [float(a) for a, _ in out] == [2.0, 4.0]
    assert [int(e["n"]) for _, e in out] == [4, 4] and int(out[0][1]["i"]) == 0  # padded to 4, batch 0
    assert int(batch_fn([np.zeros(2)])[0][1]["i"]) == 1
    assert batch_fn.batch_sizes == {4}
    exact = baselines.StackedPolicyBatch(step, None, None)
    exact([np.zeros(2)] * 3)
    assert exact.batch_sizes == {3}


def test_run_clients_counts_every_call_and_closes_registered_callers(no_thread_leak):
    closed = []

    class Call:
        def __init__(self, i):
            self.i = i

        def __call__(self, item):
            return item

        def close(self):
            closed.append(self.i)

    load = baselines.run_clients(3, Call, lambda i: i, duration=0.05)
    assert load.items > 0 and load.items_per_s == pytest.approx(load.items / load.elapsed_s)
    assert 0 < load.p50_ms <= load.p99_ms and load.cpu_s_per_1k >= 0
    assert sorted(closed) == [0, 1, 2]


def test_run_clients_raises_a_client_failure(no_thread_leak):
    def make_call(i):
        if i == 1:
            raise ValueError("no caller for 1")
        return lambda x: x

    with pytest.raises(RuntimeError, match="no caller for 1"):
        baselines.run_clients(3, make_call, lambda i: i, duration=0.05)


def test_grouping():
    assert baselines.grouping(256) == (16, 16)
    assert baselines.grouping(12) == (3, 4)
    assert baselines.grouping(7) == (1, 7)
    assert baselines.grouping(256, 32) == (8, 32)
    assert baselines.grouping(16, 32) == (1, 16)
    assert baselines.grouping(48, 32) == (2, 24)
    with pytest.raises(ValueError, match="envs_per_actor"):
        baselines.grouping(16, 0)


def zeros_act(obs, i):
    return np.zeros(len(obs), np.int64)


def test_env_baselines_count_steps(no_thread_leak):
    make_env = lambda: gymnasium.make("CartPole-v1")  # noqa: E731
    sync = baselines.run_sync_vector(make_env, zeros_act, 4, warmup=0.01, duration=0.05)
    assert sync.env_steps > 0 and sync.env_steps % 4 == 0 and sync.mean_batch == 4.0
    assert (sync.num_actors, sync.envs_per_actor) == (1, 4)
    threads = baselines.run_unbatched(make_env, zeros_act, 3, warmup=0.01, duration=0.05)
    assert threads.env_steps > 0 and (threads.num_actors, threads.envs_per_actor, threads.mean_batch) == (3, 1, 1.0)


def test_unbatched_raises_an_actor_failure(no_thread_leak):
    def act(obs, i):
        if i == 3:
            raise ValueError("policy failed at 3")
        return np.zeros(len(obs), np.int64)

    with pytest.raises(RuntimeError, match="policy failed at 3"):
        baselines.run_unbatched(lambda: gymnasium.make("CartPole-v1"), act, 2, warmup=0.05, duration=0.05)


def test_relay_gate_releases_threads_in_full_rounds(no_thread_leak):
    n, rounds = 4, 25
    gate = baselines._RelayGate(n)
    lock = threading.Lock()
    arrived = [0]
    early = []

    def worker():
        for r in range(rounds):
            with lock:
                arrived[0] += 1
            gate.wait()
            with lock:
                if arrived[0] < n * (r + 1):  # released before every thread reached round r
                    early.append((r, arrived[0]))

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    gate.close()
    assert not any(t.is_alive() for t in threads) and early == []
    assert arrived[0] == n * rounds


def test_relay_width_matches_the_service_rule():
    assert [relay_width(n) for n in (1, 64, 128, 129, 256)] == [2, 2, 2, 3, 4]
    assert relay_width(256, wake_width=1) == 1


def test_client_floor_releases_every_thread_each_round(no_thread_leak):
    # 130 threads: the gate releases each round as three relays (relay_width(130) == 3).
    load = baselines.run_client_floor(130, 1.0)
    assert load.items >= 130 and load.items_per_s > 0 and load.p99_ms >= load.p50_ms > 0


class FailsOnStep(gymnasium.Wrapper):
    def step(self, action):
        raise RuntimeError("env step failed")


def test_thread_floor_counts_steps_and_survives_a_failing_env(no_thread_leak):
    floor = baselines.run_thread_floor(lambda: gymnasium.make("CartPole-v1"), 3, warmup=0.01, duration=0.05)
    assert floor.env_steps > 0 and (floor.num_actors, floor.envs_per_actor, floor.mean_batch) == (3, 1, 3.0)
    made = itertools.count()

    def make_env():  # the second environment fails on its first step; the others must not hang
        env = gymnasium.make("CartPole-v1")
        return FailsOnStep(env) if next(made) == 1 else env

    with pytest.raises(RuntimeError, match="env step failed"):
        baselines.run_thread_floor(make_env, 3, warmup=0.05, duration=0.05)


def test_service_threads_step_with_the_service_actions_and_close_their_callers(no_thread_leak):
    seen = []

    def apply(params, obs, key):
        return jnp.ones(obs.shape[0], jnp.int32), {}

    class Record(gymnasium.Wrapper):
        def step(self, action):
            seen.append(action)
            return self.env.step(action)

    with rlbatch.PolicyService(apply, {}, example_obs=np.zeros(4, np.float32), buckets=(4,), max_delay=0.001) as svc:
        rate = baselines.run_service_threads(lambda: Record(gymnasium.make("CartPole-v1")), svc, 3,
                                             warmup=0.01, duration=0.05)
        assert rate.env_steps > 0 and (rate.num_actors, rate.envs_per_actor) == (3, 1)
        assert 1.0 <= rate.mean_batch <= 3.0
        assert set(seen) == {1} and all(type(a) is int for a in seen)  # the service's action, as an int
        assert svc._service._registered == 0  # every thread closed its caller


def test_measure_pool_samples_and_counts_rows(no_thread_leak):
    def apply(params, obs, key):
        return jnp.zeros(obs.shape[0], jnp.int32), {}

    samples = []
    with rlbatch.PolicyService(apply, {}, example_obs=np.zeros(4, np.float32), buckets=(4,), max_delay=0.0) as svc:
        with rlbatch.ActorPool("CartPole-v1", svc, num_actors=2, unroll_length=4, envs_per_actor=2) as pool:
            rate = baselines.measure_pool(pool, svc, warmup=0.05, duration=0.2, sample=lambda: samples.append(1),
                                          sample_every=0.02)
    assert rate.env_steps > 0 and rate.steps_per_s > 0 and (rate.num_actors, rate.envs_per_actor) == (2, 2)
    assert 2 <= rate.mean_batch <= 4  # requests of 2 rows, at most two per batch of 4
    assert len(samples) >= 2 and rate.series[1][1] - rate.series[0][1] == rate.env_steps
