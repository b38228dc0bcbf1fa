"""ActorPool: trajectory contents against a scripted env, faults, back pressure, lifecycle."""
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import envs
from tests import fakes
import rlbatch
from tests.conftest import wait_until

LENGTHS, TRUNCATE = (3, 5, 2), (False, True, False)


def identity_apply(params, obs, key):
    """Deterministic: action 0; extras identify the observation the action was chosen on."""
    n = obs.shape[0]
    return jnp.zeros(n, jnp.int32), {"tag": obs[:, 0] * 100 + obs[:, 1], "log_prob": jnp.zeros(n)}


def scripted_service(**kw):
    return rlbatch.PolicyService(identity_apply, {}, example_obs=np.zeros(2, np.float32), buckets=(4, 8, 16, 64),
                                 max_delay=0.001, **kw)


def scripted_steps():
    """The scripted env's transitions, recomputed here from its documented formulas."""
    i = 0
    while True:
        L, trunc = LENGTHS[i % 3], TRUNCATE[i % 3]
        for t in range(L):
            end = t + 1 == L
            yield dict(obs=[i, t], reward=10 * i + t + 1, terminated=end and not trunc, truncated=end and trunc,
                       final_obs=[i, t + 1] if end else [0, 0], next_obs=[i + 1, 0] if end else [i, t + 1],
                       episode=i)
        i += 1


def test_single_env_trajectories_match_the_script_exactly():
    T = 4
    with scripted_service() as svc:
        pool = rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=1, unroll_length=T)
        with pool:
            trajs = [pool.get(timeout=30) for _ in range(6)]
        episodes = pool.episodes
    steps = scripted_steps()
    for traj in trajs:
        expected = [next(steps) for _ in range(T)]
        assert traj.obs.shape == (T + 1, 2) and traj.action.shape == (T,) and traj.final_obs.shape == (T, 2)
        np.testing.assert_array_equal(traj.obs[:T], [e["obs"] for e in expected])
        np.testing.assert_array_equal(traj.obs[T], expected[-1]["next_obs"])  # bootstrap observation
        np.testing.assert_array_equal(traj.reward, [e["reward"] for e in expected])
        np.testing.assert_array_equal(traj.terminated, [e["terminated"] for e in expected])
        np.testing.assert_array_equal(traj.truncated, [e["truncated"] for e in expected])
        np.testing.assert_array_equal(traj.final_obs, [e["final_obs"] for e in expected])
        np.testing.assert_array_equal(traj.extras["tag"], [e["obs"][0] * 100 + e["obs"][1] for e in expected])
        np.testing.assert_array_equal(traj.episode_id & 0xFFFFFFFF, [e["episode"] for e in expected])
        assert traj.actor_id == 0 and (traj.policy_version == 0).all()
        assert traj.reward.dtype == np.float32 and traj.terminated.dtype == np.bool_
    # returns of finished episodes, in order: 1+2+3, 11+..+15, 21+22, 31+32+33, ...
    assert [r for r, _ in episodes[:4]] == [6, 65, 43, 96]
    assert [n for _, n in episodes[:4]] == [3, 5, 2, 3]


def test_several_envs_per_actor_put_the_env_axis_second_and_stack():
    T, k = 5, 3
    with scripted_service() as svc:
        with rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=2, unroll_length=T,
                               envs_per_actor=k) as pool:
            trajs = [pool.get(timeout=30) for _ in range(4)]
    for traj in trajs:
        assert traj.obs.shape == (T + 1, k, 2) and traj.reward.shape == (T, k) and traj.action.shape == (T, k)
        assert traj.extras["tag"].shape == (T, k)
        for j in range(k):  # every column follows the script on its own
            np.testing.assert_array_equal(traj.reward[:, j], 10 * traj.obs[:T, j, 0] + traj.obs[:T, j, 1] + 1)
        env_index = traj.episode_id >> 32
        assert (env_index == traj.actor_id * k + np.arange(k)).all()
    batch = rlbatch.stack_trajectories(trajs)
    assert batch.obs.shape == (T + 1, 4 * k, 2) and batch.reward.shape == (T, 4 * k)
    assert batch.actor_id.shape == (4 * k,)


