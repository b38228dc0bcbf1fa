"""ActorPool with ale-py's AtariVectorEnv (envs.atari.make_ale_vector_env) as each actor's vector
environment: real ALE episodes, ended per column, with the Trajectory contract (final_obs the old
episode's last observation, obs[t+1] the new one's first, the game's own returns)."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rlbatch
from envs.atari import make_ale_vector_env
from rlbatch.actors.vector_slot import _ale_actions

T, K, ACTIONS = 32, 2, 4  # Breakout: 4 actions


def random_apply(params, obs, key):
    n = obs.shape[0]
    return jax.random.randint(key, (n,), 0, ACTIONS, jnp.int32), {"log_prob": jnp.zeros(n)}


def service():
    return rlbatch.PolicyService(random_apply, {}, example_obs=np.zeros((4, 84, 84), np.uint8), buckets=(2, 4),
                                 max_delay=0.001)


@pytest.mark.parametrize("mode", ["NextStep", "SameStep"])
def test_ale_vector_env_episodes_through_the_pool_keep_the_trajectory_contract(mode):
    n = 16
    # Short episodes (a life, at most 200 frames: 50 steps) so that several end within the run.
    make = lambda k, seed: make_ale_vector_env("ALE/Breakout-v5", k, seed, episodic_life=True, autoreset_mode=mode,
                                                    max_num_frames_per_episode=200)
    with service() as svc:
        pool = rlbatch.ActorPool(None, svc, num_actors=2, unroll_length=T, envs_per_actor=K, vector_env_fn=make)
        with pool:
            trajs = [pool.get(timeout=60) for _ in range(n)]
        episodes = pool.episodes
    sums, counts, finished = collections.defaultdict(float), collections.Counter(), set()
    ends = 0
    for traj in trajs:
        assert traj.obs.dtype == np.uint8 and traj.obs.shape == (T + 1, K, 4, 84, 84)
        assert traj.final_obs.dtype == np.uint8 and traj.final_obs.shape == (T, K, 4, 84, 84)
        done = traj.terminated | traj.truncated
        assert not (traj.terminated & traj.truncated).any()
        for t in range(T):
            for j in range(K):
                eid = int(traj.episode_id[t, j])
                sums[eid] += float(traj.reward[t, j])
                counts[eid] += 1
                if done[t, j]:
                    ends += 1
                    finished.add(eid)
                    # The last observation continues the episode's frame stack; the next one does not.
                    np.testing.assert_array_equal(traj.final_obs[t, j, :3], traj.obs[t, j, 1:])
                    assert traj.final_obs[t, j, 3].any()
                    assert not np.array_equal(traj.obs[t + 1, j, :3], traj.obs[t, j, 1:])
                    if t + 1 < T:
                        assert int(traj.episode_id[t + 1, j]) == eid + 1
                else:
                    np.testing.assert_array_equal(traj.obs[t + 1, j, :3], traj.obs[t, j, 1:])
                    assert not traj.final_obs[t, j].any()
    assert ends >= 4
    assert any(traj.terminated.any() for traj in trajs)  # lives lost (random play rarely lasts to truncation)
    # Each finished episode seen whole: its return is the sum of its recorded (unclipped) rewards.
    logged = collections.Counter(episodes)
    matched = sum((sums[eid], counts[eid]) in logged for eid in finished)
    assert matched == len(finished)
    assert pool.stats.env_errors == 0 and pool.envs_open == 0


def test_ale_actions_are_int64_and_out_of_range_ones_are_refused():
    a = _ale_actions(np.array([0, 3], np.int32), 4)
    assert a.dtype == np.int64 and a.tolist() == [0, 3]
    with pytest.raises(ValueError, match="outside its action set"):
        _ale_actions(np.array([0, 4]), 4)
    with pytest.raises(ValueError, match="integer"):
        _ale_actions(np.array([0.0, 1.0]), 4)


def test_an_asynchronous_ale_vector_env_is_refused():
    make = lambda k, seed: make_ale_vector_env("ALE/Pong-v5", k, seed, batch_size=1)
    with service() as svc:
        with rlbatch.ActorPool(None, svc, num_actors=1, unroll_length=T, envs_per_actor=K, vector_env_fn=make) as pool:
            with pytest.raises(rlbatch.PoolStopped, match=r"AtariVectorEnv in synchronous mode .*batch_size=1"):
                pool.get(timeout=30)
        assert pool.envs_open == 0
