"""Environment-stepping baselines and the pool measurement: what they count and how they fail."""
import itertools

import gymnasium
import jax.numpy as jnp
import numpy as np
import pytest

import envs  # noqa: F401 - registers the rlbatch/ environments
import rlbatch
from experiments.lib import env_loops


def test_grouping():
    assert env_loops.grouping(256) == (16, 16)
    assert env_loops.grouping(12) == (3, 4)
    assert env_loops.grouping(7) == (1, 7)
    assert env_loops.grouping(256, 32) == (8, 32)
    assert env_loops.grouping(16, 32) == (1, 16)
    assert env_loops.grouping(48, 32) == (2, 24)
    with pytest.raises(ValueError, match="envs_per_actor"):
        env_loops.grouping(16, 0)


def zeros_act(obs, i):
    return np.zeros(len(obs), np.int64)


def test_env_baselines_count_steps(no_thread_leak):
    make_env = lambda: gymnasium.make("CartPole-v1")  # noqa: E731
    sync = env_loops.run_sync_vector(make_env, zeros_act, 4, warmup=0.01, duration=0.05)
    assert sync.env_steps > 0 and sync.env_steps % 4 == 0 and sync.mean_batch == 4.0
    assert (sync.num_actors, sync.envs_per_actor) == (1, 4)
    threads = env_loops.run_unbatched(make_env, zeros_act, 3, warmup=0.01, duration=0.05)
    assert threads.env_steps > 0 and (threads.num_actors, threads.envs_per_actor, threads.mean_batch) == (3, 1, 1.0)


def test_unbatched_raises_an_actor_failure(no_thread_leak):
    def act(obs, i):
        if i == 3:
            raise ValueError("policy failed at 3")
        return np.zeros(len(obs), np.int64)

    with pytest.raises(RuntimeError, match="policy failed at 3"):
        env_loops.run_unbatched(lambda: gymnasium.make("CartPole-v1"), act, 2, warmup=0.05, duration=0.05)


class FailsOnStep(gymnasium.Wrapper):
    def step(self, action):
        raise RuntimeError("env step failed")


def test_thread_floor_counts_steps_and_survives_a_failing_env(no_thread_leak):
    floor = env_loops.run_thread_floor(lambda: gymnasium.make("CartPole-v1"), 3, warmup=0.01, duration=0.05)
    assert floor.env_steps > 0 and (floor.num_actors, floor.envs_per_actor, floor.mean_batch) == (3, 1, 3.0)
    made = itertools.count()

    def make_env():  # the second environment fails on its first step; the others must not hang
        env = gymnasium.make("CartPole-v1")
        return FailsOnStep(env) if next(made) == 1 else env

    with pytest.raises(RuntimeError, match="env step failed"):
        env_loops.run_thread_floor(make_env, 3, warmup=0.05, duration=0.05)


class CallerCount:
    """A PolicyService seen through its public register() and stats, counting callers left open."""

    def __init__(self, service):
        self.service, self.registered, self.closed = service, 0, 0

    def register(self):
        caller = self.service.register()
        self.registered += 1
        count = self

        class Counted:
            def __call__(self, obs):
                return caller(obs)

            def close(self):
                count.closed += 1
                caller.close()

        return Counted()

    @property
    def stats(self):
        return self.service.stats


def test_service_threads_step_with_the_service_actions_and_close_their_callers(no_thread_leak):
    seen = []

    def apply(params, obs, key):
        return jnp.ones(obs.shape[0], jnp.int32), {}

    class Record(gymnasium.Wrapper):
        def step(self, action):
            seen.append(action)
            return self.env.step(action)

    with rlbatch.PolicyService(apply, {}, example_obs=np.zeros(4, np.float32), buckets=(4,), max_delay=0.001) as svc:
        callers = CallerCount(svc)
        rate = env_loops.run_service_threads(lambda: Record(gymnasium.make("CartPole-v1")), callers, 3,
                                             warmup=0.01, duration=0.05)
        assert rate.env_steps > 0 and (rate.num_actors, rate.envs_per_actor) == (3, 1)
        assert 1.0 <= rate.mean_batch <= 3.0
        assert set(seen) == {1} and all(type(a) is int for a in seen)  # the service's action, as an int
        assert callers.registered == callers.closed == 3  # every thread registered once and closed its caller



def test_measure_pool_samples_and_counts_rows(no_thread_leak):
    def apply(params, obs, key):
        return jnp.zeros(obs.shape[0], jnp.int32), {}

    samples = []
    with rlbatch.PolicyService(apply, {}, example_obs=np.zeros(4, np.float32), buckets=(4,), max_delay=0.0) as svc:
        with rlbatch.ActorPool("CartPole-v1", svc, num_actors=2, unroll_length=4, envs_per_actor=2) as pool:
            rate = env_loops.measure_pool(pool, svc, warmup=0.05, duration=0.2, sample=lambda: samples.append(1),
                                          sample_every=0.02)
    assert rate.env_steps > 0 and rate.steps_per_s > 0 and (rate.num_actors, rate.envs_per_actor) == (2, 2)
    assert 2 <= rate.mean_batch <= 4  # requests of 2 rows, at most two per batch of 4
    assert len(samples) >= 2 and rate.series[1][1] - rate.series[0][1] == rate.env_steps