def test_environment_i_is_seeded_seed_plus_i():
    seeds = []
    lock = threading.Lock()

    class Recording(fakes.ScriptedEnv):
        def reset(self, *, seed=None, options=None):
            if seed is not None:
                with lock:
                    seeds.append(seed)
            return super().reset(seed=seed, options=options)

    with scripted_service() as svc:
        with rlbatch.ActorPool(lambda: Recording(LENGTHS, TRUNCATE), svc, num_actors=3, unroll_length=2,
                               envs_per_actor=2, seed=100) as pool:
            pool.get(timeout=30)
    assert sorted(seeds) == [100, 101, 102, 103, 104, 105]


def test_env_faults_rebuild_env_and_drop_unfinished_trajectory_only():
    def make():
        return fakes.FaultInjection(fakes.ScriptedEnv(LENGTHS, TRUNCATE), p_step=0.05, p_reset=0.05,
                                   seed=int(np.random.default_rng().integers(1 << 30)))

    with scripted_service() as svc:
        with rlbatch.ActorPool(make, svc, num_actors=4, unroll_length=6) as pool:
            trajs = [pool.get(timeout=30) for _ in range(40)]
            wait_until(lambda: pool.stats.env_errors >= 3)
            stats = pool.stats
    assert stats.env_rebuilds >= stats.env_errors >= 3
    assert stats.dropped_on_error >= 1
    assert any("InjectedFault" in e.traceback and e.where in ("env.step", "env.reset") for e in stats.recent_errors)
    assert all(0 <= e.actor_id < 4 for e in stats.recent_errors)
    for traj in trajs:  # every emitted trajectory is whole and consistent with the script
        np.testing.assert_array_equal(traj.reward, 10 * traj.obs[:-1, 0] + traj.obs[:-1, 1] + 1)
        np.testing.assert_array_equal(traj.extras["tag"], traj.obs[:-1, 0] * 100 + traj.obs[:-1, 1])
    assert pool.envs_open == 0


def test_queue_full_blocks_actors_until_consumer_takes():
    with scripted_service() as svc:
        with rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=3, unroll_length=2,
                               max_queue=2) as pool:
            wait_until(lambda: pool.stats.queue_depth == 2)
            wait_until(lambda: pool.stats.queue_wait_time > 0 or pool.stats.trajectories == 2)
            assert pool.stats.trajectories == 2 and pool.stats.dropped_full == 0
            pool.get(timeout=5)
            wait_until(lambda: pool.stats.trajectories == 3)
            assert pool.stats.queue_depth == 2


def test_queue_full_drop_oldest_keeps_newest_and_counts():
    with scripted_service() as svc:
        with rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=1, unroll_length=2,
                               max_queue=2, on_full="drop_oldest") as pool:
            wait_until(lambda: pool.stats.dropped_full >= 3)
            pool.stop()
            kept = [pool.get(timeout=5), pool.get(timeout=5)]
            with pytest.raises(rlbatch.PoolStopped):
                pool.get(timeout=5)
            stats = pool.stats
    assert stats.trajectories == stats.dropped_full + 2
    # the two kept are the last two emitted: consecutive pieces of the script
    np.testing.assert_array_equal(kept[0].obs[-1], kept[1].obs[0])


def test_policy_error_is_recorded_and_retried_with_backoff():
    class Flaky:
        """A policy front that fails its first three calls."""

        def __init__(self, svc):
            self.svc, self.calls, self.lock = svc, 0, threading.Lock()

        def register(self):
            caller = self.svc.register()
            flaky = self

            class C:
                def __call__(self, obs):
                    with flaky.lock:
                        flaky.calls += 1
                        n = flaky.calls
                    if n <= 3:
                        raise RuntimeError(f"transient policy failure {n}")
                    return caller(obs)

                def close(self):
                    caller.close()

            return C()

    with scripted_service() as svc:
        with rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), Flaky(svc), num_actors=1,
                               unroll_length=3, max_backoff=0.05) as pool:
            traj = pool.get(timeout=30)
            stats = pool.stats
    assert stats.policy_errors == 3
    assert [e.where for e in stats.recent_errors] == ["policy"] * 3
    np.testing.assert_array_equal(traj.obs[:3], [[0, 0], [0, 1], [0, 2]])  # no step lost or repeated


