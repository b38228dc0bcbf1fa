"""PolicyLag: per-step lag against hand-computed arrays, max_policy_lag, statistics."""
import math

import numpy as np
import pytest

import rlbatch
from rlbatch.training import PolicyLag, PolicyLagStats


def trajectory(index, versions, actor_id=None):
    """A trajectory whose per-step fields are shaped like `versions` ([T] or [T, k]); every reward
    equals `index`, so a learner can tell which trajectories a batch holds."""
    versions = np.asarray(versions, np.int64)
    obs_shape = (versions.shape[0] + 1,) + versions.shape[1:] + (1,)
    return rlbatch.Trajectory(
        obs=np.zeros(obs_shape, np.float32),
        action=np.zeros(versions.shape, np.int32),
        reward=np.full(versions.shape, index, np.float32),
        terminated=np.zeros(versions.shape, bool),
        truncated=np.zeros(versions.shape, bool),
        final_obs=np.zeros(versions.shape + (1,), np.float32),
        extras={},
        policy_version=versions,
        episode_id=np.zeros(versions.shape, np.int64),
        actor_id=index if actor_id is None else actor_id,
    )


def test_lag_of_each_step_is_updates_minus_the_updates_behind_its_version():
    lag = PolicyLag(version=0)
    lag.published(1, updates=2)  # published every second update
    lag.published(2, updates=4)
    got = lag.lags(trajectory(0, [[0, 1], [1, 1], [2, 1]]), updates=5)
    np.testing.assert_array_equal(got, [[5, 3], [3, 3], [1, 3]])


def test_starting_version_and_updates_come_from_the_constructor():
    lag = PolicyLag(version=7, updates=10)  # a restored learner: version 7 holds 10 updates
    np.testing.assert_array_equal(lag.lags(trajectory(0, [7, 7]), updates=12), [2, 2])


def test_max_policy_lag_drops_whole_trajectories_with_any_stale_step():
    lag = PolicyLag(version=0, max_policy_lag=1)
    lag.published(1, 1)
    lag.published(2, 2)
    kept = lag.admit(trajectory(0, [1, 2, 2]), updates=2)  # exactly the limit is kept
    np.testing.assert_array_equal(kept, [1, 0, 0])
    assert lag.admit(trajectory(1, [0, 2, 2]), updates=2) is None  # one step of lag 2
    assert lag.admit(trajectory(2, [[0, 2], [2, 2]]), updates=2) is None  # k=2: 4 steps dropped
    assert lag.admit(trajectory(3, [2, 2, 0]), updates=2) is None  # the stale step need not be the first
    np.testing.assert_array_equal(lag.admit(trajectory(4, [[2, 2], [2, 2]]), updates=2), [[0, 0], [0, 0]])
    # admitted but not yet trained on: no lag counted
    assert (lag.stats.samples, lag.stats.stale_trajectories_dropped, lag.stats.stale_steps_dropped) == (0, 3, 10)


def test_trained_counts_the_lags_of_the_steps_a_learner_got():
    lag = PolicyLag(version=0)
    lag.published(1, 1)
    first = lag.admit(trajectory(0, [0, 0, 1]), updates=1)
    second = lag.admit(trajectory(1, [[0, 1], [1, 1]]), updates=4)
    lag.trained([first, second])  # lags [1, 1, 0] and [[4, 3], [3, 3]]
    assert lag.stats == PolicyLagStats(samples=7, min=0.0, mean=15 / 7, max=4.0, stale_trajectories_dropped=0,
                                       stale_steps_dropped=0)
    lag.trained([np.array([2, 2])])
    assert (lag.stats.samples, lag.stats.mean) == (9, 19 / 9)


def test_stats_are_nan_before_any_step_is_trained_on():
    lag = PolicyLag(version=0, max_policy_lag=0)
    lag.published(1, 1)
    assert lag.admit(trajectory(0, [0, 1]), updates=1) is None
    stats = lag.stats
    assert stats.samples == 0 and stats.stale_steps_dropped == 2 and stats.stale_trajectories_dropped == 1
    assert math.isnan(stats.min) and math.isnan(stats.mean) and math.isnan(stats.max)


def test_a_version_never_published_is_an_error_naming_actor_and_versions():
    lag = PolicyLag(version=0)
    lag.published(1, 1)
    with pytest.raises(ValueError, match=r"actor 5 has policy_version 9, expected one of the published "
                                         r"versions \[0, 1\]"):
        lag.admit(trajectory(0, [1, 9], actor_id=5), updates=1)
    assert lag.stats.samples == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "2"])
def test_max_policy_lag_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match=f"max_policy_lag must be an int >= 0 or None, got {bad!r}"):
        PolicyLag(version=0, max_policy_lag=bad)
