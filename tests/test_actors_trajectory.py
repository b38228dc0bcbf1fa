"""TrajectoryBuilder and stack_trajectories: what goes where, column by column."""
import numpy as np
import pytest

import rlbatch
from rlbatch.actors.trajectory import TrajectoryBuilder


def _fill(builder, T, k):
    """Step t, column j: observation [t, j], action 10 t + j, reward 100 t + j; column j's episode
    ends at step j (final observation [-t - 1, -j - 1]) and every episode id is 5 + t."""
    for t in range(T):
        obs = np.array([[t, j] for j in range(k)], np.float32)
        builder.record_policy(t, obs if k > 1 else obs[0], np.arange(k) + 10 * t if k > 1 else np.int64(10 * t),
                              {"logp": np.full(k, -t, np.float32) if k > 1 else np.float32(-t)}, version=t // 2)
        for j in range(k):
            if j == t:
                builder.record_final_obs(t, j, np.array([-t - 1, -j - 1], np.float32))
        builder.record_step(t, [100 * t + j for j in range(k)], [j == t for j in range(k)],
                            [False] * k, [5 + t] * k)
    last = np.array([[T, j] for j in range(k)], np.float32)
    return builder.finish(last if k > 1 else last[0])


def test_builder_writes_each_column_where_its_environment_put_it():
    T, k = 4, 3
    traj = _fill(TrajectoryBuilder(T, k, np.zeros(2, np.float32), actor_id=2, first_env_index=6), T, k)
    assert traj.obs.shape == (T + 1, k, 2) and traj.final_obs.shape == (T, k, 2)
    for t in range(T + 1):
        np.testing.assert_array_equal(traj.obs[t], [[t, j] for j in range(k)])
    expected_final = np.zeros((T, k, 2), np.float32)
    for j in range(k):
        expected_final[j, j] = [-j - 1, -j - 1]  # column j only, at the step its episode ended
    np.testing.assert_array_equal(traj.final_obs, expected_final)
    np.testing.assert_array_equal(traj.terminated, np.eye(T, k, dtype=bool))
    np.testing.assert_array_equal(traj.action, 10 * np.arange(T)[:, None] + np.arange(k))
    np.testing.assert_array_equal(traj.reward, 100 * np.arange(T)[:, None] + np.arange(k))
    np.testing.assert_array_equal(traj.extras["logp"], np.repeat(-np.arange(T)[:, None], k, axis=1))
    np.testing.assert_array_equal(traj.policy_version, np.repeat(np.arange(T)[:, None] // 2, k, axis=1))
    np.testing.assert_array_equal(traj.episode_id >> 32, np.broadcast_to(6 + np.arange(k), (T, k)))
    np.testing.assert_array_equal(traj.episode_id & 0xFFFFFFFF, np.repeat(5 + np.arange(T)[:, None], k, axis=1))
    assert traj.actor_id == 2
    assert traj.reward.dtype == np.float32 and traj.terminated.dtype == np.bool_ and traj.episode_id.dtype == np.int64


def test_builder_with_one_environment_has_no_column_axis():
    T = 3
    traj = _fill(TrajectoryBuilder(T, 1, np.zeros(2, np.float32), actor_id=0, first_env_index=4), T, 1)
    assert traj.obs.shape == (T + 1, 2) and traj.action.shape == (T,) and traj.reward.shape == (T,)
    np.testing.assert_array_equal(traj.obs[:, 0], np.arange(T + 1))
    np.testing.assert_array_equal(traj.final_obs, [[-1, -1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(traj.episode_id >> 32, [4, 4, 4])


def test_builder_keeps_pytree_observations_per_column():
    T, k = 2, 2
    example = {"pos": np.zeros(2, np.float32), "id": np.int32(0)}
    builder = TrajectoryBuilder(T, k, example, actor_id=0, first_env_index=0)
    for t in range(T):
        builder.record_policy(t, {"pos": np.full((k, 2), t, np.float32), "id": np.arange(k, dtype=np.int32)},
                              np.zeros(k, np.int64), {}, 0)
        builder.record_step(t, [0.0] * k, [False] * k, [t == 1, False], [0] * k)
    builder.record_final_obs(1, 0, {"pos": np.array([7, 8], np.float32), "id": np.int32(9)})
    traj = builder.finish({"pos": np.full((k, 2), 5, np.float32), "id": np.arange(k, dtype=np.int32)})
    np.testing.assert_array_equal(traj.obs["pos"][:, :, 0], [[0, 0], [1, 1], [5, 5]])
    np.testing.assert_array_equal(traj.obs["id"], [[0, 1], [0, 1], [0, 1]])
    np.testing.assert_array_equal(traj.final_obs["pos"][1], [[7, 8], [0, 0]])
    np.testing.assert_array_equal(traj.final_obs["id"][1], [9, 0])


def test_a_final_observation_of_another_shape_is_refused():
    builder = TrajectoryBuilder(2, 3, np.zeros(2, np.float32), actor_id=0, first_env_index=0)
    with pytest.raises(ValueError):
        builder.record_final_obs(0, 1, np.zeros(3, np.float32))


def test_stack_trajectories_puts_each_actors_columns_side_by_side():
    T, k = 3, 2
    trajs = [_fill(TrajectoryBuilder(T, k, np.zeros(2, np.float32), actor_id=a, first_env_index=a * k), T, k)
             for a in range(3)]
    batch = rlbatch.stack_trajectories(trajs)
    assert batch.obs.shape == (T + 1, 3 * k, 2) and batch.reward.shape == (T, 3 * k)
    np.testing.assert_array_equal(batch.actor_id, [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(batch.episode_id[0] >> 32, np.arange(3 * k))
    single = [_fill(TrajectoryBuilder(T, 1, np.zeros(2, np.float32), actor_id=a, first_env_index=a), T, 1)
              for a in range(2)]
    batch = rlbatch.stack_trajectories(single)
    assert batch.obs.shape == (T + 1, 2, 2) and batch.action.shape == (T, 2)
    np.testing.assert_array_equal(batch.actor_id, [0, 1])


def test_stack_trajectories_refuses_nothing_and_mixed_lengths():
    with pytest.raises(ValueError, match="expected at least one trajectory, got none"):
        rlbatch.stack_trajectories([])
    short = _fill(TrajectoryBuilder(2, 1, np.zeros(2, np.float32), 0, 0), 2, 1)
    long = _fill(TrajectoryBuilder(3, 1, np.zeros(2, np.float32), 0, 0), 3, 1)
    with pytest.raises(ValueError, match=r"expected trajectories of one length, got lengths \[2, 3\]"):
        rlbatch.stack_trajectories([short, long])