def test_stuck_env_shows_in_last_step_age():
    hung = []

    def make():
        env = fakes.ScriptedEnv(LENGTHS, TRUNCATE)
        if not hung:
            env = fakes.FaultInjection(env, hang_after=3)
            hung.append(env)
        return env

    with scripted_service() as svc:
        pool = rlbatch.ActorPool(make, svc, num_actors=4, unroll_length=2, on_full="drop_oldest", max_queue=4)
        with pool:
            wait_until(lambda: pool.stats.env_steps > 100)
            wait_until(lambda: max(pool.stats.last_step_age) > 0.3)
            ages = pool.stats.last_step_age
            stuck = int(np.argmax(ages))
            assert sorted(ages)[-2] < ages[stuck]
            hung[0].release()
    assert pool.envs_open == 0


def test_recurrent_state_resets_at_episode_start():
    def counter_apply(params, obs, state, key):
        return state % 2, {"count": state}, state + 1

    with rlbatch.PolicyService(counter_apply, {}, example_obs=np.zeros(2, np.float32), buckets=(4,),
                               example_state=np.int32(0), max_delay=0.001) as svc:
        with rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=1,
                               unroll_length=10) as pool:
            traj = pool.get(timeout=30)
    # the counter is the step index within the episode: it restarts at every episode start
    np.testing.assert_array_equal(traj.extras["count"], traj.obs[:-1, 1])
    np.testing.assert_array_equal(traj.action, traj.obs[:-1, 1] % 2)


def test_consumer_is_not_left_waiting_when_every_actor_has_exited():
    with scripted_service() as svc:
        pool = rlbatch.ActorPool(lambda: fakes.ScriptedEnv(LENGTHS, TRUNCATE), svc, num_actors=2, unroll_length=4)
        pool.start()
        svc.close()  # the policy goes away: the actors exit
        with pytest.raises(rlbatch.PoolStopped, match="every actor has exited"):
            for _ in range(1000):
                pool.get(timeout=30)
        assert pool.stop()


def test_stop_under_load_joins_everything_and_leaves_no_thread(no_thread_leak):
    svc = rlbatch.PolicyService(identity_apply, {}, example_obs=np.zeros(4, np.float32), buckets=(64, 256, 512),
                                max_delay=0.002)
    pool = rlbatch.ActorPool("CartPole-v1", svc, num_actors=512, unroll_length=8, max_queue=16)
    pool.start()
    wait_until(lambda: pool.stats.env_steps > 2000, timeout=60)
    assert pool.stop(timeout=30)
    assert pool.envs_open == 0
    assert svc.stats.pending == 0
    svc.close()
    assert not any(t.is_alive() for t in pool._threads)


def test_box_actions_are_clipped_for_the_env_but_recorded_as_sampled():
    import gymnasium

    def wide_apply(params, obs, key):  # samples far outside Pendulum's [-2, 2]
        n = obs.shape[0]
        return 5.0 * jax.random.normal(key, (n, 1)), {"log_prob": jnp.zeros(n)}

    seen = []

    class Spy(gymnasium.Wrapper):
        def step(self, action):
            seen.append(np.asarray(action).copy())
            return self.env.step(action)

    with rlbatch.PolicyService(wide_apply, {}, example_obs=np.zeros(3, np.float32), buckets=(4,),
                               max_delay=0.001) as svc:
        with rlbatch.ActorPool(lambda: Spy(gymnasium.make("Pendulum-v1")), svc, num_actors=1,
                               unroll_length=20) as pool:
            traj = pool.get(timeout=30)
    assert np.abs(traj.action).max() > 2.0  # the policy's own samples, for their log-probs
    assert np.abs(np.stack(seen)).max() <= 2.0  # what the environment got
    assert not pool.errors
